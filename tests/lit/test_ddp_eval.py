"""The edit loop on 2 gloo processes: every record scored exactly once, metrics reduced over ranks,
one records.jsonl."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_configs import _write_fixture

ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, name: str, extra: list[str]) -> Path:
    out = tmp_path / name
    cmd = [
        sys.executable, "-m", "editlab.train", "experiment=ft_smollm2_counterfact", "model=tiny_llama",
        f"paths.data_dir={tmp_path}", "data.test.path=cf.json", "method.layers=[1]", "method.lr=0.05",
        "logger=none", "callbacks=none", f"hydra.run.dir={out}", *extra,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_ddp_two_processes_match_one(tmp_path):
    _write_fixture(tmp_path / "cf.json", n=5)
    single = _run(tmp_path, "single", [])
    ddp = _run(tmp_path, "ddp", ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu"])
    # rank 0 merged the ranks' files into one records.jsonl, in record order, and removed them
    assert [f.name for f in ddp.glob("records*.jsonl")] == ["records.jsonl"]
    rows = [json.loads(x) for x in (ddp / "records.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(5))  # each record once, none padded in
    assert sorted(r["record_id"] for r in rows) == list(range(5))
    single_rows = [json.loads(x) for x in (single / "records.jsonl").read_text().splitlines()]
    assert [r["record_id"] for r in rows] == [r["record_id"] for r in single_rows]
    a = json.loads((single / "summary.json").read_text())
    b = json.loads((ddp / "summary.json").read_text())
    for key in ("pre/reliability", "post/reliability", "post/locality", "post/efficacy_score",
                "post/neighborhood_score", "pre/efficacy_magnitude"):
        assert b[key] == pytest.approx(a[key], abs=1e-5), key
