"""Train a trained editor — MEND, KE (hypernetworks), SERAC (scope classifier + counterfactual
model), ... — with ``trainer.fit``.

:class:`EditorTrainModule` receives a built model bundle and a
:class:`~editlab.methods.hyper.LearnedEditor` (MEND and KE are its weight-update kind,
:class:`~editlab.methods.hyper.TrainableEditor`).  The base model is frozen (no gradients, eval
mode, never written during training: editors run it through ``torch.func.functional_call`` or not
at all), and only the editor's parameters are optimised (Adam over
:meth:`LearnedEditor.optimizer_groups`).

* **Training step**: the batch of records is tokenised into an
  :class:`~editlab.data.collate.EditBatch` (edit / rephrase / locality pairs, MEND's
  edit_inner / edit_outer / loc) and the editor's :meth:`~LearnedEditor.training_losses` are
  logged as ``train/<key>`` (``loss``, ``loss_edit``, ``loss_loc``, ``edit_acc``, ``loc_acc``, and
  whatever else the editor returns), averaged over ranks.
* **Validation**: the same losses (``val/loss``, … as :class:`torchmetrics.MeanMetric`), and the
  records actually edited the way the edit loop edits them — the editor's
  :meth:`~editlab.methods.base.Editor.compute_edit` installed on the model (deltas, patches or a
  memory), scored teacher-forced through the session's ``forward_model``, restored bit-exactly —
  into the evaluation's own torchmetrics collection
  (:func:`~editlab.metrics.edit.build_edit_metrics`, prefix ``val/``): ``val/reliability``,
  ``val/generalization``, ``val/locality`` (agreement with the unedited model),
  ``val/locality_acc``, ``val/portability``.  Metric states are reduced over ranks by torchmetrics.
  ``val/edit_score`` is the harmonic mean of reliability, generalization and locality (high only
  when all three are; CounterFact's Score takes the same mean of its three success rates), a
  checkpoint criterion that, unlike ``val/loss``, does not depend on ``c_loc``:
  ``fit.callbacks.checkpoint.monitor=val/edit_score fit.callbacks.checkpoint.mode=max``.
* **Checkpoints** hold the editor only: base-model tensors are stripped on save and taken from the
  live model on load, and the checkpoint names the base model and stores the editor's config
  (``checkpoint["editor"]``), so :func:`~editlab.lit.checkpoint.load_editor` rebuilds a trained editor onto that model.
  Resuming (``trainer.fit(..., ckpt_path=...)``) restores the editor, the optimizer, the loop
  counters and, with :class:`~editlab.data.datamodule.ResumableDataLoader`, the data position.
* **DDP**: the base model's parameters and buffers are excluded from DDP's synchronisation (each
  rank loaded the same weights; a 6B model is not broadcast at start-up, nor its buffers at every
  step), the editor's gradients are all-reduced by DDP, and the editor's buffers (MEND's running
  normalisation statistics) follow DDP's ``broadcast_buffers`` rule — rank 0's values are
  broadcast before every training step (here, explicitly: DDP's own broadcast misses buffers an
  editor replaces rather than updates in place), before every validation and when training ends,
  so every rank validates and finishes with the same editor.

``val/loss`` and the other objective terms are computed on each validation batch as in training:
with the editor's ``batch_edits="joint"`` each batch is one batch edit, so they depend on how
records are grouped into batches (and thus on the number of processes); with ``"independent"``
they are means of single-edit terms and do not.  The edit metrics (``val/reliability`` …) edit
``val_edits_per_batch`` records at a time and, with single edits, do not either.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchmetrics import MeanMetric

from editlab.data.collate import EditBatchCollator
from editlab.data.records import EditRecord
from editlab.evaluation.probes import build_plan
from editlab.evaluation.teacher_forced import ScoreCache, score_pairs
from editlab.lit.checkpoint import check_base_model, editor_state, read_editor_checkpoint
from editlab.methods.base import applied
from editlab.methods.hyper import LearnedEditor
from editlab.metrics.edit import build_edit_metrics, computed
from editlab.metrics.functional import harmonic_mean
from editlab.models.arch import is_encoder_decoder
from editlab.models.loading import ModelBundle, freeze

log = logging.getLogger(__name__)

__all__ = ["EditorTrainModule", "MarginAnnealing", "LOSS_KEYS"]

BASE_PREFIX = "model."
LOSS_KEYS = ("loss", "loss_edit", "loss_loc", "edit_acc", "loc_acc")
LR_SCHEDULES = ("constant", "cosine")
# val/edit_score is the harmonic mean of these validation metrics
EDIT_SCORE_PARTS = ("reliability", "generalization", "locality")


class EditorTrainModule(L.LightningModule):
    """Train ``editor`` for the frozen base model of ``model`` (``trainer.fit``).

    Args:
        model: the built model + tokenizer (frozen here if it is not already).
        editor: the trainable editor; bound to the model here (before any checkpoint is loaded).
        lr: base learning rate, passed to :meth:`LearnedEditor.optimizer_groups` (editors with
            separately tuned parameters, such as MEND's edit step sizes, set their own there).
        lr_schedule: ``constant`` (MEND, KE), or ``cosine``: every group's learning rate follows
            a half cosine from its own value at step 0 to ``min_lr_ratio`` times it at the
            trainer's ``max_steps`` (which must be set), stepped after every optimizer step.
        min_lr_ratio: the final fraction of each learning rate under ``cosine``.
        val_edits_per_batch: records edited together in validation (1: single edits, as the edit
            loop evaluates by default; None: each validation batch is one batch edit).
        val_losses: also compute the training objective on validation batches (``val/loss`` …).
        chunk_size: sequences per scoring forward in validation.
        max_prompt_tokens: truncate over-long prompts from the left (training and scoring).
        editor_config: the editor's config (``_target_`` + keyword arguments), kept in checkpoints
            so :func:`~editlab.lit.checkpoint.load_editor` can rebuild the editor.
    """

    def __init__(
        self,
        model: ModelBundle,
        editor: LearnedEditor,
        lr: float = 1e-6,
        lr_schedule: str = "constant",
        min_lr_ratio: float = 0.1,
        val_edits_per_batch: int | None = 1,
        val_losses: bool = True,
        chunk_size: int = 64,
        max_prompt_tokens: int | None = None,
        editor_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(editor_config, DictConfig):
            editor_config = OmegaConf.to_container(editor_config, resolve=True)
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        if val_edits_per_batch is not None and val_edits_per_batch < 1:
            raise ValueError(f"val_edits_per_batch must be >= 1 or None, got {val_edits_per_batch}")
        self.save_hyperparameters(ignore=["model", "editor"])
        self.hparams["base_model"] = model.name
        self.bundle = model
        self.model = freeze(model.model)
        self.tokenizer = model.tokenizer
        editor.bind(self.model, self.tokenizer)  # networks exist before configure_optimizers and before a checkpoint loads
        if editor.base_model is None:
            editor.base_model = model.name
        elif editor.base_model != model.name:
            log.warning("editor.base_model is %r but the model is %r", editor.base_model, model.name)
        self.editor = editor
        self.lr = lr
        self.lr_schedule = lr_schedule
        self.min_lr_ratio = min_lr_ratio
        self.val_edits_per_batch = val_edits_per_batch
        self.val_losses = val_losses
        self.chunk_size = chunk_size
        self.max_prompt_tokens = max_prompt_tokens
        self.editor_config = editor_config
        seq2seq = is_encoder_decoder(model)
        start = getattr(self.model.config, "decoder_start_token_id", None) if seq2seq else None
        self.collator = EditBatchCollator(model.tokenizer, seq2seq=seq2seq, decoder_start_token_id=start,
                                          max_prompt_tokens=max_prompt_tokens)
        self.val_metrics = build_edit_metrics("val/")
        self.val_loss_metrics = nn.ModuleDict({key: MeanMetric() for key in LOSS_KEYS})
        self._pre_cache = ScoreCache()  # the base model never changes: pre-edit scores are computed once
        # DDP must neither broadcast nor watch the frozen base model (see the module docstring)
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, self._base_names())

    def _base_names(self) -> list[str]:
        names = [n for n, _ in self.model.named_parameters(remove_duplicate=False)]
        names += [n for n, _ in self.model.named_buffers(remove_duplicate=False)]
        return [BASE_PREFIX + n for n in names]

    # ----------------------------------------------------------------- modes and data
    def train(self, mode: bool = True) -> EditorTrainModule:
        """Only the editor switches modes: the base model stays in eval mode (no dropout)."""
        super().train(mode)
        self.model.eval()
        return self

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Batches are lists of records (text); they are tokenised onto the device in the steps."""
        return batch

    def configure_optimizers(self) -> torch.optim.Optimizer | dict[str, Any]:
        optimizer = torch.optim.Adam(self.editor.optimizer_groups(self.lr))
        if self.lr_schedule == "constant":
            return optimizer
        total = self.trainer.max_steps
        if total is None or total <= 0:
            raise ValueError("lr_schedule='cosine' needs the trainer's max_steps (fit.trainer.max_steps)")
        ratio = self.min_lr_ratio

        def factor(step: int) -> float:
            return ratio + (1.0 - ratio) * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------- training
    def training_step(self, batch: Sequence[EditRecord], batch_idx: int) -> torch.Tensor:
        records = list(batch)
        edit_batch = self.collator(records).to(self.device)
        out = self.editor.training_losses(self.model, edit_batch)
        for key, value in out.items():
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                self.log(f"train/{key}", value.detach().float(), batch_size=len(records), sync_dist=True,
                         prog_bar=key == "loss")
        # the learning rate of this step (the editor networks' group; the others follow the same schedule)
        self.log("train/lr", float(self.optimizers().param_groups[0]["lr"]), batch_size=len(records))
        return out["loss"]

    def _sync_editor_buffers(self) -> None:
        """Rank 0's editor buffers on every rank (DDP's rule for buffers, see the module docstring)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for buffer in self.editor.buffers():
                dist.broadcast(buffer, src=0)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._sync_editor_buffers()

    def on_train_end(self) -> None:
        self._sync_editor_buffers()  # the last step's own buffer updates differ between ranks

    # ----------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self._sync_editor_buffers()
        self.val_metrics.reset()
        for metric in self.val_loss_metrics.values():
            metric.reset()

    def validation_step(self, batch: Sequence[EditRecord], batch_idx: int) -> None:
        records = list(batch)
        if self.val_losses:
            edit_batch = self.collator(records).to(self.device)
            with torch.enable_grad():  # editors read the base model's gradient on the edit
                out = self.editor.training_losses(self.model, edit_batch)
            for key, metric in self.val_loss_metrics.items():
                if key in out:
                    metric.update(out[key].detach().float(), weight=len(records))
        size = self.val_edits_per_batch or len(records)
        for lo in range(0, len(records), size):
            self._edit_and_score(records[lo: lo + size])

    def _edit_and_score(self, records: list[EditRecord]) -> None:
        """Edit ``records`` as the edit loop does, score them teacher-forced, restore the model."""
        plan = build_plan(records, comparison=False)
        kwargs = {"chunk_size": self.chunk_size, "max_prompt_tokens": self.max_prompt_tokens}
        with torch.no_grad():
            pre = self._pre_cache.scores(self.model, self.tokenizer, plan.prompts, plan.targets, **kwargs)
        edit = self.editor.compute_edit(self.model, self.tokenizer, records)
        with applied(self.model, edit) as session, torch.no_grad():
            post = score_pairs(session.forward_model, self.tokenizer, plan.prompts, plan.targets, **kwargs)
        pre, post = pre.to(self.device), post.to(self.device)
        n = plan.num_records
        for family, (seq, rec) in plan.accuracy.items():
            s, r = seq.to(self.device), rec.to(self.device)
            if family == "locality":
                self.val_metrics["locality"].update(post.pred[s], pre.pred[s], post.mask[s], r, n)
                self.val_metrics["locality_acc"].update(post.pred[s], post.target[s], post.mask[s], r, n)
            else:
                self.val_metrics[family].update(post.pred[s], post.target[s], post.mask[s], r, n)

    def on_validation_epoch_end(self) -> None:
        values = computed(self.val_metrics)  # synced over ranks, in a fixed order on every rank
        for key, metric in self.val_loss_metrics.items():
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r".*was called before the ``update``.*")
                value = float(metric.compute())
            if not math.isnan(value):
                values[f"val/{key}"] = value
        parts = [values.get(f"val/{name}") for name in EDIT_SCORE_PARTS]
        if all(part is not None for part in parts):
            values["val/edit_score"] = float(harmonic_mean(parts))
        if values:
            # already reduced over ranks by torchmetrics: every rank logs the same numbers
            self.log_dict(values, sync_dist=True)

    # ----------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k: v for k, v in state.items() if not k.startswith(BASE_PREFIX)}
        checkpoint["editor"] = {
            "base_model": self.bundle.name,
            "class": f"{type(self.editor).__module__}.{type(self.editor).__qualname__}",
            "config": self.editor_config,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_base_model(checkpoint, self.bundle.name)
        # the checkpoint has no base-model tensors: take them from the live model (strict loading
        # still checks that every editor tensor is there and has the right shape)
        base = {BASE_PREFIX + k: v for k, v in self.model.state_dict(keep_vars=True).items()}
        checkpoint["state_dict"] = {**base, **checkpoint["state_dict"]}

    def load_editor_weights(self, path: str | Path) -> None:
        """Load the editor weights of checkpoint ``path``: read on rank 0 and broadcast, so under
        DDP every rank gets them even when the file is on rank 0's node only."""
        state = None
        trainer = self._trainer
        if trainer is None or trainer.is_global_zero:
            checkpoint = read_editor_checkpoint(path)
            check_base_model(checkpoint, self.bundle.name)
            state = editor_state(checkpoint)
        if trainer is not None:
            state = trainer.strategy.broadcast(state, src=0)
        self.editor.load_state_dict(state)


class MarginAnnealing(L.Callback):
    """After every validation, pass the validation success rate to the editor's
    ``anneal_margin(rate)`` (KE's KL-margin schedule: De Cao et al. shrink the margin whenever more
    than 90% of the validation edits succeed).  Configured by the experiments of editors that have
    such a schedule (``fit.callbacks``).

    Args:
        monitor: the logged validation metric read as the success rate (``val/reliability``: the
            teacher-forced accuracy of the edited model on the edit; the reference counts edits
            whose argmax prediction is the new target).
    """

    def __init__(self, monitor: str = "val/reliability") -> None:
        self.monitor = monitor

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        if not callable(getattr(pl_module.editor, "anneal_margin", None)):
            raise TypeError(f"MarginAnnealing: {type(pl_module.editor).__name__} has no anneal_margin(rate)")

    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        rate = float(trainer.callback_metrics[self.monitor])  # reduced over ranks: every rank agrees
        margin = pl_module.editor.anneal_margin(rate)
        log.info("%s = %.4f: margin %.3g", self.monitor, rate, margin)
