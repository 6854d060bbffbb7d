"""MEMIT: mass-editing memory in a transformer, many facts at once over a range of layers.

Meng, Sharma, Andonian, Belinkov and Bau 2023, "Mass-Editing Memory in a Transformer" (ICLR);
defaults follow the reference repository kmeng01/memit (``hparams/MEMIT/gpt2-xl.json``: layers
13-17, 20 value steps, lr 0.5, weight decay 0.5, clamp factor 0.75, KL factor 0.0625,
``mom2_update_weight`` 20000, one "{}" template plus five 10-token generated ones).

For requests ``i = 1..n`` and layers ``l_1 < … < l_L`` (MLP output weights ``W_l``):

1. **target residuals** ``z_i`` at the output of the last layer ``l_L``, at each subject's last
   token: the value optimisation of ROME with the edit vector added to the residual stream there
   (:func:`editlab.methods.keyvalue.optimize_values`), all requests in batches;
2. for each layer in turn, on the model with the lower layers already updated: keys
   ``K = [k_1 … k_n]`` (template-averaged inputs of ``W_l``), the remaining residual
   ``R = (Z − Z_cur) / (L − j)`` spread over the layers still to edit, and the update minimising
   ``‖ΔW K − R‖² + λ · tr(ΔW C ΔWᵀ)`` with ``C = E[k kᵀ]`` over Wikipedia::

       ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹          (solved as a symmetric system in float64)

   ``λ`` is ``mom2_update_weight``.

The whole computation runs on a temporarily edited model that is restored bit-exactly before the
deltas are returned.  Batches of any size (1 to 10,000 requests) go through the same code; the
value optimisation runs ``v_batch_requests`` requests at a time (exact: requests are independent).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn

from editlab.data.corpora import Corpus
from editlab.data.records import EditRecord
from editlab.errors import require_float, require_int
from editlab.methods.base import Deltas, WeightEditSession
from editlab.methods.keyvalue import DEFAULT_TEMPLATE_PROMPTS, KeyValueEditor, mean_keys, optimize_values
from editlab.models.arch import arch_for, get_module

log = logging.getLogger(__name__)

__all__ = ["MEMIT", "memit_update"]


def memit_update(keys: torch.Tensor, residuals: torch.Tensor, cov: torch.Tensor, weight: float) -> torch.Tensor:
    """``ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹`` for keys ``K`` ``[d_in, n]``, residuals ``R`` ``[d_out, n]``,
    covariance ``C`` ``[d_in, d_in]`` and ``λ = weight``; float64, ``[d_out, d_in]``.

    It is the minimiser of ``‖ΔW K − R‖²_F + λ tr(ΔW C ΔWᵀ)``.
    """
    k = keys.double()
    a = weight * cov.double().to(k.device) + k @ k.T
    a = (a + a.T) / 2
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        adj = torch.cholesky_solve(k, chol)
    else:
        adj = torch.linalg.solve(a, k)
    return residuals.double() @ adj.T


class MEMIT(KeyValueEditor):
    """Mass-editing memory in a transformer (MEMIT).

    Args:
        layers: the blocks whose ``mlp_out`` is edited (a contiguous range in the paper).
        fact_token: ``subject_last`` (MEMIT), ``subject_first`` or ``last``.
        v_num_grad_steps, v_lr, v_weight_decay, clamp_norm_factor, kl_factor, kl_prompts,
            early_stop_loss: the optimisation of the target residuals (as ROME's values).
        mom2_update_weight: ``λ``, the weight of the covariance term (preservation of other keys).
        context_template_length_params, template_prompts, template_seed: context templates.
        v_batch_requests: requests optimised together (memory bound; results do not depend on it).
        mom2_corpus, mom2_n_tokens, mom2_dtype, stats_cache_dir: covariance statistics.
    """

    method = "MEMIT"

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
        mom2_update_weight: float = 20000.0,
        context_template_length_params: Sequence[Sequence[int]] = ((10, 5),),
        template_prompts: Sequence[str] = DEFAULT_TEMPLATE_PROMPTS,
        template_seed: int = 0,
        v_batch_requests: int = 32,
        mom2_corpus: Corpus | None = None,
        mom2_n_tokens: int | None = None,
        mom2_dtype: str = "float32",
        stats_cache_dir: str | None = None,
    ) -> None:
        super().__init__(
            layers, fact_token, v_num_grad_steps, v_lr, v_weight_decay, clamp_norm_factor, kl_factor, kl_prompts,
            early_stop_loss, context_template_length_params, template_prompts, template_seed, mom2_corpus,
            mom2_n_tokens, mom2_dtype, stats_cache_dir,
        )
        self.mom2_update_weight = require_float(mom2_update_weight, "mom2_update_weight", gt=0)
        self.v_batch_requests = require_int(v_batch_requests, "v_batch_requests", ge=1)

    def target_residuals(self, model: nn.Module, tokenizer, records: Sequence[EditRecord],
                         templates: Sequence[str]) -> torch.Tensor:
        """``Z`` ``[n, d]``: the optimised residual streams after the last layer (float64, CPU)."""
        spec = arch_for(model)
        site = spec.module_path(model, "residual", self.layers[-1])
        zs = []
        self.last_losses = []
        for begin in range(0, len(records), self.v_batch_requests):
            chunk = records[begin : begin + self.v_batch_requests]
            res = optimize_values(
                model, tokenizer, chunk, templates, site,
                fact_token=self.fact_token, num_steps=self.v_num_grad_steps, lr=self.v_lr,
                weight_decay=self.v_weight_decay, clamp_norm_factor=self.clamp_norm_factor,
                kl_factor=self.kl_factor, kl_prompts=self.kl_prompts, early_stop_loss=self.early_stop_loss,
            )
            zs.append(res.target)
            self.last_losses += res.losses
        return torch.cat(zs)

    def layer_update(self, keys: torch.Tensor, residuals: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
        """One layer's update ``ΔW`` ``[d_out, d_in]`` (float64) from its keys ``K`` ``[d_in, n]``, the
        residuals ``R`` ``[d_out, n]`` assigned to it and its key second moment ``C``: MEMIT's
        least-squares solve (:func:`memit_update`).  A variant of MEMIT with another per-layer
        solve (EMMET's equality constraints) overrides this; everything else is shared."""
        return memit_update(keys, residuals, cov, self.mom2_update_weight)

    def compute_deltas(self, model: nn.Module, tokenizer, records: Sequence[EditRecord]) -> Deltas:
        self.check(model, records)
        covs = self.stats.mom2(model, tokenizer, self.layers)
        return self.spread_updates(model, tokenizer, records,
                                   lambda layer, keys, resid: self.layer_update(keys, resid, covs[layer]))

    def spread_updates(self, model: nn.Module, tokenizer, records: Sequence[EditRecord],
                       solve: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]) -> Deltas:
        """Steps 1 and 2 with the layer update ``solve(layer, K, R) → ΔW`` (keys ``K`` ``[d_in, n]``,
        residuals ``R`` ``[d_out, n]``, float64 CPU; ``ΔW`` ``[d_out, d_in]``): MEMIT's solve is
        :meth:`layer_update` (EMMET overrides it); AlphaEdit substitutes its null-space projected one."""
        spec = arch_for(model)
        templates = self.templates(model, tokenizer)
        z_site = spec.module_path(model, "residual", self.layers[-1])
        zs = self.target_residuals(model, tokenizer, records, templates)
        deltas: Deltas = {}
        session = WeightEditSession(model)
        try:
            for j, layer in enumerate(self.layers):
                keys, _, extras = mean_keys(model, tokenizer, records, templates, [layer],
                                            fact_token=self.fact_token, extra_paths=[z_site])
                k = keys[layer].T.cpu()  # [d_in, n]
                cur = extras[z_site].double().cpu()  # [n, d]
                resid = (zs - cur).T / (len(self.layers) - j)  # [d, n]
                upd = solve(layer, k, resid)
                path = spec.module_path(model, "mlp_out", layer)
                param = get_module(model, path).weight
                delta = spec.delta_to_param(upd).to(param.dtype).to(param.device)
                name = f"{path}.weight"
                log.debug("%s layer %d: |resid| %.3f |ΔW| %.3f", self.method, layer, resid.norm().item(),
                          upd.norm().item())
                session.apply({name: delta})  # the next layers see this one's update
                deltas[name] = delta
        finally:
            session.restore()
        return deltas
