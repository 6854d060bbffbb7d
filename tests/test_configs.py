"""Every experiment composes; the Hydra entry point runs end to end on a tiny model."""

import json
from pathlib import Path

import hydra
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf, open_dict

from editlab.methods.base import Editor
from editlab.train import run

CONFIGS = Path(__file__).resolve().parent.parent / "editlab" / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))


def _compose(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def test_there_are_experiments():
    assert "ft_smollm2_counterfact" in EXPERIMENTS


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes(experiment):
    cfg = _compose([f"experiment={experiment}"])
    assert cfg.experiment_name == experiment
    method = experiment.split("_")[0]
    assert cfg.method._target_.rsplit(".", 1)[-1].lower().startswith(method)  # ft -> FTL, rome -> ROME
    editor = hydra.utils.instantiate(cfg.method)
    assert isinstance(editor, Editor)
    assert hydra.utils.get_method(cfg.model._target_)
    assert hydra.utils.get_method(cfg.data.test._target_)
    assert cfg.trainer.inference_mode is False


@pytest.mark.parametrize("group,name", [(g.name, p.stem) for g in CONFIGS.iterdir() if g.is_dir()
                                        and g.name in ("model", "data", "method", "trainer", "logger")
                                        for p in g.glob("*.yaml")])
def test_group_options_compose(group, name):
    cfg = _compose([f"{group}={name}"])
    node = cfg.get(group)
    if group in ("model", "data", "method", "trainer"):
        assert hydra.utils.get_method(node._target_)


SUBJECTS = ["Danielle Darrieux", "Thomas Joannes Stieltjes", "Victor Hugo", "Léon Blum", "Colette"]


def _run_in(cfg, output_dir: Path) -> dict:
    """Run a composed config with its outputs in ``output_dir``; the run's summary."""
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    OmegaConf.resolve(cfg.paths)
    return run(cfg)


def _write_fixture(path: Path, n: int = 2) -> None:
    records = [
        {
            "case_id": i,
            "requested_rewrite": {
                "prompt": "The mother tongue of {} is",
                "relation_id": "P103",
                "target_new": {"str": "English", "id": "Q1860"},
                "target_true": {"str": "French", "id": "Q150"},
                "subject": subject,
            },
            "paraphrase_prompts": [f"{subject} is a native speaker of"],
            "neighborhood_prompts": ["The mother tongue of Léon Blum is"],
            "attribute_prompts": ["J. R. R. Tolkien is a native speaker of"],
            "generation_prompts": [f"{subject}'s mother tongue is"],
        }
        for i, subject in enumerate(SUBJECTS[:n])
    ]
    path.write_text(json.dumps(records))


def test_entry_point_runs_end_to_end(tmp_path):
    _write_fixture(tmp_path / "cf.json")
    cfg = _compose([
        "experiment=ft_smollm2_counterfact",
        "model=tiny_llama",
        f"paths.data_dir={tmp_path}",
        "data.test.path=cf.json",
        "method.layers=[1]",
        "method.lr=0.05",
        "logger=many",  # CSV + wandb (offline)
        "callbacks=none",
    ])
    summary = _run_in(cfg, tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "summary.json").exists() and (out / "summary.csv").exists()
    assert len((out / "records.jsonl").read_text().splitlines()) == 2
    assert "post/reliability" in summary and "post/neighborhood_score" in summary
    metrics_csv = out / "csv" / "metrics.csv"
    assert metrics_csv.exists() and "post/reliability" in metrics_csv.read_text()
    assert list((out / "wandb").glob("offline-run-*")), "wandb wrote an offline run"


@pytest.mark.parametrize("experiment,extra", [
    ("rome_smollm2_counterfact", ["method.layers=[0]", "method.r_rome=true", "edit.sequential=true"]),
    ("memit_smollm2_counterfact", ["method.layers=[0,1]", "data.batch_size=2"]),
])
def test_locate_then_edit_experiments_run_end_to_end(tmp_path, monkeypatch, experiment, extra):
    """ROME/MEMIT inside the Lightning edit loop (which scores under no_grad) on a tiny model."""
    from editlab.models.tiny import TINY_CORPUS

    monkeypatch.setenv("EDITLAB_CACHE", str(tmp_path / "cache"))
    _write_fixture(tmp_path / "cf.json")
    (tmp_path / "corpus.txt").write_text(TINY_CORPUS)
    cfg = _compose([
        f"experiment={experiment}",
        "model=tiny_llama",
        f"paths.data_dir={tmp_path}",
        "data.test.path=cf.json",
        "data.test.limit=2",
        "method.v_num_grad_steps=3",
        "method.context_template_length_params=[[5,2]]",
        "method.mom2_corpus._target_=editlab.data.corpora.TextFile",
        f"+method.mom2_corpus.path={tmp_path / 'corpus.txt'}",
        "logger=csv",
        "callbacks=none",
        *extra,
    ])
    summary = _run_in(cfg, tmp_path / "out")
    assert len((tmp_path / "out" / "records.jsonl").read_text().splitlines()) == 2
    assert "post/efficacy_score" in summary or "post/reliability" in summary


def test_entry_point_with_generation_mode(tmp_path):
    _write_fixture(tmp_path / "cf.json")
    cfg = _compose([
        "experiment=ft_smollm2_counterfact",
        "model=tiny_llama",
        f"paths.data_dir={tmp_path}",
        "data.test.path=cf.json",
        "method.layers=[1]",
        "method.num_steps=2",
        "module.scoring_modes=[teacher_forced,generation]",
        "module.generation_framing=question_answer",
        "logger=csv",
        "callbacks=none",
    ])
    summary = _run_in(cfg, tmp_path / "out")
    assert "post/reliability@generation_qa_em" in summary and "post/reliability" in summary
    assert "post/efficacy_score" not in summary  # probability comparison not among the modes
    assert "post/reliability@generation_qa_f1" in (tmp_path / "out" / "csv" / "metrics.csv").read_text()


def test_general_ability_config_group():
    from editlab.data.corpora import WikipediaSample
    from editlab.evaluation.general import GeneralAbility

    assert _compose(["experiment=ft_smollm2_zsre"]).module.general_ability is None  # off by default
    cfg = _compose(["experiment=ft_smollm2_zsre", "+general_ability=default"])
    ev = hydra.utils.instantiate(cfg.module.general_ability)
    assert isinstance(ev, GeneralAbility) and isinstance(ev.corpus, WikipediaSample)
    assert ev.piqa == "locality/piqa_valid.jsonl" and ev.piqa_examples == 200 and ev.n_tokens == 16384


def test_entry_point_with_general_ability(tmp_path):
    """``+general_ability=default`` on a tiny model: the offline Wikipedia sample (first 64 tokens)
    and PIQA from the data dir (a 2-item file written here), pre/post/final keys in the summary."""
    _write_fixture(tmp_path / "cf.json")
    (tmp_path / "locality").mkdir()
    items = [{"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Hit it."}] * 2
    (tmp_path / "locality" / "piqa_valid.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
    (tmp_path / "locality" / "piqa_valid-labels.lst").write_text("0\n1\n")
    cfg = _compose([
        "experiment=ft_smollm2_counterfact",
        "model=tiny_llama",
        f"paths.data_dir={tmp_path}",
        "data.test.path=cf.json",
        "method.layers=[1]",
        "edit.sequential=true",
        "module.score_after_stream=true",
        "+general_ability=default",
        "module.general_ability.n_tokens=64",
        "module.general_ability.seq_len=32",
        "logger=csv",
        "callbacks=none",
    ])
    summary = _run_in(cfg, tmp_path / "out")
    for stage in ("pre", "post", "final"):
        for name in ("perplexity", "piqa_acc", "piqa_acc_norm"):
            assert f"{stage}/general_{name}" in summary, (stage, name)
    assert summary["pre/general_tokens"] == 62 and summary["pre/general_piqa_examples"] == 2
    assert "pre/general_perplexity" in (tmp_path / "out" / "csv" / "metrics.csv").read_text()


# ------------------------------------------------------------------ edit streams
def test_stream_experiment_expands_into_a_sequential_stream_with_curves():
    from editlab.train import apply_stream

    cfg = _compose(["experiment=ft_smollm2_stream"])
    assert OmegaConf.to_container(cfg.stream) == {"edits": 200, "batch_size": 10, "eval_every": 5}
    apply_stream(cfg)
    assert cfg.data.test.limit == 200 and cfg.data.batch_size == 10
    assert cfg.edit.sequential is True and cfg.module.score_after_stream is True and cfg.module.eval_every == 5
    module = hydra.utils.get_class(cfg.module._target_)
    assert "eval_every" in module.__init__.__code__.co_varnames

    plain = _compose(["experiment=ft_smollm2_counterfact"])  # no stream: today's settings untouched
    apply_stream(plain)
    assert plain.edit.sequential is False and plain.module.score_after_stream is False
    assert plain.module.eval_every is None and plain.data.batch_size == 1

    bad = _compose(["experiment=ft_smollm2_counterfact", "stream.batch_size=0"])
    with pytest.raises(ValueError, match="stream.batch_size"):
        apply_stream(bad)


@pytest.mark.parametrize("eval_every", [None, 2])
def test_entry_point_runs_a_stream(tmp_path, eval_every):
    """A stream scores every edited record after the whole stream by default (final/…); with
    eval_every it also writes curves.csv / curves.png and stream/… logger keys."""
    _write_fixture(tmp_path / "cf.json", n=4)
    cfg = _compose([
        "experiment=ft_smollm2_counterfact",
        "model=tiny_llama",
        f"paths.data_dir={tmp_path}",
        "data.test.path=cf.json",
        "method.layers=[1]",
        "method.num_steps=3",
        "stream.edits=3",
        "stream.batch_size=1",
        f"stream.eval_every={'null' if eval_every is None else eval_every}",
        "logger=csv",
        "callbacks=none",
    ])
    summary = _run_in(cfg, tmp_path / "out")
    out = tmp_path / "out"
    rows = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all("final" in r for r in rows)
    assert "final/reliability" in summary and "final/locality" in summary
    if eval_every is None:
        assert not (out / "curves.csv").exists()
        return
    lines = (out / "curves.csv").read_text().splitlines()
    assert lines[0].startswith("edits,batches,") and [x.split(",")[0] for x in lines[1:]] == ["2", "3"]
    assert (out / "curves.png").exists()
    assert "stream/reliability" in (out / "csv" / "metrics.csv").read_text()
