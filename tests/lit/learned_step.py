"""A small but real trainable editor for the training tests, and helpers they share.

:class:`LearnedStep` edits ``W ← W − exp(log_lr) · (P ∘ ∇W / s)``: one gradient step on the edit
loss with a learned step size, a learned elementwise preconditioner ``P = exp(U Vᵀ)`` of rank
``rank`` (near 1 at initialisation) and a gradient scale ``s`` kept as a running mean of ``|∇W|``
in a buffer (updated in training mode only, like MEND's normalisation statistics), so the tests
also cover editor buffers under DDP.  Trained with the default MEND objective of
:class:`~editlab.methods.hyper.TrainableEditor`, it learns: the step size grows until the edit
takes while the locality KL holds it back.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import torch
from torch import nn

from editlab.methods.hyper import TrainableEditor, edit_gradients

SUBJECTS = [
    ("France", "Paris", "Rome"), ("Germany", "Berlin", "Tokyo"), ("Italy", "Rome", "Madrid"),
    ("Spain", "Madrid", "Paris"), ("Japan", "Tokyo", "London"), ("England", "London", "Berlin"),
    ("Canada", "Ottawa", "Moscow"), ("China", "Beijing", "Cairo"), ("Russia", "Moscow", "Athens"),
    ("Egypt", "Cairo", "Warsaw"), ("Greece", "Athens", "Ottawa"), ("Poland", "Warsaw", "Beijing"),
]


def easyedit_records(n: int, offset: int = 0) -> list[dict]:
    """``n`` CounterFact records in EasyEdit's schema (counterfact-{train,val}.json)."""
    out = []
    for i in range(offset, offset + n):
        country, true, new = SUBJECTS[i % len(SUBJECTS)]
        other = SUBJECTS[(i + 1) % len(SUBJECTS)]
        out.append({
            "case_id": i, "prompt": f"The capital of {country} is", "subject": country, "target_new": new,
            "ground_truth": true, "rephrase_prompt": f"{country} has its capital in",
            "locality_prompt": f"The capital of {other[0]} is", "locality_ground_truth": other[1],
        })
    return out


def write_easyedit(path: Path, n: int, offset: int = 0) -> Path:
    path.write_text(json.dumps(easyedit_records(n, offset)))
    return path


class LearnedStep(TrainableEditor):
    """``W ← W − exp(log_lr) · (exp(U Vᵀ) ∘ ∇W / s)`` per edited weight (see the module docstring)."""

    def __init__(self, edit_params=None, rank: int = 2, init_lr: float = 1e-3, seed: int = 0,
                 c_edit: float = 1.0, c_loc: float = 1.0, base_model: str | None = None) -> None:
        super().__init__(edit_params, c_edit=c_edit, c_loc=c_loc, base_model=base_model)
        self.rank = rank
        self.init_lr = init_lr
        self.seed = seed
        self.log_lr = nn.ParameterDict()
        self.u = nn.ParameterDict()
        self.v = nn.ParameterDict()

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "_")

    def build(self, model: nn.Module, params: dict[str, nn.Parameter]) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        for name, param in params.items():
            key, (rows, cols) = self._key(name), param.shape
            self.log_lr[key] = nn.Parameter(torch.tensor(math.log(self.init_lr)))
            self.u[key] = nn.Parameter(0.01 * torch.randn(rows, self.rank, generator=gen))
            self.v[key] = nn.Parameter(0.01 * torch.randn(cols, self.rank, generator=gen))
            self.register_buffer(f"scale_{key}", torch.zeros(()))
            self.register_buffer(f"count_{key}", torch.zeros((), dtype=torch.long))
        self.to(next(iter(params.values())).device)

    def edited_parameters(self, model, batch, cond=None):
        grads = edit_gradients(model, self.edit_params, batch)
        named = dict(model.named_parameters())
        new = {}
        for name in self.edit_params:
            key, grad = self._key(name), grads[name].float()
            size = grad.abs().mean()
            scale, count = getattr(self, f"scale_{key}"), getattr(self, f"count_{key}")
            if self.training:
                with torch.no_grad():
                    count += 1
                    scale += (size - scale) / count
            norm = scale if int(count) > 0 else size
            precondition = torch.exp(self.u[key] @ self.v[key].t())
            step = torch.exp(self.log_lr[key]) * precondition * grad / norm.clamp(min=1e-12)
            new[name] = named[name].detach() - step.to(named[name].dtype)
        return new


class DumpEditor(L.Callback):
    """Per rank, at the end of fitting: the editor's state, the ids of the validation records this
    rank scored, and the logged metrics, in ``<dirpath>/rank<r>.pt``."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.val_ids: list = []

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.val_ids = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                dataloader_idx=0) -> None:
        self.val_ids.extend(r.record_id for r in batch)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        torch.save({
            "rank": trainer.global_rank, "world_size": trainer.world_size,
            "editor": {k: v.detach().cpu().clone() for k, v in pl_module.editor.state_dict().items()},
            "val_ids": list(self.val_ids),
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "global_step": trainer.global_step,
        }, self.dirpath / f"rank{trainer.global_rank}.pt")
