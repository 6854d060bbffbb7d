"""RLEdit trained by EditorTrainModule (editlab/lit/editor_train.py): episodes arrive as training
batches, the editor changes and the base model does not, and a resumed run ends bit-exactly where
an uninterrupted one does."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from editlab.data.datamodule import EditDataModule
from editlab.data.loaders import load_counterfact_easyedit
from editlab.lit.editor_train import EditorTrainModule
from editlab.methods.rledit import RLEdit

from conftest import assert_same_training_state, assert_state_equal, state_copy
from learned_step import write_easyedit

CONFIG = {"_target_": "editlab.methods.rledit.RLEdit", "rank": 8, "edits_per_step": 2, "episode_steps": 2,
          "factor_positions": "all", "edit_lr": 1e-3}


def _editor() -> RLEdit:
    kwargs = {k: v for k, v in CONFIG.items() if k != "_target_"}
    return RLEdit(**kwargs)


def _data(tmp_path):
    """Episodes of 2 steps of 2 edits: training batches of 4 records; 2 batches per epoch."""
    train = write_easyedit(tmp_path / "train.json", 8)
    val = write_easyedit(tmp_path / "val.json", 4, offset=8)
    return EditDataModule(train=partial(load_counterfact_easyedit, train), val=partial(load_counterfact_easyedit, val),
                          train_batch_size=4, val_batch_size=2)


def _trainer(max_steps: int, callbacks=(), val_every: int | None = None) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, inference_mode=False, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        val_check_interval=val_every, check_val_every_n_epoch=None if val_every else 1,
        limit_val_batches=None if val_every else 0, callbacks=list(callbacks), gradient_clip_val=1.0,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
    )


def test_training_steps_change_the_editor_and_not_the_base_model(tiny, tmp_path):
    bundle = tiny("llama")
    base = state_copy(bundle.model)
    torch.manual_seed(0)
    module = EditorTrainModule(bundle, _editor(), lr=1e-2, editor_config=CONFIG)
    before = {k: v.detach().clone() for k, v in module.editor.state_dict().items()}
    trainer = _trainer(3, val_every=2)
    trainer.fit(module, datamodule=_data(tmp_path))
    after = module.editor.state_dict()
    assert trainer.global_step == 3
    changed = [k for k in after if not torch.equal(before[k], after[k])]
    assert "edit_lrs" in changed and "log_lambdas" in changed and any(k.endswith(".count") for k in changed)
    assert {"train/loss", "train/loss_memory", "train/loss_reg", "val/loss", "val/reliability"} <= set(
        trainer.callback_metrics)
    assert_state_equal(bundle.model, base)
    assert all(p.grad is None for p in bundle.model.parameters())


@pytest.mark.parametrize("resume_step", [1, 2])  # mid-epoch and at the epoch's end (2 episodes an epoch)
def test_resume_reaches_the_uninterrupted_state(tiny, tmp_path, resume_step):
    """Editor weights, normalisation statistics and Adam moments after 3 steps, resumed from a
    checkpoint after ``resume_step``, equal those of an uninterrupted run bit for bit."""
    bundle = tiny("llama")

    def fit(max_steps: int, ckpt_path=None, every: int | None = None):
        L.seed_everything(0)
        module = EditorTrainModule(bundle, _editor(), lr=1e-2, editor_config=CONFIG)
        callbacks = [ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every, save_top_k=-1,
                                     filename="{step}")] if every else []
        trainer = _trainer(max_steps, callbacks, val_every=2)
        trainer.fit(module, datamodule=_data(tmp_path), ckpt_path=ckpt_path)
        return module, trainer

    full, full_trainer = fit(3)
    fit(resume_step, every=resume_step)
    resumed, resumed_trainer = fit(3, ckpt_path=tmp_path / "ckpt" / f"step={resume_step}.ckpt")
    assert full_trainer.global_step == 3
    assert_same_training_state(full, full_trainer, resumed, resumed_trainer)


def test_the_experiment_trains_then_edits_a_stream(tmp_path):
    """experiment=rledit_smollm2_counterfact on a tiny model (its own edit_params and sizes swapped
    for the tiny model's): training episodes, then the test stream with curves."""
    from test_editor_train import _compose, _run, _tiny_overrides

    drop = ("method=", "fit=", "data=", "model=", "data.train_batch_size", "data.val_batch_size")
    overrides = [o for o in _tiny_overrides(tmp_path) if not o.startswith(drop)]
    cfg = _compose(["experiment=rledit_smollm2_counterfact", "model=tiny_llama", *overrides,
                    "method.edit_params=null", "method.rank=8", "method.factor_positions=all",
                    "method.edits_per_step=2", "method.episode_steps=2", "data.train_batch_size=4",
                    "data.val_batch_size=2", "fit.module.val_edits_per_batch=2", "fit.module.lr=1e-3",
                    "stream.edits=2", "stream.batch_size=1", "stream.eval_every=1"])
    summary = _run(cfg, tmp_path / "out")
    assert "final/reliability" in summary and "post/locality" in summary
    assert (tmp_path / "out" / "curves.csv").is_file()
    metrics = (tmp_path / "out" / "csv" / "metrics.csv").read_text()
    assert "train/loss_memory" in metrics and "val/reliability" in metrics
