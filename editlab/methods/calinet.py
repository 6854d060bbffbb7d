"""CaliNet: FFN-like calibration memory slots trained beside a frozen FFN.

Dong et al. 2022, "Calibrating Factual Knowledge in Pretrained Language Models" (Findings of
EMNLP 2022); reference repository dqxiu/CaliNet (``src/modeling_t5.py`` ``T5DenseReluDenseEx`` /
``T5DenseGatedGeluDenseEx``, ``train_calinet/bash/t5_train_kb_f.sh``), whose settings are followed.

CaliNet adds ``num_slots`` = 64 calibration memory slots (the repository's ``ex_size``) beside the
FFN of block ``layer`` — the last decoder block (``kb_layer`` 11 of T5-base's 12; the paper finds
the top layers work best).  The slots are an FFN of their own, built like the host's
(:class:`~editlab.methods.patches.FFNPatch`): ``act(h Kᵀ) V`` beside an ungated MLP (T5 v1.0's
ReLU, GPT-2/GPT-J's GELU), ``(act(h Gᵀ) ⊙ h Kᵀ) V`` beside a gated one (T5 v1.1's GeGLU, Llama/
SmolLM2's SwiGLU), no biases (the repository's ``bias=False`` layers), the host's activation, and
their output added to the host's (``hidden + FFN(h) + FFN_ex(h)``).  Initialisation: PyTorch's
default for those linear layers — keys and gates ``U(±1/√d)``, values ``U(±1/√num_slots)`` —
drawn from a seeded generator.

Training: the base model frozen, the slots alone optimised on the edits' language-model loss (the
target's NLL after the prompt, teacher-forced: mean over each record's target tokens, then over
records) with Adafactor at a constant learning rate of 1e-2 (``--adafactor --learning_rate 1e-2
--lr_scheduler_type constant``; Hugging Face's Trainer builds it with ``scale_parameter=False,
relative_step=False``) and the Trainer's default gradient-norm clip of 1.0.  The repository runs
``max_steps`` = 5000 steps over its whole calibration set (100 facts × ParaRel paraphrases, batches
of 2048); here the training set is the batch of records being edited, whose loss falls far sooner,
so training stops once it is below ``early_stop_loss`` (0.01, FT-L's convention in this package; not
in the paper — ``early_stop_loss=null`` trains the full ``max_steps``).

All records of one call share one block of slots (the paper calibrates many facts with 64 slots);
in a sequential stream every call adds another block beside the same FFN (the session keeps them
all).  Speed: as T-Patcher — the blocks from the host's up are recorded once and replayed each
step, projecting to the vocabulary only at the target positions.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import nn
from transformers.optimization import Adafactor

from editlab.data.records import EditRecord
from editlab.errors import require_bool, require_float, require_int
from editlab.methods.base import Edit, EditError, Editor
from editlab.methods.patches import FFNPatch, HostReplay, check_records, resolve_layer

log = logging.getLogger(__name__)

__all__ = ["CaliNet"]


class CaliNet(Editor):
    """CaliNet calibration memory (see the module docstring).

    Args:
        layer: block whose FFN gets the slots (-1: the last, the paper's choice).
        num_slots: calibration memory slots per edit call (repository ``ex_size`` 64).
        lr: Adafactor learning rate, constant (repository 1e-2).
        max_steps: optimisation steps at most (repository 5000).
        early_stop_loss: stop once the edit loss is below this (None: always ``max_steps``).
        grad_clip: gradient norm clip (Hugging Face Trainer default 1.0; None: off).
        gated: gated slots; None follows the host MLP (gated iff it has a gate projection).
        seed: seed of the slot initialisation.
    """

    def __init__(
        self,
        layer: int = -1,
        num_slots: int = 64,
        lr: float = 1e-2,
        max_steps: int = 5000,
        early_stop_loss: float | None = 1e-2,
        grad_clip: float | None = 1.0,
        gated: bool | None = None,
        seed: int = 1,
    ) -> None:
        self.layer = require_int(layer, "layer")
        self.num_slots = require_int(num_slots, "num_slots", ge=1)
        self.lr = require_float(lr, "lr", gt=0)
        self.max_steps = require_int(max_steps, "max_steps", ge=1)
        self.early_stop_loss = require_float(early_stop_loss, "early_stop_loss", ge=0, none=True)
        self.grad_clip = require_float(grad_clip, "grad_clip", gt=0, none=True)
        self.gated = require_bool(gated, "gated", none=True)
        self.seed = require_int(seed, "seed")
        self.last_steps = 0
        self.last_losses: list[float] = []

    def compute_edit(self, model: nn.Module, tokenizer, records: Sequence[EditRecord]) -> Edit:
        check_records(records, "CaliNet")
        layer = resolve_layer(model, self.layer, "CaliNet")
        replay = HostReplay(model, tokenizer, records, layer, "CaliNet")
        arch = replay.arch
        activation = arch.mlp_activation(model)
        gated = arch.has_role(model, "mlp_gate", layer) if self.gated is None else bool(self.gated)
        d = replay.inputs.shape[1]
        device = replay.inputs.device
        generator = torch.Generator(device="cpu").manual_seed(self.seed)

        def uniform(rows: int, cols: int, bound: float) -> torch.Tensor:
            t = (torch.rand(rows, cols, generator=generator) * 2 - 1) * bound
            return t.to(device).requires_grad_(True)

        keys = uniform(self.num_slots, d, 1 / math.sqrt(d))
        values = uniform(self.num_slots, d, 1 / math.sqrt(self.num_slots))
        gates = uniform(self.num_slots, d, 1 / math.sqrt(d)) if gated else None
        params = [keys, values] + ([gates] if gates is not None else [])

        def patch_fn(h: torch.Tensor) -> torch.Tensor:
            return FFNPatch.compute(h, keys, values, None, gates, activation)

        opt = Adafactor(params, lr=self.lr, scale_parameter=False, relative_step=False, warmup_init=False)
        ids = [r.record_id for r in records]
        self.last_losses = []
        step = 0
        with torch.enable_grad():
            for step in range(1, self.max_steps + 1):
                loss = replay.nll(replay.hidden(patch_fn))
                if not torch.isfinite(loss):
                    raise EditError(f"CaliNet: loss became {loss.item()} at step {step} for records {ids}")
                self.last_losses.append(loss.item())
                if self.early_stop_loss is not None and loss.item() < self.early_stop_loss:
                    break
                grads = torch.autograd.grad(loss, params)
                for p, g in zip(params, grads):
                    p.grad = g
                if self.grad_clip is not None:
                    nn.utils.clip_grad_norm_(params, self.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
        self.last_steps = step
        log.debug("CaliNet: %d steps, loss %.4f -> %.4f", step, self.last_losses[0], self.last_losses[-1])
        with torch.no_grad():
            patch = FFNPatch(keys=keys, values=values, gates=gates, activation=activation)
        if not all(torch.isfinite(t).all() for t in patch.parameters()):
            raise EditError(f"CaliNet: non-finite slots for records {ids}")
        return Edit(patches={replay.host_path: patch})
