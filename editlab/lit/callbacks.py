"""Run any editor inside the Lightning edit loop, as a ``Callback``.

Non-trained editors (FT-L, ROME, ...) and trained ones (MEND, KE, ... after
:mod:`editlab.lit.editor_train` trained them, or loaded from a checkpoint) alike; a trained
editor, an ``nn.Module``, is moved to the model's device and put in eval mode when the test starts.

:class:`EditorCallback` wraps an :class:`~editlab.methods.base.Editor`: before each test batch it
computes the batch's :class:`~editlab.methods.base.Edit` (weight deltas, added modules or memory)
and installs it through the module's :class:`~editlab.methods.base.WeightEditSession`; after the
batch it restores the model
(single or batch editing), or lets the edits accumulate (``sequential=True``) until the end of the
run.  Whatever happens — an exception, an interrupted run — the model is restored.

The callback and the module it edits know each other only through :class:`EditTarget`: the
module's weight-edit session and tokenizer, two reports (edit applied / edit failed) and whether
its scoring needs the edits to accumulate.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol, runtime_checkable

import lightning as L
import torch
from torch import nn

from editlab.data.records import check_complete_cases
from editlab.errors import SettingError
from editlab.methods.base import EditError, Editor, WeightEditSession, verify_outputs

log = logging.getLogger(__name__)

__all__ = ["EditTarget", "EditorCallback", "refuse_split_stream"]


def refuse_split_stream(processes: int, launch: str = "") -> None:
    """Raise :class:`SettingError` (``edit.sequential``) when a sequential stream would run on more
    than one process.  Under DDP the test sampler deals each rank every N-th batch: one stream
    would become N interleaved streams on N copies of the model, each missing the others' edits.
    ``launch`` says what starts the processes (``trainer.devices=2 x trainer.num_nodes=1``)."""
    if processes <= 1:
        return
    started = f"{launch} start {processes}" if launch else f"the run has {processes} processes"
    raise SettingError(
        "edit.sequential",
        f"is true (a sequential stream, as a `stream` config sets it), which runs on one process, "
        f"but {started}: a stream is one model's history, and DDP would split it into {processes} "
        f"interleaved streams on {processes} model copies. Run it with trainer.devices=1 "
        f"trainer.num_nodes=1; a trainable editor can be trained under DDP first and its checkpoint "
        f"streamed on one process (ckpt_path=...)")


@runtime_checkable
class EditTarget(Protocol):
    """What :class:`EditorCallback` needs from the LightningModule whose model it edits (the edit
    loop, :class:`editlab.lit.edit_eval.EditEvalModule`), and all it uses."""

    session: WeightEditSession
    """Holds the model (``session.model``); edits are installed and undone through it."""
    tokenizer: Any
    device: torch.device
    """Where a trained editor (an ``nn.Module``) is moved."""
    needs_sequential: bool
    """True when the module scores the model between batches as the stream leaves it (``eval_every``):
    edits must then accumulate (``sequential=True``)."""

    def record_edit(self, batch_idx: int, seconds: float) -> None:
        """The edit of batch ``batch_idx`` is applied; it took ``seconds`` to compute and apply."""

    def record_failure(self, batch_idx: int, message: str) -> None:
        """The edit of batch ``batch_idx`` failed and was skipped: the model is unchanged."""


class EditorCallback(L.Callback):
    """Apply ``editor`` to each test batch of an :class:`~editlab.lit.edit_eval.EditEvalModule`.

    Args:
        editor: the non-trained editor.
        sequential: keep each batch's edit applied while later batches are edited (lifelong
            editing); pre-edit scores are still taken on the original weights.  A stream is one
            model's history: it runs on one process (refused under DDP, :func:`refuse_split_stream`).
        skip_failed: when the editor raises :class:`EditError` for a batch, or its edit leaves a
            weight or the edited model's logits on the batch's edit prompts non-finite (the edit is
            then undone), log it, mark the batch's records as failed and go on (the model is
            unchanged); otherwise re-raise.
    """

    def __init__(self, editor: Editor, sequential: bool = False, skip_failed: bool = False) -> None:
        self.editor = editor
        self.sequential = sequential
        self.skip_failed = skip_failed

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        if stage != "test":
            return
        if not isinstance(pl_module, EditTarget):
            raise TypeError(f"EditorCallback edits the model of an EditTarget module (session, tokenizer, "
                            f"device, needs_sequential, record_edit, record_failure); {type(pl_module).__name__} is not one")
        if pl_module.needs_sequential and not self.sequential:
            raise ValueError("eval_every scores the records edited so far on the edited model: it needs sequential "
                             "editing (edit.sequential=true, or a `stream` config), not independent edits")
        if self.sequential:
            # every rank raises here, before any edit (setup precedes the test loop on all ranks)
            refuse_split_stream(trainer.world_size)

    def on_test_start(self, trainer: L.Trainer, pl_module: EditTarget) -> None:
        if isinstance(self.editor, nn.Module):  # a trained editor: beside the model, never training
            self.editor.to(pl_module.device)
            self.editor.eval()

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: EditTarget) -> None:
        # a resumed stream: the module puts the checkpoint's edits back on its session, with this
        # editor at hand for a memory's wrapper (IKE, SERAC)
        resume = getattr(pl_module, "resume_session", None)
        if callable(resume):
            resume(self.editor)

    def on_test_batch_start(
        self, trainer: L.Trainer, pl_module: EditTarget, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not self.sequential:
            check_complete_cases(list(batch))
        start = time.perf_counter()
        try:
            records = list(batch)
            edit = self.editor.edit_in(pl_module.session, pl_module.tokenizer, records)
            # a result that is not finite (weights, or the edited model's logits on the batch's
            # edit prompts) is undone here and is an EditError like any failed edit
            pl_module.session.apply(edit, verify=lambda s: verify_outputs(s, pl_module.tokenizer, records))
        except EditError as err:
            if not self.skip_failed:
                raise
            log.warning("edit of batch %d failed and was skipped: %s", batch_idx, err)
            pl_module.record_failure(batch_idx, str(err))
            return
        pl_module.record_edit(batch_idx, time.perf_counter() - start)

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: EditTarget, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0
    ) -> None:
        if not self.sequential:
            pl_module.session.restore()

    def on_test_end(self, trainer: L.Trainer, pl_module: EditTarget) -> None:
        pl_module.session.restore()

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:
        if isinstance(pl_module, EditTarget):  # (not one: refused in setup, nothing was edited)
            pl_module.session.restore()
