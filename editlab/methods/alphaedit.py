"""AlphaEdit: MEMIT's update projected onto the null space of the preserved knowledge's keys.

Fang, Jiang, Wang, Ma, Shi, Wang, He and Chua 2025, "AlphaEdit: Null-Space Constrained Knowledge
Editing for Language Models" (ICLR); defaults follow the reference repository
jianghoucheng/AlphaEdit (``hparams/AlphaEdit/gpt2-xl.json``: layers 13-17, 20 value steps, lr 0.5,
weight decay 0.5, clamp factor 0.75, KL factor 0.0625, ``nullspace_threshold`` 2e-2, ``L2`` 10;
the solve in ``AlphaEdit/AlphaEdit_main.py``, the projection in ``experiments/evaluate.py``
``get_project``).

Everything but the layer solve is MEMIT's (:class:`editlab.methods.memit.MEMIT`, reused, not
copied): the target residuals ``z`` at the last edited layer, and for each edited layer in turn,
on the model with the lower layers already updated, the template-averaged keys ``K`` and the
remaining residual ``R`` spread over the layers still to edit.  AlphaEdit then changes two things:

1. **the null-space projection** ``P`` per layer, built once from the key second moment
   ``C₀ = E[k kᵀ]`` of preserved text (the statistic MEMIT uses, :func:`editlab.stats.layer_stats`):
   with ``C₀ = U Λ Uᵀ``, ``Û`` holds the eigenvectors whose eigenvalue is below
   ``nullspace_threshold`` and ``P = Û Ûᵀ``.  An update ``Δ`` with ``Δ P = Δ`` leaves the outputs
   on preserved keys (``C₀``'s dominant directions) unchanged: ``Δ k₀ ≈ 0``.
2. **the solve**, with ``K_p K_pᵀ`` the summed key Gram matrix of the stream's earlier edits::

       Δ = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + L2 · I)⁻¹

   (minimiser of ``‖Δ P K − R‖² + ‖Δ P K_p‖² + L2 ‖Δ P‖²`` over ``Δ P``; the reference solves the
   transposed system ``(P (K Kᵀ + K_p K_pᵀ) + L2 I) X = P K Rᵀ``, here in float64).  With
   ``P k₀ = 0``, ``(K_p K_pᵀ P + K Kᵀ P + L2 I)⁻¹ k₀ = k₀ / L2``, so ``Δ k₀ = R Kᵀ P k₀ / L2 = 0``:
   the update lies in the null space exactly, not just approximately.

The projection is derived from the statistics only, so it is cached process-wide, per model
identity, layer, statistics settings and threshold.  The earlier edits' Gram matrices are the
stream state (the editor is :attr:`~editlab.methods.base.Editor.stateful`): ``compute_edit``
reads them from ``state`` and returns them with this batch's ``K Kᵀ`` added.  The reference adds
keys recomputed on the fully edited model; the keys of layer ``l`` depend only on the blocks below
it (and ``l``'s own MLP input), which are exactly as they were when ``l`` was solved, so the keys
of the solve are those keys and are reused.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from editlab.data.corpora import Corpus
from editlab.data.records import EditRecord
from editlab.errors import require_float, require_int
from editlab.methods.base import Deltas, Edit, EditError
from editlab.methods.keyvalue import DEFAULT_TEMPLATE_PROMPTS, KeyValueEditor
from editlab.methods.memit import MEMIT
from editlab.models.arch import arch_for, get_module
from editlab.stats import layer_stats, model_identity

log = logging.getLogger(__name__)

__all__ = ["AlphaEdit", "alphaedit_update", "null_space_projection"]

_PROJECTIONS: dict[tuple, torch.Tensor] = {}
"""Process-wide cache of the projections: (model identity, layer, statistics settings, threshold) → P."""


def null_space_projection(mom2: torch.Tensor, threshold: float) -> torch.Tensor:
    """``P = Û Ûᵀ`` where ``Û`` are the eigenvectors of the second moment ``mom2`` whose eigenvalue
    is below ``threshold`` (float64, ``[d, d]``)."""
    values, vectors = torch.linalg.eigh(mom2.double())
    kept = vectors[:, values < threshold]
    return kept @ kept.T


def alphaedit_update(keys: torch.Tensor, residuals: torch.Tensor, projection: torch.Tensor,
                     earlier_gram: torch.Tensor | None, l2: float) -> torch.Tensor:
    """``Δ = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + l2 · I)⁻¹`` for keys ``K`` ``[d_in, n]``, residuals ``R``
    ``[d_out, n]``, projection ``P`` and the earlier keys' Gram matrix ``K_p K_pᵀ`` (``[d_in, d_in]``,
    None: no earlier edits); float64, ``[d_out, d_in]``."""
    k = keys.double()
    p = projection.double().to(k.device)
    gram = k @ k.T
    if earlier_gram is not None:
        gram = gram + earlier_gram.double().to(k.device)
    a = p @ gram
    a.diagonal().add_(l2)
    x = torch.linalg.solve(a, p @ k @ residuals.double().T)  # [d_in, d_out], the reference's system
    return x.T


class AlphaEdit(MEMIT):
    """MEMIT's update constrained to the null space of the preserved keys (AlphaEdit).

    Args:
        layers: the blocks whose ``mlp_out`` is edited (a contiguous range in the paper).
        fact_token: ``subject_last`` (the paper), ``subject_first`` or ``last``.
        v_num_grad_steps, v_lr, v_weight_decay, clamp_norm_factor, kl_factor, kl_prompts,
            early_stop_loss: the optimisation of the target residuals (as MEMIT's).
        nullspace_threshold: eigenvalues of the key second moment below it span the null space.
        L2: the ridge term ``L2 · I`` of the solve.
        context_template_length_params, template_prompts, template_seed: context templates.
        v_batch_requests: requests optimised together (memory bound; results do not depend on it).
        mom2_corpus, mom2_n_tokens, mom2_dtype, stats_cache_dir: the key statistics ``P`` is built from.
    """

    method = "AlphaEdit"
    stateful = True

    def __init__(
        self,
        layers: Sequence[int] = (13, 14, 15, 16, 17),
        fact_token: str = "subject_last",
        v_num_grad_steps: int = 20,
        v_lr: float = 0.5,
        v_weight_decay: float = 0.5,
        clamp_norm_factor: float = 0.75,
        kl_factor: float = 0.0625,
        kl_prompts: Sequence[str] = ("{} is a",),
        early_stop_loss: float = 5e-2,
        nullspace_threshold: float = 2e-2,
        L2: float = 10.0,  # noqa: N803 (the reference's name)
        context_template_length_params: Sequence[Sequence[int]] = ((10, 5),),
        template_prompts: Sequence[str] = DEFAULT_TEMPLATE_PROMPTS,
        template_seed: int = 0,
        v_batch_requests: int = 32,
        mom2_corpus: Corpus | None = None,
        mom2_n_tokens: int | None = None,
        mom2_dtype: str = "float32",
        stats_cache_dir: str | None = None,
    ) -> None:
        KeyValueEditor.__init__(  # MEMIT's other argument, mom2_update_weight, has no role here
            self, layers, fact_token, v_num_grad_steps, v_lr, v_weight_decay, clamp_norm_factor, kl_factor,
            kl_prompts, early_stop_loss, context_template_length_params, template_prompts, template_seed,
            mom2_corpus, mom2_n_tokens, mom2_dtype, stats_cache_dir,
        )
        self.nullspace_threshold = require_float(nullspace_threshold, "nullspace_threshold", gt=0)
        self.L2 = require_float(L2, "L2", gt=0)
        self.v_batch_requests = require_int(v_batch_requests, "v_batch_requests", ge=1)

    # ------------------------------------------------------------------------------ projection
    def projections(self, model: nn.Module, tokenizer) -> dict[int, torch.Tensor]:
        """``{layer: P}`` (float32, CPU), built once per process from the key statistics."""
        stats = self.stats
        setting = (stats.corpus.key, stats.n_tokens, str(stats.dtype), str(stats.cache_dir),
                   self.nullspace_threshold)
        ident = model_identity(model)
        keys = {layer: (ident, layer, setting) for layer in self.layers}
        missing = [layer for layer in self.layers if keys[layer] not in _PROJECTIONS]
        if missing:
            moments = layer_stats(model, tokenizer, missing, stats.corpus, n_tokens=stats.n_tokens,
                                  dtype=stats.dtype, cache_dir=stats.cache_dir, progress=False)
            for layer in missing:
                proj = null_space_projection(moments[layer].mom2, self.nullspace_threshold)
                rank = round(float(torch.trace(proj)))
                (log.warning if rank == 0 else log.info)(
                    "AlphaEdit layer %d: null space of %d of %d key dimensions (eigenvalues < %g)%s", layer, rank,
                    proj.shape[0], self.nullspace_threshold, ": every update is zero" if rank == 0 else "")
                _PROJECTIONS[keys[layer]] = proj.float()
        return {layer: _PROJECTIONS[keys[layer]] for layer in self.layers}

    # ------------------------------------------------------------------------------ the state
    def _earlier_grams(self, model: nn.Module, state: Any) -> dict[int, torch.Tensor | None]:
        """The stream state's Gram matrices per layer (None at a stream's start), checked."""
        if state is None:
            return {layer: None for layer in self.layers}
        ok = isinstance(state, dict) and isinstance(state.get("grams"), list) and "layers" in state
        if not ok:
            raise EditError("AlphaEdit: the stream state is not an AlphaEdit state (layers, grams, edits)")
        if list(state["layers"]) != self.layers or len(state["grams"]) != len(self.layers):
            raise EditError(f"AlphaEdit: the stream state holds layers {list(state['layers'])}, "
                            f"this editor edits {self.layers}")
        spec = arch_for(model)
        grams = {}
        for layer, gram in zip(self.layers, state["grams"]):
            d_in = spec.weight_out_in(get_module(model, spec.module_path(model, "mlp_out", layer))).shape[1]
            if not isinstance(gram, torch.Tensor) or tuple(gram.shape) != (d_in, d_in):
                raise EditError(f"AlphaEdit: the stream state's Gram matrix of layer {layer} is not [{d_in}, {d_in}]")
            grams[layer] = gram
        return grams

    # ------------------------------------------------------------------------------ the edit
    def compute_edit(self, model: nn.Module, tokenizer, records: Sequence[EditRecord],
                     state: Any = None) -> Edit:
        """The edit of ``records`` on top of the stream's earlier edits (``state``: their keys'
        Gram matrices per layer, None at the stream's start); the new state adds this batch's."""
        self.check(model, records)
        earlier = self._earlier_grams(model, state)
        projections = self.projections(model, tokenizer)
        grams: dict[int, torch.Tensor] = {}

        def solve(layer: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
            grams[layer] = keys.double() @ keys.double().T
            return alphaedit_update(keys, resid, projections[layer], earlier[layer], self.L2)

        deltas = self.spread_updates(model, tokenizer, records, solve)
        new_grams = [(grams[layer] if earlier[layer] is None else earlier[layer].double() + grams[layer]).float()
                     for layer in self.layers]
        edits = (int(state.get("edits", 0)) if state is not None else 0) + len(records)
        return Edit(deltas=deltas, state={"layers": list(self.layers), "grams": new_grams, "edits": edits})

    def compute_deltas(self, model: nn.Module, tokenizer, records: Sequence[EditRecord]) -> Deltas:
        """The deltas of ``records`` as the first edit of a stream (no earlier keys)."""
        return self.compute_edit(model, tokenizer, records).deltas
