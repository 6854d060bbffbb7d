"""Training MEND, KE, MALMEN and RLEdit with DDP on 2 gloo CPU processes, in the default suite (seconds):
the ranks train on disjoint shards of the training split, finish with the same editor (gradients
all-reduced, buffers from rank 0), which training changed, and rank 0's checkpoint rebuilds that editor.

The processes are forked by Lightning (``strategy="ddp_fork"``: a real gloo process group and a
``DistributedDataParallel`` editor, without a fresh interpreter importing torch per rank: about a
second per method, where ``ddp_spawn`` takes ~25 s and cannot pickle KE's weight-normalised layers,
and the train entry ~40 s).  The end-to-end launch through ``python -m editlab.train trainer=ddp``
(the second process started by Lightning, validation split over ranks, then the edit loop) is the
slow ``test_ddp_two_gloo_processes`` in test_editor_train.py."""

from __future__ import annotations

import multiprocessing
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from editlab.data.datamodule import EditDataModule
from editlab.data.loaders import load_counterfact_easyedit
from editlab.lit.checkpoint import load_editor, read_editor_checkpoint
from editlab.lit.editor_train import EditorTrainModule
from editlab.methods.ke import KE
from editlab.methods.malmen import MALMEN
from editlab.methods.mend import MEND
from editlab.methods.rledit import RLEdit

from learned_step import write_easyedit

EDITORS = {
    "mend": (lambda: MEND(rank=8), {"_target_": "editlab.methods.mend.MEND", "rank": 8}),
    "ke": (lambda: KE(hidden_dim=8, condition_dim=16),
           {"_target_": "editlab.methods.ke.KE", "hidden_dim": 8, "condition_dim": 16}),
    # its gradient reaches the parameters in the backward of its own autograd function (step 3)
    "malmen": (lambda: MALMEN(rank=8, edit_lr=1e-2), {"_target_": "editlab.methods.malmen.MALMEN", "rank": 8,
                                                      "edit_lr": 1e-2}),
    # a batch of 2 records is an episode of 2 steps of 1 edit (factors at every position: a
    # one-token answer alone gives one row, too few for the normalisation statistics)
    "rledit": (lambda: RLEdit(rank=8, edits_per_step=1, episode_steps=2, factor_positions="all"),
               {"_target_": "editlab.methods.rledit.RLEdit", "rank": 8, "edits_per_step": 1, "episode_steps": 2,
                "factor_positions": "all"}),
}


def _state(editor) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in editor.state_dict().items()}


class _PerRank(L.Callback):
    """Per rank: the editor at the start and the end of fitting and the training records it read,
    in ``<dirpath>/rank<r>.pt``."""

    def __init__(self, dirpath: Path) -> None:
        self.dirpath = dirpath
        self.train_ids: list[int] = []
        self.start: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = _state(pl_module.editor)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.train_ids.extend(r.record_id for r in batch)

    def on_fit_end(self, trainer, pl_module) -> None:
        torch.save({"world_size": trainer.world_size, "global_step": trainer.global_step,
                    "train_ids": self.train_ids, "start": self.start, "end": _state(pl_module.editor)},
                   self.dirpath / f"rank{trainer.global_rank}.pt")


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="ddp_fork needs fork")
@pytest.mark.parametrize("method", list(EDITORS))
def test_two_gloo_processes_train_one_editor(tiny, tmp_path, method):
    make_editor, config = EDITORS[method]
    bundle = tiny("llama")
    torch.manual_seed(0)
    module = EditorTrainModule(bundle, make_editor(), lr=1e-2, val_losses=False, editor_config=config)
    data = EditDataModule(train=partial(load_counterfact_easyedit, write_easyedit(tmp_path / "train.json", 8)),
                          train_batch_size=2)
    dump, ckpts = tmp_path / "ranks", tmp_path / "ckpt"
    dump.mkdir()
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_fork", max_steps=2, limit_val_batches=0,
        num_sanity_val_steps=0, inference_mode=False, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path),
        callbacks=[_PerRank(dump), ModelCheckpoint(dirpath=str(ckpts), save_last=True, save_top_k=0)],
    )
    trainer.fit(module, datamodule=data)

    ranks = [torch.load(dump / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [(r["world_size"], r["global_step"]) for r in ranks] == [(2, 2), (2, 2)]
    # each rank read 2 batches of 2 records; together one pass over disjoint shards
    assert all(len(r["train_ids"]) == 4 for r in ranks)
    assert sorted(ranks[0]["train_ids"] + ranks[1]["train_ids"]) == list(range(8))
    # the same editor on both ranks at the end (parameters and buffers), and training changed it
    end, other = ranks[0]["end"], ranks[1]["end"]
    assert end.keys() == other.keys()
    for key, value in end.items():
        assert torch.equal(value, other[key]), key
    assert any(not torch.equal(value, ranks[0]["start"][key]) for key, value in end.items())
    # rank 0's checkpoint rebuilds that editor onto the model
    checkpoint = read_editor_checkpoint(ckpts / "last.ckpt")
    assert checkpoint["global_step"] == 2 and checkpoint["editor"]["config"]["_target_"] == config["_target_"]
    loaded = _state(load_editor(ckpts / "last.ckpt", bundle))
    assert loaded.keys() == end.keys()
    for key, value in end.items():
        assert torch.equal(loaded[key], value), key
