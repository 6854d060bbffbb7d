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
"""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
from torch import nn

from editlab.data.records import check_complete_cases
from editlab.methods.base import EditError, Editor

log = logging.getLogger(__name__)

__all__ = ["EditorCallback"]


class EditorCallback(L.Callback):
    """Apply ``editor`` to each test batch of an :class:`~editlab.lit.edit_eval.EditEvalModule`.

    Args:
        editor: the non-trained editor.
        sequential: keep each batch's edit applied while later batches are edited (lifelong
            editing); pre-edit scores are still taken on the original weights.
        skip_failed: when the editor raises :class:`EditError` for a batch, log it, mark the
            batch's records as failed and go on (the model is unchanged); otherwise re-raise.
    """

    def __init__(self, editor: Editor, sequential: bool = False, skip_failed: bool = False) -> None:
        self.editor = editor
        self.sequential = sequential
        self.skip_failed = skip_failed

    def on_test_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if isinstance(self.editor, nn.Module):  # a trained editor: beside the model, never training
            self.editor.to(pl_module.device)
            self.editor.eval()

    def on_test_batch_start(
        self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not self.sequential:
            check_complete_cases(list(batch))
        start = time.perf_counter()
        try:
            edit = self.editor.compute_edit(pl_module.model, pl_module.tokenizer, list(batch))
            pl_module.session.apply(edit)
        except EditError as err:
            if not self.skip_failed:
                raise
            log.warning("edit of batch %d failed and was skipped: %s", batch_idx, err)
            pl_module.record_failure(batch_idx, str(err))
            return
        pl_module.record_edit(batch_idx, time.perf_counter() - start)

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not self.sequential:
            pl_module.session.restore()

    def on_test_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        pl_module.session.restore()

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:
        pl_module.session.restore()
