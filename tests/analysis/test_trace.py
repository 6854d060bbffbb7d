"""The causal-tracing entry point (``python -m editlab.analysis.trace``) on a tiny random model."""

import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf, open_dict

from editlab.analysis.trace import run

CONFIGS = Path(__file__).resolve().parents[2] / "editlab" / "configs"


def _known_fixture(path: Path) -> None:
    records = [
        {"known_id": 7, "subject": "Victor Hugo", "attribute": "French", "template": "The mother tongue of {} was",
         "prediction": " French", "prompt": "The mother tongue of Victor Hugo was", "relation_id": "P103"},
        {"known_id": 9, "subject": "Toyota", "attribute": "Japan", "template": "{} is a company from",
         "prediction": " Japan", "prompt": "Toyota is a company from", "relation_id": "P17"},
    ]
    path.write_text(json.dumps(records))


def _compose(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="trace", overrides=overrides, return_hydra_config=True)


def test_trace_config_composes():
    cfg = _compose([])
    assert cfg.model._target_.endswith("smollm2_135m")
    assert list(cfg.trace.kinds) == ["hidden", "mlp", "attn"]
    assert cfg.trace.samples == 10 and cfg.trace.noise_factor == 3.0 and cfg.trace.window == 10
    assert cfg.data.n == 20


@pytest.mark.parametrize("only_known", [False, True])
def test_entry_point_runs_end_to_end(tmp_path, only_known):
    _known_fixture(tmp_path / "known.json")
    cfg = _compose([
        "model=tiny_llama", f"paths.data_dir={tmp_path}", "data.path=known.json", "data.n=2",
        f"data.only_known={str(only_known).lower()}", "trace.samples=2", "trace.window=2",
    ])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "out")
    OmegaConf.resolve(cfg.paths)
    summary = run(cfg)
    out = tmp_path / "out"
    assert (out / "summary.json").exists() and (out / "summary.csv").exists()
    if only_known:  # a random model knows nothing: nothing traced, and it says so
        assert summary["n_traced"] == 0 and len(summary["skipped"]) == 2
        return
    assert summary["n_traced"] == 2
    for known_id in (7, 9):
        case = json.loads((out / "cases" / f"known_{known_id}.json").read_text())
        assert set(case["kinds"]) == {"hidden", "mlp", "attn"}
        assert np.load(out / "cases" / f"known_{known_id}.npz")["scores_mlp"].shape == (len(case["tokens"]), 2)
        for kind in ("hidden", "mlp", "attn"):
            assert (out / "plots" / f"known_{known_id}_{kind}.png").stat().st_size > 1000
    rows = (out / "summary.csv").read_text().splitlines()
    assert rows[0] == "kind,category,layer,aie,std,n" and any(r.startswith("mlp,last_subject,1,") for r in rows)
    assert (out / "summary.png").exists() and (out / "summary_heatmap.png").exists()
    assert summary["peak_mlp_last_subject"] in (0, 1)
    assert json.loads((out / "summary.json").read_text())["peak_mlp_last_subject"] == summary["peak_mlp_last_subject"]
