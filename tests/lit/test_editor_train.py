"""Training trainable editors (editlab/lit/editor_train.py) on tiny models, with LearnedStep
(tests/lit/learned_step.py), a small but real trainable editor."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import hydra
import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf, open_dict

from editlab.data.datamodule import EditDataModule, EpochSampler, ResumableDataLoader, pair_locality
from editlab.data.loaders import load_counterfact_easyedit
from editlab.data.records import EditRecord, Probe
from editlab.evaluation.scorer import ScoringSettings
from editlab.lit.callbacks import EditorCallback
from editlab.lit.curves import TrainingCurves
from editlab.lit.edit_eval import EditEvalModule
from editlab.lit.checkpoint import editor_state, load_editor, read_editor_checkpoint, training_order
from editlab.lit.editor_train import EditorTrainModule, MarginAnnealing
from editlab.methods.hyper import LearnedEditor
from editlab.methods.ke import KE
from editlab.methods.malmen import MALMEN
from editlab.methods.mend import MEND
from editlab.methods.rledit import RLEdit
from editlab.methods.serac import SERAC
from editlab.models.encoder import SentenceEncoder
from editlab.train import run

from conftest import assert_same_training_state, assert_state_equal, state_copy
from learned_step import LearnedStep, write_easyedit

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "editlab" / "configs"
TEST_CONFIGS = ROOT / "tests" / "configs"
HERE = Path(__file__).resolve().parent
EDIT_PARAMS = ["model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight"]
EDITOR_CONFIG = {"_target_": "learned_step.LearnedStep", "edit_params": EDIT_PARAMS, "init_lr": 1e-3}
TINY_ENCODER = "editlab.models.encoder.SentenceEncoder.tiny"


@pytest.fixture
def trust_learned_step(monkeypatch):
    """Let checkpoints rebuild the test editor LearnedStep, as they rebuild editlab's own trained
    editors (editlab.lit.checkpoint builds nothing else from a checkpoint's stored config)."""
    from editlab.lit import checkpoint

    own = checkpoint.trained_editor_classes
    monkeypatch.setattr(checkpoint, "trained_editor_classes",
                        lambda: {**own(), EDITOR_CONFIG["_target_"]: LearnedStep})


def _editor() -> LearnedStep:
    return LearnedStep(EDIT_PARAMS, init_lr=1e-3)


def _data(tmp_path: Path, n_train: int = 8, n_val: int = 4, batch: int = 2) -> EditDataModule:
    train = write_easyedit(tmp_path / "train.json", n_train)
    val = write_easyedit(tmp_path / "val.json", n_val, offset=n_train)
    def load(path: Path):
        return partial(load_counterfact_easyedit, path)

    return EditDataModule(train=load(train), val=load(val), test=load(val), train_batch_size=batch,
                          val_batch_size=2)


def _trainer(max_steps: int, callbacks=(), val_every: int | None = None, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, inference_mode=False, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        val_check_interval=val_every, check_val_every_n_epoch=None if val_every else 1,
        limit_val_batches=None if val_every else 0, callbacks=list(callbacks),
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks), **kwargs,
    )


def _editor_state(editor) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in editor.state_dict().items()}


# ------------------------------------------------------------------------------------ data


def test_pair_locality_borrows_the_next_probe():
    probe = Probe("The capital of Italy is", "Rome", "neighborhood")
    recs = [EditRecord(record_id=i, prompt=f"p{i} is", subject=f"p{i}", target_new="x",
                       locality=(probe,) if i == 2 else ()) for i in range(4)]
    paired = pair_locality(recs)
    assert [len(r.locality) for r in paired] == [1, 1, 1, 1]
    assert paired[2] is recs[2] and paired[0].locality[0].group == "borrowed"
    assert paired[3].locality[0].prompt == probe.prompt  # wraps around
    none = [EditRecord(record_id=0, prompt="a is", subject="a", target_new="b")]
    assert pair_locality(none) == none


def test_training_batches_and_epoch_order(tmp_path):
    dm = _data(tmp_path, n_train=7, batch=3)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableDataLoader) and isinstance(loader.sampler, EpochSampler)
    assert [len(b) for b in loader] == [3, 3, 1]
    first = [r.record_id for b in loader for r in b]
    assert sorted(first) == list(range(7)) and first == [r.record_id for b in loader for r in b]
    loader.sampler.set_epoch(1)
    assert [r.record_id for b in loader for r in b] != first  # a new permutation per epoch
    # resuming in the middle of epoch 1 serves the rest of epoch 1's order
    full = [r.record_id for b in loader for r in b]
    loader.load_state_dict({"epoch": 1, "batches": 2})
    assert [r.record_id for b in loader for r in b] == full[6:]
    assert loader.state_dict() == {"epoch": 1, "batches": 3, "seed": loader.sampler.seed}
    loader.load_state_dict({"epoch": 1, "batches": 3})  # an epoch-end checkpoint resumes at the next epoch
    loader.sampler.set_epoch(2)
    assert len([r for b in loader for r in b]) == 7
    assert [len(b) for b in dm.val_dataloader()] == [2, 2]
    assert EditDataModule(train=list).val_dataloader() == []


# ------------------------------------------------------------------------------------ training


def test_one_step_changes_the_editor_and_not_the_base_model(tiny, tmp_path):
    bundle = tiny("llama")
    base = state_copy(bundle.model)
    module = EditorTrainModule(bundle, _editor(), lr=1e-2)
    before = _editor_state(module.editor)
    _trainer(1).fit(module, datamodule=_data(tmp_path))
    after = module.editor.state_dict()
    for name, param in module.editor.named_parameters():
        assert not torch.equal(before[name], param.detach()), f"editor parameter {name} did not change"
    assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith("count_"))  # buffers
    assert_state_equal(bundle.model, base)
    assert not any(p.requires_grad for p in bundle.model.parameters()) and not bundle.model.training


def test_editor_learns(tiny_deep, tmp_path):
    """LearnedStep's step sizes and preconditioner are trained: the objective falls on the training
    records (4-block model with peaked predictions, so an MLP edit of the last block can take)."""
    bundle = tiny_deep("llama")
    editor = LearnedStep(["model.layers.3.mlp.up_proj.weight", "model.layers.3.mlp.down_proj.weight"],
                         init_lr=1e-3)
    module = EditorTrainModule(bundle, editor, lr=0.1)
    dm = _data(tmp_path, n_train=8)
    dm.setup("fit")
    batch = module.collator(list(dm.datasets["train"].records))

    def losses() -> dict[str, float]:
        module.editor.eval()
        with torch.no_grad():
            return {k: float(v) for k, v in module.editor.training_losses(bundle.model, batch).items()}

    start = losses()
    _trainer(60).fit(module, datamodule=dm)
    end = losses()
    assert end["loss"] < 0.9 * start["loss"] and end["loss_edit"] < 0.8 * start["loss_edit"]
    assert all(float(v.detach()) > -6.9 for v in editor.log_lr.values())  # the step sizes grew from log(1e-3)


def test_validation_metrics_are_the_edit_loops(tiny, tmp_path):
    """val/reliability, val/locality ... equal post/... of the edit loop (single edits), same editor."""
    bundle = tiny("llama")
    module = EditorTrainModule(bundle, _editor(), lr=5e-2)
    dm = _data(tmp_path, n_val=4)
    trainer = _trainer(6, val_every=6)
    trainer.fit(module, datamodule=dm)
    val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    for key in ("val/reliability", "val/generalization", "val/locality", "val/locality_acc", "val/loss",
                "val/loss_edit", "val/loss_loc", "val/edit_acc", "val/loc_acc", "val/edit_score"):
        assert key in val, key
    parts = [val[f"val/{m}"] for m in ("reliability", "generalization", "locality")]
    assert val["val/edit_score"] == pytest.approx(3 / sum(1 / p for p in parts) if min(parts) > 0 else 0.0)
    evaluation = EditEvalModule(bundle, ScoringSettings(probability_comparison=False))
    L.Trainer(accelerator="cpu", devices=1, inference_mode=False, logger=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[EditorCallback(module.editor)]
              ).test(evaluation, datamodule=dm, verbose=False)
    for metric in ("reliability", "generalization", "locality", "locality_acc"):
        assert val[f"val/{metric}"] == pytest.approx(evaluation.summary[f"post/{metric}"], abs=1e-6), metric


def test_checkpoint_holds_the_editor_only_and_loads_onto_its_base_model(tiny, tmp_path, trust_learned_step):
    bundle = tiny("llama")
    module = EditorTrainModule(bundle, _editor(), lr=1e-2, editor_config=EDITOR_CONFIG)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _trainer(3, [ckpt]).fit(module, datamodule=_data(tmp_path))
    path = Path(ckpt.last_model_path)
    checkpoint = read_editor_checkpoint(path)
    keys = list(checkpoint["state_dict"])
    assert keys and all(k.startswith("editor.") for k in keys)
    assert checkpoint["editor"]["base_model"] == "tiny-llama"
    assert checkpoint["editor"]["config"] == EDITOR_CONFIG
    editor_bytes = sum(t.numel() * t.element_size() for t in module.editor.state_dict().values())
    base_bytes = sum(t.numel() * t.element_size() for t in bundle.model.state_dict().values())
    assert path.stat().st_size < 3 * editor_bytes + 64_000 < base_bytes  # weights + Adam moments + metadata

    loaded = load_editor(path, bundle)  # rebuilt from the stored config
    assert isinstance(loaded, LearnedStep) and not loaded.training
    for k, v in module.editor.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    records = load_counterfact_easyedit(tmp_path / "val.json")[:1]
    a = module.editor.compute_deltas(bundle.model, bundle.tokenizer, records)
    b = loaded.compute_deltas(bundle.model, bundle.tokenizer, records)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="tiny-llama"):
        load_editor(path, tiny("gpt2"))


@pytest.mark.parametrize("resume_step", [3, 4])  # mid-epoch (3 of 4 batches) and at the epoch's end
def test_resume_reaches_the_uninterrupted_state(tiny, tmp_path, resume_step):
    """Resuming from a checkpoint after ``resume_step`` steps ends bit-exactly where an uninterrupted
    run ends: editor weights, buffers, Adam moments (same ops in the same order on one CPU thread)."""
    bundle = tiny("llama")

    def fit(max_steps: int, ckpt_path=None, every: int | None = None):
        L.seed_everything(0)
        module = EditorTrainModule(bundle, _editor(), lr=2e-2)
        callbacks = [ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every, save_top_k=-1,
                                     filename="{step}")] if every else []
        trainer = _trainer(max_steps, callbacks, val_every=2)
        trainer.fit(module, datamodule=_data(tmp_path), ckpt_path=ckpt_path)
        return module, trainer

    full, full_trainer = fit(7)
    fit(resume_step, every=resume_step)
    resumed, resumed_trainer = fit(7, ckpt_path=tmp_path / "ckpt" / f"step={resume_step}.ckpt")
    assert full_trainer.global_step == 7
    assert_same_training_state(full, full_trainer, resumed, resumed_trainer)


class _Losses(L.Callback):
    """Each training batch's loss, as the module returned it."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_training_curves_hold_window_means_and_validations(tiny, tmp_path):
    bundle = tiny("llama")
    module = EditorTrainModule(bundle, _editor(), lr=2e-2)
    curves, losses = TrainingCurves(tmp_path / "out", every=2), _Losses()
    _trainer(6, [curves, losses], val_every=3).fit(module, datamodule=_data(tmp_path))
    rows = _read_csv(tmp_path / "out" / "training_curves.csv")
    assert [int(r["step"]) for r in rows] == [2, 3, 4, 6]
    by_step = {int(r["step"]): r for r in rows}
    for step in (2, 4, 6):  # the mean of the window's two batches
        window = losses.losses[step - 2: step]
        assert float(by_step[step]["train/loss"]) == pytest.approx(sum(window) / 2, rel=1e-6)
    for step in (3, 6):
        assert 0.0 <= float(by_step[step]["val/reliability"]) <= 1.0 and by_step[step]["val/loss"]
    assert by_step[3]["train/loss"] == "" and by_step[2]["val/reliability"] == ""
    assert float(by_step[4]["train/lr"]) == pytest.approx(2e-2)  # the step's lr, plotted on its own
    assert (tmp_path / "out" / "training_curves.png").stat().st_size > 1000


def test_training_curves_survive_a_resume(tiny, tmp_path):
    """A run resumed mid-window writes the same curves as the uninterrupted run."""
    bundle = tiny("llama")

    def fit(max_steps: int, out: str, ckpt_path=None, every: int | None = None):
        L.seed_everything(0)
        module = EditorTrainModule(bundle, _editor(), lr=2e-2)
        callbacks = [TrainingCurves(tmp_path / out, every=2)]
        if every:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every,
                                             save_top_k=-1, filename="{step}"))
        trainer = _trainer(max_steps, callbacks, val_every=2)
        trainer.fit(module, datamodule=_data(tmp_path), ckpt_path=ckpt_path)

    fit(7, "full")
    fit(3, "first", every=3)
    fit(7, "resumed", ckpt_path=tmp_path / "ckpt" / "step=3.ckpt")
    full = (tmp_path / "full" / "training_curves.csv").read_text()
    assert [r["step"] for r in _read_csv(tmp_path / "full" / "training_curves.csv")] == ["2", "4", "6", "7"]
    assert (tmp_path / "resumed" / "training_curves.csv").read_text() == full


def test_margin_annealing_feeds_the_validation_success_rate():
    calls = []
    editor = SimpleNamespace(anneal_margin=lambda rate: calls.append(rate) or 0.5)
    module = SimpleNamespace(editor=editor)
    trainer = SimpleNamespace(sanity_checking=False, callback_metrics={})
    callback = MarginAnnealing("val/reliability")
    callback.setup(trainer, module, "fit")
    callback.on_validation_end(trainer, module)  # nothing logged yet: nothing to do
    trainer.callback_metrics["val/reliability"] = torch.tensor(0.95)
    callback.on_validation_end(trainer, module)
    assert calls == [pytest.approx(0.95)]
    with pytest.raises(TypeError, match="anneal_margin"):
        callback.setup(trainer, SimpleNamespace(editor=_editor()), "fit")


# ------------------------------------------------------------------------------------ Hydra


def _compose(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def _tiny_overrides(tmp_path: Path, extra: list[str] = ()) -> list[str]:
    write_easyedit(tmp_path / "train.json", 8)
    write_easyedit(tmp_path / "val.json", 6, offset=8)
    return [
        "model=tiny_llama", "data=counterfact_train", "method=learned_step", "fit=editor",
        f"hydra.searchpath=[file://{TEST_CONFIGS}]", f"paths.data_dir={tmp_path}",
        "data.train.path=train.json", "data.val.path=val.json", "data.val.offset=0", "data.val.limit=4",
        "data.test.path=val.json", "data.test.offset=4", "data.test.limit=2", "data.train_batch_size=2",
        "data.val_batch_size=2", "module.scoring.probability_comparison=false",
        "fit.module.lr=0.1", "fit.trainer.max_steps=4", "fit.trainer.val_check_interval=2",
        "fit.trainer.log_every_n_steps=1",
        "logger=csv", "callbacks=none", *extra,
    ]


def test_only_trainable_experiments_fit():
    """The ``fit`` node (no method name) decides whether an experiment trains; ft/rome/memit/kn don't."""
    for path in sorted((CONFIGS / "experiment").glob("*.yaml")):
        cfg = _compose([f"experiment={path.stem}"])
        trainable = issubclass(hydra.utils.get_class(cfg.method._target_), LearnedEditor)
        assert (cfg.get("fit") is not None) == trainable, path.stem
        if trainable:
            assert cfg.data.get("train") is not None and cfg.data.get("val") is not None, path.stem


def _run(cfg, out: Path) -> dict[str, float]:
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    OmegaConf.resolve(cfg.paths)
    return run(cfg)


def test_train_then_test_then_test_only_then_resume(tmp_path, trust_learned_step):
    """``fit: editor`` trains, then the edit loop tests the best checkpoint's editor; ``ckpt_path``
    tests that checkpoint without training (same numbers); ``fit.resume_from`` continues training."""
    cfg = _compose(_tiny_overrides(tmp_path))
    assert cfg.fit.module._target_.endswith("EditorTrainModule")
    summary = _run(cfg, tmp_path / "train")
    ckpt_dir = tmp_path / "train" / "checkpoints"
    best = [p for p in ckpt_dir.glob("editor-*.ckpt")]
    assert len(best) == 1 and (ckpt_dir / "last.ckpt").exists()
    assert "post/reliability" in summary and "post/locality" in summary
    metrics = (tmp_path / "train" / "csv" / "metrics.csv").read_text()
    assert "train/loss_edit" in metrics and "val/reliability" in metrics and "post/reliability" in metrics
    assert len((tmp_path / "train" / "records.jsonl").read_text().splitlines()) == 2
    curves = (tmp_path / "train" / "training_curves.csv").read_text().splitlines()
    assert curves[0].startswith("step,") and "train/loss_edit" in curves[0] and "val/reliability" in curves[0]

    only = _compose(_tiny_overrides(tmp_path, [f"ckpt_path={best[0]}"]))
    again = _run(only, tmp_path / "test_only")
    assert not (tmp_path / "test_only" / "checkpoints").exists()  # no training happened
    for key, value in summary.items():
        if key.startswith(("pre/", "post/")):
            assert again[key] == pytest.approx(value, abs=1e-9), key

    assert read_editor_checkpoint(ckpt_dir / "last.ckpt")["global_step"] == 4

    resumed = _compose(_tiny_overrides(tmp_path, [f"fit.resume_from={ckpt_dir / 'last.ckpt'}",
                                                  "fit.trainer.max_steps=6", "fit.test_weights=last"]))
    _run(resumed, tmp_path / "resumed")
    last = read_editor_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 6
    resumed_curves = (tmp_path / "resumed" / "training_curves.csv").read_text().splitlines()
    assert resumed_curves[: len(curves)] == curves and len(resumed_curves) > len(curves)  # continued


def test_init_from_starts_a_new_run_from_saved_editor_weights(tiny, tmp_path, caplog):
    """``fit.init_from`` loads a checkpoint's editor weights into a fresh run: step 0, a new
    optimizer with this run's learning rate (a resume would restore the old one); combined with
    ``fit.resume_from`` it is refused."""
    _run(_compose(_tiny_overrides(tmp_path)), tmp_path / "first")
    source = tmp_path / "first" / "checkpoints" / "last.ckpt"
    saved = editor_state(read_editor_checkpoint(source))
    cfg = _compose(_tiny_overrides(tmp_path, [f"fit.init_from={source}", "fit.trainer.max_steps=2",
                                              "fit.module.lr=0.0", "fit.test_weights=last"]))
    with caplog.at_level(logging.INFO, logger="editlab.train"):
        _run(cfg, tmp_path / "second")
    assert any("editor weights of" in r.getMessage() for r in caplog.records)
    # the source trained on the same order (seed 0): the new run, which re-reads it from its first
    # record, says so; with another seed it does not
    assert training_order(source) == {"seed": 0, "epoch": 0, "batches": 4}
    repeated = [r for r in caplog.records if "re-reads" in r.getMessage()]
    assert len(repeated) == 1 and repeated[0].levelno == logging.WARNING and "seed 0" in repeated[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="editlab.train"):
        _run(_compose(_tiny_overrides(tmp_path, [f"fit.init_from={source}", "fit.trainer.max_steps=1",
                                                 "seed=1"])), tmp_path / "third")
    assert any("editor weights of" in r.getMessage() for r in caplog.records)
    assert not any("re-reads" in r.getMessage() for r in caplog.records)
    second = read_editor_checkpoint(tmp_path / "second" / "checkpoints" / "last.ckpt")
    assert second["global_step"] == 2  # counted from 0, not from the source's step 4
    assert [g["lr"] for g in second["optimizer_states"][0]["param_groups"]][0] == 0.0
    # at lr 0 the parameters are exactly the source's (a fresh editor's differ); only the running
    # statistics (buffers) move on
    state = editor_state(second)
    assert set(state) == set(saved)
    editor = _editor()
    editor.bind(tiny("llama").model)
    params = [k for k, _ in editor.named_parameters()]
    fresh = editor.state_dict()
    assert params and all(torch.equal(state[k], saved[k]) for k in params)
    assert any(not torch.equal(fresh[k], saved[k]) for k in params)
    with pytest.raises(ValueError, match="not both"):
        _run(_compose(_tiny_overrides(tmp_path, [f"fit.init_from={source}", f"fit.resume_from={source}"])),
             tmp_path / "both")


def test_last_checkpoint_is_the_latest_validation_not_the_best(tmp_path, caplog):
    """last.ckpt (what ``fit.resume_from`` continues) holds the state of the latest validation even
    when it is not the best; the test stage still takes the best one.  Monitoring ``step`` in
    ``min`` mode makes the first validation (step 2) the best for good."""
    cfg = _compose(_tiny_overrides(tmp_path, ["fit.callbacks.checkpoint.monitor=step",
                                              "fit.callbacks.checkpoint.mode=min"]))
    with caplog.at_level(logging.INFO, logger="editlab.train"):
        _run(cfg, tmp_path / "train")
    ckpt_dir = tmp_path / "train" / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.glob("*.ckpt")) == ["editor-step2.ckpt", "last.ckpt"]
    assert read_editor_checkpoint(ckpt_dir / "editor-step2.ckpt")["global_step"] == 2
    assert read_editor_checkpoint(ckpt_dir / "last.ckpt")["global_step"] == 4
    tested = [r.getMessage() for r in caplog.records if "testing the" in r.getMessage()]
    assert len(tested) == 1 and "best checkpoint" in tested[0] and "editor-step2.ckpt" in tested[0]


@pytest.mark.parametrize("experiment,extra", [
    ("mend_smollm2_counterfact", ["method.rank=8"]),
    ("malmen_smollm2_counterfact", ["method.rank=8", "method.edit_lr=1e-2"]),
    ("ke_smollm2_counterfact", ["method.hidden_dim=8", "method.condition_dim=16"]),
    ("serac_smollm2_counterfact", [f"method.encoder={{_target_:{TINY_ENCODER}}}"]),
    ("serac_smollm2_zsre", [f"method.encoder={{_target_:{TINY_ENCODER}}}", "method.cross_attend=true"]),
])
def test_trainable_experiments_run_end_to_end(tmp_path, experiment, extra):
    """The MEND, MALMEN, KE and SERAC experiments (train, then test in the edit loop) on a tiny model, few
    steps (the zsRE experiment reads the same EasyEdit-schema fixture: only its data paths differ)."""
    drop = ("method=", "fit=", "data=", "model=")
    overrides = [o for o in _tiny_overrides(tmp_path) if not o.startswith(drop)]
    if experiment.endswith("_zsre"):  # the fixture is in CounterFact's EasyEdit schema
        overrides += [f"data.{split}._target_=editlab.data.loaders.load_counterfact_easyedit"
                      for split in ("train", "val", "test")]
        overrides.append("module.scoring.generation_framing=plain")  # the tiny tokenizer has no chat template
    cfg = _compose([f"experiment={experiment}", "model=tiny_llama", *overrides,
                    "fit.trainer.accumulate_grad_batches=1", "fit.module.lr=1e-3", *extra])
    summary = _run(cfg, tmp_path / "out")
    assert "post/reliability" in summary and "post/locality" in summary
    checkpoint = read_editor_checkpoint(next((tmp_path / "out" / "checkpoints").glob("editor-*.ckpt")))
    assert checkpoint["editor"]["config"]["_target_"] == cfg.method._target_
    metrics = (tmp_path / "out" / "csv" / "metrics.csv").read_text()
    assert "val/reliability" in metrics and "train/loss_loc" in metrics


# ------------------------------------------------------------------------------------ DDP (gloo)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE), str(ROOT)]))
    env.pop("LOCAL_RANK", None)
    return env


def _cli(tmp_path: Path, out: Path, dump: Path, extra: list[str], method: list[str] = ()) -> list[str]:
    replaced = ("fit.trainer.max_steps", "method=", "fit.module.lr") if method else ("fit.trainer.max_steps",)
    overrides = [o for o in _tiny_overrides(tmp_path) if not o.startswith(replaced)]
    return [
        # one record per validation batch: val/loss (batch edits) then does not depend on the grouping
        *overrides, *method, "fit.trainer.max_steps=4", "fit.trainer.val_check_interval=4",
        "data.val_batch_size=1", "logger=none", "+fit.callbacks.dump._target_=learned_step.DumpEditor",
        f"+fit.callbacks.dump.dirpath={dump}", f"hydra.run.dir={out}", *extra,
    ]


def _check_ranks(dump: Path, tiny, tmp_path: Path, world: int, make_editor=_editor) -> None:
    """Identical editors on all ranks; val records split without overlap; logged val metrics
    equal on all ranks and equal to one process validating the same editor on all records."""
    ranks = [torch.load(dump / f"rank{r}.pt", weights_only=True) for r in range(world)]
    assert all(r["world_size"] == world and r["global_step"] == 4 for r in ranks)
    for other in ranks[1:]:
        assert other["editor"].keys() == ranks[0]["editor"].keys()
        for k, v in ranks[0]["editor"].items():
            assert torch.equal(other["editor"][k], v), k
    ids = [i for r in ranks for i in r["val_ids"]]
    assert sorted(ids) == list(range(8, 12)) and all(r["val_ids"] for r in ranks)  # 4 val records, split
    val = {k: v for k, v in ranks[0]["metrics"].items() if k.startswith("val/")}
    assert all({k: v for k, v in r["metrics"].items() if k.startswith("val/")} == val for r in ranks[1:])

    bundle = tiny("llama")
    editor = make_editor()
    module = EditorTrainModule(bundle, editor)
    editor.load_state_dict(ranks[0]["editor"])
    dm = EditDataModule(val=partial(load_counterfact_easyedit, tmp_path / "val.json", limit=4),
                        val_batch_size=1)
    single = L.Trainer(accelerator="cpu", devices=1, inference_mode=False, logger=False,
                       enable_progress_bar=False, enable_model_summary=False
                       ).validate(module, datamodule=dm, verbose=False)[0]
    for key in ("val/reliability", "val/generalization", "val/locality", "val/loss", "val/loss_loc"):
        assert val[key] == pytest.approx(single[key], rel=1e-5, abs=1e-6), key


DDP_METHODS = {  # method -> (overrides, editor to load the ranks' state into)
    "learned_step": ([], _editor),
    "mend": (["method=mend", "method.rank=8", "fit.module.lr=1e-3"], partial(MEND, rank=8)),
    "ke": (["method=ke", "method.hidden_dim=8", "method.condition_dim=16", "fit.module.lr=1e-3"],
           partial(KE, hidden_dim=8, condition_dim=16)),
    "serac": (["method=serac", f"method.encoder={{_target_:{TINY_ENCODER}}}", "fit.module.lr=1e-3"],
              lambda: SERAC(encoder=SentenceEncoder.tiny())),
    "malmen": (["method=malmen", "method.rank=8", "method.edit_lr=1e-2", "fit.module.lr=1e-3"],
               partial(MALMEN, rank=8, edit_lr=1e-2)),
    "rledit": (["method=rledit", "method.rank=8", "method.edits_per_step=1", "method.episode_steps=2",
                "method.factor_positions=all", "fit.module.lr=1e-3"],
               partial(RLEdit, rank=8, edits_per_step=1, episode_steps=2, factor_positions="all")),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(DDP_METHODS))
def test_ddp_two_gloo_processes(tiny, tmp_path, method):
    """``trainer=ddp`` with 2 CPU processes (Lightning launches the second), fit then test; MEND
    too (its normalisation statistics are buffers it replaces at every training call), KE (its
    Lagrange multiplier is a trained parameter too) and SERAC (a trained classifier and
    counterfactual model, edits by memory).  The default suite trains MEND and KE on 2 forked
    processes in seconds (test_ddp_train.py)."""
    out, dump = tmp_path / "ddp", tmp_path / "dump"
    choice, make_editor = DDP_METHODS[method]
    launch = ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]
    cmd = [sys.executable, "-m", "editlab.train", *_cli(tmp_path, out, dump, launch, choice)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    _check_ranks(dump, tiny, tmp_path, world=2, make_editor=make_editor)
    rows = [json.loads(x) for f in sorted(out.glob("records*.jsonl")) for x in f.read_text().splitlines()]
    assert sorted(r["record_id"] for r in rows) == [12, 13]  # the test split, each record once


@pytest.mark.slow
@pytest.mark.parametrize("method", ["learned_step", "malmen", "rledit"])
def test_torchrun_two_nodes(tiny, tmp_path, method):
    """Two "nodes" on localhost launched with torchrun (one process each, separate run dirs: only
    rank 0 holds the checkpoints, the best editor is broadcast to the other node for the test);
    MALMEN (its gradient reaches the parameters inside its own autograd function) and RLEdit (an
    episode of sequential edits per batch) as well as the plain learned editor."""
    dump, port = tmp_path / "dump", _free_port()
    choice, make_editor = DDP_METHODS[method]
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
               "-m", "editlab.train",
               *_cli(tmp_path, tmp_path / f"node{node}", dump,
                     ["trainer=ddp", "trainer.num_nodes=2", "trainer.devices=1", "trainer.accelerator=cpu"], choice)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-4000:]
    _check_ranks(dump, tiny, tmp_path, world=2, make_editor=make_editor)
    assert list((tmp_path / "node0" / "checkpoints").glob("*.ckpt"))
    # each test record scored once, on one node; the summary (node 0's) averages both nodes' records
    files = sorted(tmp_path.glob("node*/records*.jsonl"))
    rows = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert sorted(r["record_id"] for r in rows) == [12, 13]
    summary = json.loads((tmp_path / "node0" / "summary.json").read_text())
    per_record = [r["post"]["reliability"] for r in rows]
    assert summary["post/reliability"] == pytest.approx(sum(per_record) / len(per_record), abs=1e-9)


def test_cosine_lr_schedule_decays_every_group_to_its_floor(tiny, tmp_path):
    """``lr_schedule="cosine"``: each optimizer group's learning rate follows the half cosine from its
    own value to ``min_lr_ratio`` of it at ``max_steps``; ``constant`` leaves it; no max_steps: error."""
    bundle = tiny("llama")
    seen, logged = [], []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append([g["lr"] for g in trainer.optimizers[0].param_groups])

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.append(float(trainer.callback_metrics["train/lr"]))

    module = EditorTrainModule(bundle, _editor(), lr=1e-2, lr_schedule="cosine", min_lr_ratio=0.2)
    _trainer(4, [Record()]).fit(module, datamodule=_data(tmp_path))
    base = seen[0]
    for step, lrs in enumerate(seen):
        factor = 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * step / 4))
        assert lrs == pytest.approx([lr * factor for lr in base])
    final = [g["lr"] for g in module.trainer.optimizers[0].param_groups]
    assert final == pytest.approx([0.2 * lr for lr in base])
    assert logged == pytest.approx([lrs[0] for lrs in seen])  # train/lr: the step's own lr
    seen.clear()
    constant = EditorTrainModule(bundle, _editor(), lr=1e-2)
    _trainer(3, [Record()]).fit(constant, datamodule=_data(tmp_path))
    assert all(lrs == seen[0] for lrs in seen)
    with pytest.raises(ValueError, match="max_steps"):
        _trainer(-1, max_epochs=1).fit(EditorTrainModule(bundle, _editor(), lr_schedule="cosine"),
                                       datamodule=_data(tmp_path))
    with pytest.raises(ValueError, match="lr_schedule"):
        EditorTrainModule(bundle, _editor(), lr_schedule="linear")
