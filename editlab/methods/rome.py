"""ROME: rank-one model editing of one MLP output projection.

Meng, Bau, Andonian and Belinkov 2022, "Locating and Editing Factual Associations in GPT"
(NeurIPS); defaults follow the reference repository kmeng01/rome (``hparams/ROME/gpt2-xl.json``:
20 value steps, lr 0.5, weight decay 0.5, clamp factor 4, KL factor 0.0625, ``mom2_adjustment``
on, context templates of 5 and 10 tokens, ten of each).  The optional r-ROME correction is from
Gupta, Sajnani and Anumanchipalli 2024, "Rebuilding ROME: Resolving Model Collapse during
Sequential Model Editing" (scalable-model-editing/rebuilding-rome).

For a request (subject s, prompt p, new target o) and a layer l with MLP output weight ``W``:

1. **key** ``k* = mean_t k(template_t(p))`` — the input of ``W`` at the subject's last token,
   averaged over the model-generated context templates (``"{}"`` and 20 generated prefixes);
2. **value** ``v* = v₀ + δ`` — ``δ`` added to ``W``'s output at the subject's last token is
   optimised so the model predicts o after every template (see
   :func:`editlab.methods.keyvalue.optimize_values`);
3. **update** ``ΔW = (v* − W k̂) uᵀ / (uᵀ k̂)`` with ``u = C⁻¹ k*`` normalised (``C = E[k kᵀ]``
   over Wikipedia; ``mom2_adjustment=False`` uses ``u = k*``), so that ``(W + ΔW) k̂ = v*``.
   Original ROME takes ``k̂`` (and ``W k̂``) from the bare prompt; r-ROME (``r_rome=True``) uses
   the template-averaged ``k*`` there too, which makes the update consistent with ``u`` and keeps
   long sequential edit streams from collapsing.

Several records in one call are edited one after another, each on the model with the previous
ones applied (as ``apply_rome_to_model``); the returned deltas are their sum.  The model is
restored bit-exactly before returning.

Template prompts: kmeng01/rome samples its templates after ``<|endoftext|>``; EasyEdit (whose
figures the benchmark compares with) and MEMIT start them from ``The/Therefore/Because/I/You``,
which is our default (``template_prompts``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from editlab.data.corpora import Corpus
from editlab.data.records import EditRecord
from editlab.errors import require_bool
from editlab.methods.base import Deltas, EditError, WeightEditSession
from editlab.methods.keyvalue import DEFAULT_TEMPLATE_PROMPTS, KeyValueEditor, mean_keys, optimize_values
from editlab.models.arch import arch_for, get_module

log = logging.getLogger(__name__)

__all__ = ["ROME"]


class ROME(KeyValueEditor):
    """Rank-one model editing (ROME), optionally with the r-ROME key correction.

    Args:
        layers: blocks whose ``mlp_out`` is edited (ROME edits one; several are edited
            independently, each computed on the unedited model, as the reference does).
        fact_token: ``subject_last`` (ROME), ``subject_first`` or ``last``.
        v_num_grad_steps, v_lr, v_weight_decay, clamp_norm_factor, kl_factor: the value
            optimisation (Adam steps, learning rate, weight on ``‖δ‖/‖v₀‖²``, ``‖δ‖`` bound in
            units of ``‖v₀‖``, weight of the KL term).
        kl_prompts: templates whose subject-token distribution the KL term preserves.
        early_stop_loss: stop a request's optimisation below this loss.
        mom2_adjustment: precondition the key with the inverse key covariance.
        context_template_length_params: ``(length, count)`` pairs of generated templates.
        template_prompts, template_seed: how templates are sampled (cached per model).
        r_rome: use the template-averaged key in the update's denominator and residual.
        mom2_corpus, mom2_n_tokens, mom2_dtype, stats_cache_dir: the covariance statistics
            (:func:`editlab.stats.layer_stats`; default the offline Wikipedia sample, all tokens,
            float32 as ROME's ``mom2_dtype``).
    """

    method = "ROME"

    def __init__(
        self,
        layers: Sequence[int] = (17,),
        fact_token: str = "subject_last",
        v_num_grad_steps: int = 20,
        v_lr: float = 0.5,
        v_weight_decay: float = 0.5,
        clamp_norm_factor: float = 4.0,
        kl_factor: float = 0.0625,
        kl_prompts: Sequence[str] = ("{} is a",),
        early_stop_loss: float = 5e-2,
        mom2_adjustment: bool = True,
        context_template_length_params: Sequence[Sequence[int]] = ((5, 10), (10, 10)),
        template_prompts: Sequence[str] = DEFAULT_TEMPLATE_PROMPTS,
        template_seed: int = 0,
        r_rome: bool = False,
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
        self.mom2_adjustment = require_bool(mom2_adjustment, "mom2_adjustment")
        self.r_rome = require_bool(r_rome, "r_rome")

    def rank_one(self, model: nn.Module, tokenizer, record: EditRecord, layer: int,
                 templates: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """``(u, w, parts)`` with ``ΔW = w uᵀ`` in ``(out, in)`` layout (float64) for one record.

        ``parts`` holds ``k_star`` (template-averaged key), ``k_hat``/``out_hat`` (the key and the
        module output used in the residual), ``v_star`` and ``v_init``.
        """
        spec = arch_for(model)
        keys, outs, _ = mean_keys(model, tokenizer, [record], templates, [layer], fact_token=self.fact_token)
        k_star = keys[layer][0].cpu()
        if self.mom2_adjustment:
            u = self.stats.solve(model, tokenizer, layer, k_star.unsqueeze(1)).squeeze(1)
        else:
            u = k_star.clone()
        u = u / u.norm()
        site = spec.module_path(model, "mlp_out", layer)
        res = optimize_values(
            model, tokenizer, [record], templates, site,
            **self.value_kwargs(),
        )
        self.last_losses.append(res.losses[0])
        if self.r_rome:
            k_hat, out_hat = k_star, outs[layer][0].cpu()
        else:
            k0, o0, _ = mean_keys(model, tokenizer, [record], ["{}"], [layer], fact_token=self.fact_token)
            k_hat, out_hat = k0[layer][0].cpu(), o0[layer][0].cpu()
        denom = torch.dot(k_hat, u)
        if not torch.isfinite(denom) or denom.abs() < 1e-12:
            raise EditError(f"ROME: record {record.record_id!r}: key and update direction are orthogonal")
        w = (res.target[0] - out_hat) / denom
        parts = {"k_star": k_star, "k_hat": k_hat, "out_hat": out_hat, "v_star": res.target[0],
                 "v_init": res.init[0]}
        return u, w, parts

    def compute_deltas(self, model: nn.Module, tokenizer, records: Sequence[EditRecord]) -> Deltas:
        self.check(model, records)
        spec = arch_for(model)
        templates = self.templates(model, tokenizer)
        if self.mom2_adjustment:
            self.stats.mom2(model, tokenizer, self.layers)  # all layers in one pass if missing
        self.last_losses = []
        total: Deltas = {}
        session = WeightEditSession(model)
        try:
            for i, record in enumerate(records):
                step: Deltas = {}
                for layer in self.layers:
                    u, w, _ = self.rank_one(model, tokenizer, record, layer, templates)
                    path = spec.module_path(model, "mlp_out", layer)
                    param = get_module(model, path).weight
                    delta = spec.delta_to_param(torch.outer(w, u)).to(param.dtype).to(param.device)
                    step[f"{path}.weight"] = delta
                for name, delta in step.items():
                    total[name] = total[name] + delta if name in total else delta
                if i + 1 < len(records):
                    session.apply(step)  # the next record is computed on the edited model
        finally:
            session.restore()
        return total
