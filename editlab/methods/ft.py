"""FT-L: constrained fine-tuning of MLP output projections.

The "FT-L" baseline of Meng et al. 2022, "Locating and Editing Factual Associations in GPT"
(ROME), reference repository kmeng01/rome (``baselines/ft``), itself after Zhu et al. 2020,
"Modifying Memories in Transformer Models" (the L∞ norm constraint); EasyEdit's ``FT`` follows the
same code.  Defaults follow those repositories: Adam, lr 5e-4, 25 steps, loss < 1e-2 stops early,
objective on the last prompt token (``prompt_last``: the log-probabilities of all target tokens
read at the position after the prompt), optional ``‖ΔW‖∞ ≤ norm_constraint``.  The
``teacher_forced`` objective (mean NLL of each target token at its own position; EasyEdit's FT-M)
is an option.

Speed: only the blocks from the lowest edited one upwards depend on the edit, so the blocks below
run once (no gradient); every optimisation step replays the upper blocks with the call arguments
recorded in that pass, and projects to the vocabulary only at the positions the loss reads.  The
update is a separate tensor passed through :func:`torch.func.functional_call`: the model's own
weights are never written, so a failure at any step leaves it untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from editlab.data.collate import PairBatch, encode_pairs
from editlab.data.records import EditRecord
from editlab.errors import require_bool, require_choice, require_float, require_int, require_ints
from editlab.methods.base import Deltas, EditError, Editor
from editlab.models.arch import arch_for, get_module, get_parameter, is_encoder_decoder
from editlab.scoring import head_nll
from editlab.tracing import CallRecorder, replay_layers

log = logging.getLogger(__name__)

__all__ = ["FTL"]

OBJECTIVES = ("prompt_last", "teacher_forced")
MODULES = ("mlp_out", "mlp_in", "attn_out", "mlp_gate")  # architecture-table roles of weighted projections


class FTL(Editor):
    """Fine-tune the weights of chosen MLP projections (FT-L).

    Args:
        layers: block indices whose ``module`` is tuned.
        module: architecture-table role of the tuned projection (``mlp_out`` — GPT-2 ``c_proj``,
            Llama ``down_proj``, GPT-J ``fc_out``; or ``mlp_in``, ``attn_out``, ``mlp_gate``).
        lr: Adam learning rate.
        num_steps: optimisation steps at most.
        norm_constraint: L∞ bound on each entry of the update (None: unconstrained).
        objective: ``prompt_last`` or ``teacher_forced`` (see module docstring).
        weight_decay: Adam weight decay on the update (pulls it towards zero).
        early_stop_loss: stop once the loss falls below this (0: never stop early).
        replay: replay only the blocks from the lowest edited one up (decoder-only models); False
            runs the whole model each step (always the case for encoder-decoder models).
    """

    def __init__(
        self,
        layers: Sequence[int] = (0,),
        module: str = "mlp_out",
        lr: float = 5e-4,
        num_steps: int = 25,
        norm_constraint: float | None = None,
        objective: str = "prompt_last",
        weight_decay: float = 0.0,
        early_stop_loss: float = 1e-2,
        replay: bool = True,
    ) -> None:
        self.layers = sorted(require_ints(layers, "layers", ge=0, unique=True))
        self.module = require_choice(module, "module", MODULES)
        self.lr = require_float(lr, "lr", gt=0)
        self.num_steps = require_int(num_steps, "num_steps", ge=1)
        self.norm_constraint = require_float(norm_constraint, "norm_constraint", gt=0, none=True)
        self.objective = require_choice(objective, "objective", OBJECTIVES)
        self.weight_decay = require_float(weight_decay, "weight_decay", ge=0)
        self.early_stop_loss = require_float(early_stop_loss, "early_stop_loss", ge=0)
        self.replay = require_bool(replay, "replay")
        self.last_losses: list[float] = []

    # ------------------------------------------------------------------ batch
    def _batch(self, model: nn.Module, tokenizer, records: Sequence[EditRecord]) -> PairBatch:
        prompts = [r.prompt for r in records]
        targets = [r.target_new for r in records]
        seq2seq = is_encoder_decoder(model)
        batch = encode_pairs(
            tokenizer, prompts, targets, seq2seq=seq2seq,
            decoder_start_token_id=getattr(model.config, "decoder_start_token_id", None),
        )
        if self.objective == "prompt_last" and not seq2seq:
            # input: the prompt alone; every target token is read at the last prompt position
            width = int(batch.prompt_lengths.max())
            keep = torch.arange(width).unsqueeze(0) < batch.prompt_lengths.unsqueeze(1)
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            ids = batch.input_ids[:, :width].masked_fill(~keep, pad_id)
            last = (batch.prompt_lengths - 1).unsqueeze(1).expand_as(batch.target_ids)
            batch = PairBatch(
                input_ids=ids,
                attention_mask=keep.long(),
                target_ids=batch.target_ids,
                target_mask=batch.target_mask,
                positions=torch.where(batch.target_mask, last, torch.zeros_like(last)),
                prompt_lengths=batch.prompt_lengths,
            )
        return batch

    # ------------------------------------------------------------------- loss
    @staticmethod
    def _loss(model: nn.Module, hidden: torch.Tensor, batch: PairBatch) -> torch.Tensor:
        """Mean over records of the mean target-token NLL; ``hidden`` holds the LM-head inputs at
        the real target positions, row-major (``[M, d]``)."""
        targets = batch.target_ids[batch.target_mask]
        nll = head_nll(model, hidden, targets)
        rows = torch.arange(len(batch), device=nll.device).unsqueeze(1).expand_as(batch.target_mask)
        rows = rows[batch.target_mask]
        per_row = torch.zeros(len(batch), device=nll.device).index_add(0, rows, nll)
        return (per_row / batch.target_mask.sum(1).clamp(min=1)).mean()

    def _gather(self, batch: PairBatch, hidden: torch.Tensor) -> torch.Tensor:
        rows, pos = batch.gather_index()
        return hidden[rows, pos]

    # ---------------------------------------------------------------- compute
    def compute_deltas(self, model: nn.Module, tokenizer, records: Sequence[EditRecord]) -> Deltas:
        if not records:
            raise EditError("FTL got no records")
        arch = arch_for(model)
        device = next(model.parameters()).device
        n_layers = arch.num_layers(model)
        for layer in self.layers:
            if not 0 <= layer < n_layers:
                raise EditError(f"layer {layer} out of range: the model has {n_layers} blocks")
        block_paths = [arch.layer_path(i) for i in range(n_layers)]
        # parameter full name -> (block path, name relative to the block)
        targets: dict[str, tuple[str, str]] = {}
        for layer in self.layers:
            mod_path = arch.module_path(model, self.module, layer)
            full = f"{mod_path}.weight"
            targets[full] = (block_paths[layer], full[len(block_paths[layer]) + 1:])
        weights = {name: get_parameter(model, name).detach() for name in targets}
        deltas = {name: torch.zeros_like(w, requires_grad=True) for name, w in weights.items()}

        batch = self._batch(model, tokenizer, records).to(device)
        use_replay = self.replay and not is_encoder_decoder(model)
        first = self.layers[0]
        upper = block_paths[first:]
        final_norm = get_module(model, arch.final_norm)

        calls = None
        if use_replay:
            with torch.no_grad(), CallRecorder(model, upper, stop_at=arch.lm_head) as rec:
                model(**batch.model_inputs(), use_cache=False)
            calls = rec.calls
            if len(calls) != len(upper):
                raise EditError("could not record the calls of the upper blocks; set replay=False")

        def forward_hidden() -> torch.Tensor:
            edited = {name: weights[name] + deltas[name] for name in targets}
            if use_replay:
                overrides: dict[str, dict[str, torch.Tensor]] = {}
                for name, (block, rel) in targets.items():
                    overrides.setdefault(block, {})[rel] = edited[name]
                hidden = replay_layers(model, upper, calls, calls[upper[0]].hidden, overrides)
                hidden = final_norm(hidden)
            else:
                with CallRecorder(model, [], stop_at=arch.lm_head) as rec2:
                    torch.func.functional_call(
                        model, edited, (), {**batch.model_inputs(), "use_cache": False}, strict=False
                    )
                hidden = rec2.stopped_input
            return self._gather(batch, hidden)

        opt = torch.optim.Adam(list(deltas.values()), lr=self.lr, weight_decay=self.weight_decay)
        self.last_losses = []
        with torch.enable_grad():
            for step in range(self.num_steps):
                loss = self._loss(model, forward_hidden(), batch)
                if not torch.isfinite(loss):
                    raise EditError(
                        f"FT-L loss became {loss.item()} at step {step} for records "
                        f"{[r.record_id for r in records]}"
                    )
                self.last_losses.append(loss.item())
                if loss.item() < self.early_stop_loss:
                    break
                grads = torch.autograd.grad(loss, list(deltas.values()))
                for d, g in zip(deltas.values(), grads):
                    d.grad = g
                opt.step()
                opt.zero_grad(set_to_none=True)
                if self.norm_constraint is not None:
                    with torch.no_grad():
                        for d in deltas.values():
                            d.clamp_(-self.norm_constraint, self.norm_constraint)
        log.debug("FT-L losses: %s", self.last_losses)
        return {name: d.detach() for name, d in deltas.items()}
