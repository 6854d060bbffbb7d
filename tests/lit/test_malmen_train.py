"""Training MALMEN with EditorTrainModule on a tiny model: a few steps change the editor and never
the model, its checkpoint rebuilds it through editlab.lit.checkpoint, resuming ends bit-exactly
where an uninterrupted run ends, and validation edits each batch as one batch edit."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from editlab.data.datamodule import EditDataModule
from editlab.data.loaders import load_counterfact_easyedit
from editlab.lit.checkpoint import load_editor, read_editor_checkpoint, trained_editor_classes
from editlab.lit.editor_train import EditorTrainModule
from editlab.methods.malmen import MALMEN

from conftest import assert_same_training_state, assert_state_equal, state_copy
from learned_step import write_easyedit

CONFIG = {"_target_": "editlab.methods.malmen.MALMEN", "rank": 8, "edit_lr": 1e-2, "capture_batch_size": 2}


def _editor() -> MALMEN:
    return MALMEN(rank=8, edit_lr=1e-2, capture_batch_size=2)


def _data(tmp_path: Path) -> EditDataModule:
    train = write_easyedit(tmp_path / "train.json", 12)
    val = write_easyedit(tmp_path / "val.json", 4, offset=12)
    return EditDataModule(train=partial(load_counterfact_easyedit, train), val=partial(load_counterfact_easyedit, val),
                          train_batch_size=3, val_batch_size=4)


def _trainer(max_steps: int, callbacks=()) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, inference_mode=False, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     val_check_interval=2, check_val_every_n_epoch=None, gradient_clip_val=1.0,
                     callbacks=list(callbacks), enable_checkpointing=bool(callbacks))


def test_malmen_is_a_checkpoint_buildable_editor():
    assert trained_editor_classes()["editlab.methods.malmen.MALMEN"] is MALMEN


def test_training_then_checkpoint_rebuilds_the_editor(tiny, tmp_path):
    bundle = tiny("llama")
    before = state_copy(bundle.model)
    L.seed_everything(0)
    module = EditorTrainModule(bundle, _editor(), lr=1e-3, val_edits_per_batch=None, editor_config=CONFIG)
    start = {k: v.clone() for k, v in module.editor.state_dict().items()}
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    trainer = _trainer(4, [ckpt])
    trainer.fit(module, datamodule=_data(tmp_path))
    assert trainer.global_step == 4
    metrics = trainer.callback_metrics
    assert {"val/reliability", "val/locality", "val/loss", "train/loss_loc"} <= set(metrics)
    changed = [k for k, v in module.editor.state_dict().items() if not torch.equal(v, start[k])]
    assert any(k.endswith(".B") for k in changed) and any(k.endswith("normaliser.count") for k in changed)
    assert_state_equal(bundle.model, before)
    assert all(p.grad is None for p in bundle.model.parameters())

    checkpoint = read_editor_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert checkpoint["editor"]["config"] == CONFIG
    loaded = load_editor(tmp_path / "ckpt" / "last.ckpt", bundle)
    assert isinstance(loaded, MALMEN) and not loaded.training
    for k, v in module.editor.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    records = load_counterfact_easyedit(tmp_path / "val.json")
    a = module.editor.compute_deltas(bundle.model, bundle.tokenizer, records)
    b = loaded.compute_deltas(bundle.model, bundle.tokenizer, records)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("resume_step", [3])  # mid-epoch (3 of 4 batches)
def test_resume_reaches_the_uninterrupted_state(tiny, tmp_path, resume_step):
    """Editor weights, normalisation statistics and Adam moments after resuming equal those of an
    uninterrupted run, bit for bit (one CPU thread, the same operations in the same order)."""
    bundle = tiny("llama")

    def fit(max_steps: int, ckpt_path=None, every: int | None = None):
        L.seed_everything(0)
        module = EditorTrainModule(bundle, _editor(), lr=1e-3, val_edits_per_batch=None, editor_config=CONFIG)
        callbacks = [ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every, save_top_k=-1,
                                     filename="{step}")] if every else []
        trainer = _trainer(max_steps, callbacks)
        trainer.fit(module, datamodule=_data(tmp_path), ckpt_path=ckpt_path)
        return module, trainer

    full, full_trainer = fit(6)
    fit(resume_step, every=resume_step)
    resumed, resumed_trainer = fit(6, ckpt_path=tmp_path / "ckpt" / f"step={resume_step}.ckpt")
    assert full_trainer.global_step == 6
    assert_same_training_state(full, full_trainer, resumed, resumed_trainer)
