"""Every experiment composes; presets and method configs match their editors; the Hydra entry
point runs end to end on a tiny model."""

import inspect
import json
import math
import subprocess
from pathlib import Path

import hydra
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf, open_dict

from editlab.errors import SettingError
from editlab.methods.base import Editor
from editlab.train import run

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "editlab" / "configs"


def _options(group: str) -> list[str]:
    """Every option of a config group, presets in subfolders included: rome, rome/smollm2_135m, ..."""
    folder = CONFIGS / group
    return sorted(str(p.relative_to(folder).with_suffix("")) for p in folder.rglob("*.yaml"))


EXPERIMENTS = _options("experiment")
METHODS = _options("method")  # method/<method>.yaml + presets method/<method>/<model>.yaml
PRESETS = [m for m in METHODS if "/" in m]
FIT_PRESETS = [f for f in _options("fit") if "/" in f]
# an experiment's name starts with its method; the editor class each method config builds
EDITOR_CLASS = {"ft": "FTL", "rome": "ROME", "memit": "MEMIT", "kn": "KN", "mend": "MEND", "ke": "KE",
                "serac": "SERAC", "ike": "IKE", "t_patcher": "TPatcher", "calinet": "CaliNet",
                "grace": "GRACE", "alphaedit": "AlphaEdit", "emmet": "EMMET", "wise": "WISE",
                "ultraedit": "UltraEdit", "malmen": "MALMEN",
                "rledit": "RLEdit"}


def _compose(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def test_there_are_experiments():
    assert "ft_smollm2_counterfact" in EXPERIMENTS
    assert {f"mend_smollm2_counterfact_chain/stage{i}" for i in range(1, 6)} <= set(EXPERIMENTS)
    assert sorted(p.stem for p in (CONFIGS / "method").glob("*.yaml")) == sorted(EDITOR_CLASS)


def _method_of(experiment: str) -> str:
    """The method an experiment's name starts with (the longest match: t_patcher_..., not t)."""
    return max((m for m in EDITOR_CLASS if experiment.startswith(m + "_")), key=len)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes(experiment):
    cfg = _compose([f"experiment={experiment}"])
    if "/" not in experiment:
        assert cfg.experiment_name == experiment
    method = _method_of(experiment)
    assert cfg.method._target_.rsplit(".", 1)[-1] == EDITOR_CLASS[method]
    # the editor's settings come from the preset of this (method, model) pairing, not the experiment
    choices = cfg.hydra.runtime.choices
    assert choices.method == f"{method}/{choices.model}", (choices.method, choices.model)
    assert choices.fit in (None, "null", f"{method}/{choices.model}"), choices.fit
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


_HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


def _check_constructor_keys(node, where: str, passed_by_caller: tuple[str, ...] = ()) -> None:
    """The keys of a ``_target_`` node are exactly arguments of what it builds: no unknown key, every
    required argument present (``passed_by_caller``: arguments the entry point supplies itself); the
    same for every ``_target_`` node inside it (``module.scoring``, a method's corpus ...)."""
    target = hydra.utils.get_method(node._target_)
    params = inspect.signature(target).parameters
    assert not any(p.kind is p.VAR_KEYWORD for p in params.values()), f"{where}: {node._target_} takes **kw"
    keys = set(node) - _HYDRA_KEYS
    unknown = sorted(keys - set(params))
    assert not unknown, f"{where}: {unknown} are not arguments of {node._target_}{inspect.signature(target)}"
    required = {n for n, p in params.items() if p.default is p.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n != "self"}
    missing = sorted(required - keys - set(passed_by_caller))
    assert not missing, f"{where}: required arguments {missing} of {node._target_} are not set"
    for key, child in node.items_ex(resolve=False):
        if OmegaConf.is_dict(child) and "_target_" in child:
            _check_constructor_keys(child, f"{where} {key}")


@pytest.mark.parametrize("method", METHODS)
def test_method_config_keys_match_the_editor_constructor(method):
    _check_constructor_keys(_compose([f"method={method}"]).method, f"method={method}")


@pytest.mark.parametrize("method", METHODS)
def test_every_method_config_and_preset_builds_its_editor(method):
    """Each method config and preset passes its editor's constructor checks (no model is loaded)."""
    editor = hydra.utils.instantiate(_compose([f"method={method}"]).method)
    assert type(editor).__name__ == EDITOR_CLASS[method.split("/")[0]]


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_is_its_method_defaults_plus_the_model_values(preset):
    """method/<method>/<model>.yaml: the method's paper defaults (method/<method>.yaml) with the
    values written in the preset on top, for a model that has a config."""
    name, model = preset.split("/")
    assert (CONFIGS / "model" / f"{model}.yaml").is_file(), f"method/{preset}.yaml: no model/{model}.yaml"
    defaults = OmegaConf.to_container(_compose([f"method={name}"]).method)
    composed = OmegaConf.to_container(_compose([f"method={preset}"]).method)
    own = OmegaConf.to_container(OmegaConf.load(CONFIGS / "method" / f"{preset}.yaml"))
    assert own.pop("defaults") == [f"/method/{name}@_here_", "_self_"]
    assert "_target_" not in own  # the editor is the method's
    assert composed == {**defaults, **own}


def test_plain_method_keeps_the_paper_defaults_and_a_preset_selects_the_pairing():
    assert _compose(["method=rome"]).method.layers == [17]  # kmeng01/rome gpt2-xl
    smol = _compose(["method=rome/smollm2_135m"]).method
    assert smol.layers == [5] and smol.v_num_grad_steps == 25 and smol.v_lr == 0.5
    cfg = _compose(["experiment=rome_smollm2_counterfact", "method=rome"])  # an experiment's preset swapped
    assert cfg.method.layers == [17] and cfg.hydra.runtime.choices.model == "smollm2_135m"


@pytest.mark.parametrize("preset", FIT_PRESETS)
def test_fit_preset_trains_its_method_preset(preset):
    """fit/<method>/<model>.yaml extends fit/editor.yaml for a method preset that exists; its
    training module and callbacks take the keys it sets."""
    assert preset in PRESETS, f"fit/{preset}.yaml has no method/{preset}.yaml"
    assert EDITOR_CLASS[preset.split("/")[0]] in ("MEND", "KE", "SERAC", "MALMEN", "RLEdit")  # the trainable editors
    fit = _compose([f"method={preset}", f"fit={preset}"]).fit
    generic = _compose(["fit=editor"]).fit
    assert set(generic) <= set(fit) and set(generic.trainer) <= set(fit.trainer)
    _check_constructor_keys(fit.module, f"fit={preset} fit.module", passed_by_caller=("model", "editor"))
    for name, node in fit.callbacks.items():
        if node is not None and "_target_" in node:
            _check_constructor_keys(node, f"fit={preset} fit.callbacks.{name}")


@pytest.mark.parametrize("module", _options("module"))
def test_module_config_keys_match_the_module_constructor(module):
    node = _compose([f"module={module}"]).module
    _check_constructor_keys(node, f"module={module}", passed_by_caller=("model", "editor"))


def test_module_scoring_settings_are_checked_too():
    """``module.scoring`` (ScoringSettings) is checked like its module: an unknown key fails, by name;
    its settings are checked when it is built, before any model."""
    from editlab.errors import SettingError
    from editlab.evaluation.scorer import ScoringSettings

    node = _compose(["module=edit_eval"]).module
    assert node.scoring._target_ == "editlab.evaluation.scorer.ScoringSettings"
    assert isinstance(hydra.utils.instantiate(node.scoring), ScoringSettings)
    wild = _compose(["module=edit_eval", "+module.scoring.wild_key=1"]).module
    with pytest.raises(AssertionError, match="wild_key"):
        _check_constructor_keys(wild, "module=edit_eval", passed_by_caller=("model", "editor"))
    from editlab.train import check_scoring

    bad = _compose(["experiment=ft_smollm2_counterfact", "module.scoring.generation_margin=-1"])
    with pytest.raises(SettingError, match=r"^module\.scoring\.generation_margin must be >= 0, got -1$"):
        check_scoring(bad)  # run() calls it before the model loads
    check_scoring(_compose(["experiment=rome_smollm2_zsre", "module.scoring.judge=some/judge-model"]))  # not loaded


def test_module_scoring_judge_is_a_name_or_a_target_callable():
    """``module.scoring.judge``: a model name/path is kept as a string (loaded when the scorer is
    built); a ``_target_`` node is instantiated with the settings (Hydra instantiates recursively)."""
    named = hydra.utils.instantiate(_compose(["module=edit_eval", "module.scoring.judge=some/judge-model"]).module.scoring)
    assert named.judge == "some/judge-model"
    from editlab.evaluation.judge import LLMJudge

    cfg = _compose(["module=edit_eval", "+module.scoring.judge._target_=editlab.evaluation.judge.LLMJudge",
                    "+module.scoring.judge.model._target_=editlab.models.tiny.tiny_model",
                    "+module.scoring.judge.yes=yes", "+module.scoring.judge.no=no"])
    settings = hydra.utils.instantiate(cfg.module.scoring)
    assert isinstance(settings.judge, LLMJudge)  # built from its node, its model too
    assert 0.0 <= settings.judge("Capital of France?", "Paris", "Paris") <= 1.0


def test_generation_chat_module_is_the_edit_loop_with_chat_generation():
    base = OmegaConf.to_container(_compose(["module=edit_eval"]).module)
    chat = OmegaConf.to_container(_compose(["module=generation_chat"]).module)
    assert chat == {**base, "scoring": {**base["scoring"], "generation_framing": "chat",
                                        "scoring_modes": ["teacher_forced", "probability_comparison", "generation"]}}
    assert _compose(["experiment=rome_smollm2_zsre"]).hydra.runtime.choices.module == "generation_chat"


def test_a_user_config_dir_on_the_searchpath_adds_experiments_and_models(tmp_path):
    """``hydra.searchpath=[file://DIR]``: DIR's experiment and model are found beside the packaged
    ones, and can build on them (a packaged preset, a packaged model)."""
    (tmp_path / "experiment").mkdir()
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "my_tiny.yaml").write_text("defaults:\n  - tiny_llama\n  - _self_\nseed: 7\n")
    (tmp_path / "experiment" / "my_rome.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: my_tiny\n"
        "  - override /method: rome/smollm2_135m\n"
        "experiment_name: my_rome\nmethod:\n  layers: [1]\n")
    cfg = _compose([f"hydra.searchpath=[file://{tmp_path}]", "experiment=my_rome"])
    assert cfg.experiment_name == "my_rome" and cfg.model.seed == 7 and cfg.model.model_type == "llama"
    assert cfg.method.layers == [1] and cfg.method.v_num_grad_steps == 25  # the packaged preset beneath
    with pytest.raises(Exception, match="my_rome"):
        _compose(["experiment=my_rome"])  # not without the search path


def test_mend_chain_script_runs_the_stage_experiments_in_order(tmp_path):
    script = REPO / "experiments" / "mend_counterfact_chain.sh"
    env = {"PATH": "/usr/bin:/bin", "PYTHON": "echo", "RUNS": str(tmp_path / "runs")}
    lines = subprocess.run(["bash", str(script)], env=env, check=True, capture_output=True,
                           text=True).stdout.splitlines()
    assert len(lines) == 5
    previous = None
    for i, line in enumerate(lines, start=1):
        words = line.split()
        assert words[:3] == ["-m", "editlab.train", f"experiment=mend_smollm2_counterfact_chain/stage{i}"]
        assert f"mend_smollm2_counterfact_chain/stage{i}" in EXPERIMENTS
        run_dir = words[3].removeprefix("hydra.run.dir=")
        assert run_dir.startswith(str(tmp_path / "runs"))
        init = [w for w in words if w.startswith("fit.init_from=")]
        if previous is None:
            assert not init
        else:
            assert len(init) == 1 and init[0].startswith(f"fit.init_from={previous}/checkpoints/editor-step")
        previous = run_dir
    bad = subprocess.run(["bash", str(script)], env={**env, "FROM": "2"}, capture_output=True, text=True)
    assert bad.returncode == 2 and "needs INIT" in bad.stderr


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
    # CounterFact with the default modes: teacher-forced and probability-comparison scores, pre and
    # post (locality compares post with pre: post only), and no failed edit
    for key in ("reliability", "generalization", "efficacy_score", "paraphrase_score", "neighborhood_score"):
        for stage in ("pre", "post"):
            assert 0.0 <= summary[f"{stage}/{key}"] <= 1.0, (stage, key)
    assert 0.0 <= summary["post/locality"] <= 1.0 and "pre/locality" not in summary
    assert summary["edits/failed"] == 0


def test_entry_point_with_generation_mode(tmp_path):
    _write_fixture(tmp_path / "cf.json")
    cfg = _compose([
        "experiment=ft_smollm2_counterfact",
        "model=tiny_llama",
        f"paths.data_dir={tmp_path}",
        "data.test.path=cf.json",
        "method.layers=[1]",
        "method.num_steps=2",
        "module.scoring.scoring_modes=[teacher_forced,generation]",
        "module.scoring.generation_framing=question_answer",
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
def test_the_scale_stream_scores_a_fixed_sample_at_its_curve_points():
    from editlab.train import apply_stream

    cfg = _compose(["experiment=ultraedit_smollm2_counterfact_10k"])
    apply_stream(cfg)
    assert cfg.data.test.limit == 10000 and cfg.module.eval_every == 20 and cfg.module.eval_sample == 500
    assert cfg.module.sample_only is True  # the 500 records are the only ones scored


def test_sample_only_needs_a_sample():
    from editlab.train import apply_stream

    cfg = _compose(["experiment=ft_smollm2_stream", "stream.sample_only=true"])
    with pytest.raises(SettingError, match="stream.sample_only.*eval_sample"):
        apply_stream(cfg)


def test_stream_experiment_expands_into_a_sequential_stream_with_curves():
    from editlab.train import apply_stream

    cfg = _compose(["experiment=ft_smollm2_stream"])
    assert OmegaConf.to_container(cfg.stream) == {"edits": 200, "batch_size": 10, "eval_every": 5,
                                                  "eval_sample": None, "sample_only": None, "checkpoint_every": None,
                                                  "resume": None}
    apply_stream(cfg)
    assert cfg.data.test.limit == 200 and cfg.data.batch_size == 10
    assert cfg.edit.sequential is True and cfg.module.score_after_stream is True and cfg.module.eval_every == 5
    assert cfg.module.checkpoint_every == 5 and cfg.module.resume_from is None  # a checkpoint at every curve point
    module = hydra.utils.get_class(cfg.module._target_)
    assert "eval_every" in module.__init__.__code__.co_varnames

    plain = _compose(["experiment=ft_smollm2_counterfact"])  # no stream: today's settings untouched
    apply_stream(plain)
    assert plain.edit.sequential is False and plain.module.score_after_stream is False
    assert plain.module.eval_every is None and plain.data.batch_size == 1

    bad = _compose(["experiment=ft_smollm2_counterfact", "stream.batch_size=0"])
    with pytest.raises(ValueError, match="stream.batch_size"):
        apply_stream(bad)
    curveless = _compose(["experiment=ft_smollm2_counterfact", "stream.edits=50", "stream.checkpoint_every=null"])
    apply_stream(curveless)
    assert curveless.module.checkpoint_every == 10 and curveless.module.eval_every is None
    off = _compose(["experiment=ft_smollm2_stream", "stream.checkpoint_every=0"])
    apply_stream(off)
    assert off.module.checkpoint_every == 0
    with pytest.raises(ValueError, match="stream.checkpoint_every"):
        apply_stream(_compose(["experiment=ft_smollm2_stream", "stream.checkpoint_every=-1"]))


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


def _span(split) -> tuple[str, int, float]:
    """(file, first record, end) of a data split; a split without a limit runs to the file's end."""
    offset = int(split.get("offset") or 0)
    limit = split.get("limit")
    return str(split.path), offset, math.inf if limit is None else offset + int(limit)


@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS if "/" not in e])
def test_a_trained_editor_is_never_validated_or_tested_on_its_training_records(experiment):
    """Choose on validation, report on test: the records an editor trains on, those its checkpoint is
    chosen on and those it is tested on (after stream.edits is applied) are disjoint slices."""
    from editlab.train import apply_stream

    cfg = _compose([f"experiment={experiment}"])
    if cfg.get("fit") is None:
        return
    apply_stream(cfg)
    spans = {name: _span(cfg.data[name]) for name in ("train", "val", "test") if cfg.data.get(name) is not None}
    names = sorted(spans)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            (fa, lo_a, hi_a), (fb, lo_b, hi_b) = spans[a], spans[b]
            assert fa != fb or hi_a <= lo_b or hi_b <= lo_a, f"{experiment}: {a} {spans[a]} overlaps {b} {spans[b]}"


def test_a_setting_added_later_and_left_off_does_not_stop_a_resume():
    from editlab.train import differing_settings

    old = {"module.eval_every": 250, "method.lr": 1.0}
    assert differing_settings(old, {**old, "module.sample_only": False, "module.x": None}) == []
    assert differing_settings(old, {**old, "module.sample_only": True}) == ["module.sample_only"]
    assert differing_settings(old, {"module.eval_every": 100, "method.lr": 1.0}) == ["module.eval_every"]
    assert differing_settings({**old, "module.gone": False}, old) == ["module.gone"]


def test_trained_editors_gpu_script_composes_and_tests_disjoint_records(tmp_path):
    """Every command of experiments/trained_editors_gpu.sh composes, and each trained editor's two
    test sets are disjoint from each other and from the validation records it was chosen on."""
    from editlab.train import apply_stream

    script = REPO / "experiments" / "trained_editors_gpu.sh"
    env = {"PATH": "/usr/bin:/bin", "PYTHON": "echo", "LOG_DIR": str(tmp_path / "logs"),
           "ONLY": "malmen100 malmen500 malmen1000 rledit alphaedit"}
    lines = subprocess.run(["bash", str(script)], env=env, check=True, capture_output=True,
                           text=True).stdout.splitlines()
    runs = {p.stem: p.read_text().split() for p in (tmp_path / "logs").glob("*.log")}
    assert sorted(runs) == sorted(["malmen100", "malmen500", "malmen1000", "rledit", "alphaedit",
                                   "malmen100_second", "malmen500_second", "rledit_second"])
    assert len(lines) == len(runs)

    def records(cfg):
        return set(range(cfg.data.test.offset, cfg.data.test.offset + cfg.data.test.limit))

    tested = {}
    for name, words in runs.items():
        assert words[:2] == ["-m", "editlab.train"], words
        overrides = [w.replace('"', "") if w.startswith("+fit.trainer.max_time") else w for w in words[2:]]
        cfg = _compose(overrides)
        apply_stream(cfg)
        assert cfg.experiment_name.endswith(f"_gpu_{name}")
        assert cfg.trainer.accelerator == "gpu" and cfg.model.device == "cuda"
        trained = name in ("malmen100", "malmen500", "malmen1000", "rledit")
        assert any(w.startswith("+fit.trainer.max_time=") for w in words) == trained
        assert (cfg.get("ckpt_path") == "CKPT") == name.endswith("_second")
        tested[name] = records(cfg)
        if trained:
            val = set(range(cfg.data.val.offset, cfg.data.val.offset + cfg.data.val.limit))
            assert not tested[name] & val and cfg.data.train.path != cfg.data.test.path
        if name.startswith("malmen"):  # one batch edit of all the test records, the size it trained at
            assert cfg.data.batch_size == cfg.data.test.limit == int(name.removeprefix("malmen").split("_")[0])
            if not name.endswith("_second"):
                assert cfg.data.train_batch_size == cfg.data.batch_size
    assert tested["malmen100"] == set(range(300, 400)) and tested["malmen1000"] == set(range(300, 1300))
    assert tested["rledit"] == tested["alphaedit"] == set(range(300, 1300))  # the same stream
    for name in ("malmen100", "malmen500", "rledit"):
        assert tested[f"{name}_second"] and not tested[f"{name}_second"] & tested[name]
        assert not tested[f"{name}_second"] & set(range(200, 300))
    bad = subprocess.run(["bash", str(script)], env={**env, "ONLY": "malmen2000"}, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "unknown setting 'malmen2000'" in bad.stderr
