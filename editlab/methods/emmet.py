"""EMMET: batched editing with the edited facts as equality constraints.

Gupta, Sajnani and Anumanchipalli 2024, "A Unified Framework for Model Editing" (arXiv 2403.14236;
the reference repository reports EMMET with batches of up to 10,000 edits).  Defaults follow the
reference repository scalable-model-editing/unified-model-editing (``hparams/EMMET/gpt2-xl.json``:
layer 17, 20 value steps, lr 0.5, weight decay 0.5, clamp factor 0.75, KL factor 0.0625,
``mom2_update_weight`` 1000, ``emmet_lambda`` 0.1, ``update_norm_lambda`` 0); the update is that of
``emmet/emmet_main.py`` (``execute_emmet``).

The preservation–memorization view: an MLP output projection ``W₀`` should keep its outputs on
the keys ``K₀`` it has seen (second moment ``C₀ = E[k kᵀ]``) and map the edited keys ``K₁`` to
new values ``V₁``.  MEMIT asks the latter in the least-squares sense; EMMET asks it exactly::

    minimise ‖(W − W₀) K₀‖²   subject to   W K₁ = V₁

whose solution is (Lagrange multipliers; ``R = V₁ − W₀ K₁``)::

    ΔW = R (K₁ᵀ C₀⁻¹ K₁)⁻¹ K₁ᵀ C₀⁻¹

so ``ΔW K₁ = R`` holds exactly.  With many edits ``D = K₁ᵀ C₀⁻¹ K₁`` (``n × n``) becomes
ill-conditioned, and singular once ``n`` exceeds the key dimension; the reference adds
``emmet_lambda · I`` to ``D`` when ``n > 1`` (the constraints then hold up to that regulariser:
``ΔW K₁ = R (D + λ_E I)⁻¹ D``), and falls back to the pseudo-inverse when ``D`` cannot be
inverted.  ``C₀`` is first scaled by ``mom2_update_weight`` (and ``update_norm_lambda · I`` added),
as in the reference: with ``update_norm_lambda = 0`` the scale cancels except against
``emmet_lambda``, so it sets the regulariser's strength (``λ_E`` on the unscaled ``D`` is
``mom2_update_weight · emmet_lambda``).

Everything else is MEMIT's (:class:`editlab.methods.memit.MEMIT`): the target residuals ``z`` at
the last edited layer from ROME's value optimisation, keys averaged over context templates, the
residual spread over the layers (layer ``j`` of ``L`` takes ``(Z − Z_cur) / (L − j)`` on the model
with the lower layers already updated: the reference's ``emmet_main.py`` does the same), the key
statistics.  Only the per-layer solve differs (:meth:`EMMET.layer_update`).  Not stateful: in a
stream each batch is computed on the weights the earlier batches left, as MEMIT.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from editlab.data.corpora import Corpus
from editlab.errors import require_float
from editlab.methods.base import EditError
from editlab.methods.keyvalue import DEFAULT_TEMPLATE_PROMPTS
from editlab.methods.memit import MEMIT

log = logging.getLogger(__name__)

__all__ = ["EMMET", "emmet_update"]


def emmet_update(keys: torch.Tensor, residuals: torch.Tensor, cov: torch.Tensor, weight: float = 1.0,
                 emmet_lambda: float = 0.1, update_norm_lambda: float = 0.0) -> torch.Tensor:
    """``ΔW = R (Kᵀ A⁻¹ K + λ_E I)⁻¹ Kᵀ A⁻¹`` with ``A = weight · C + update_norm_lambda · I`` for keys
    ``K`` ``[d_in, n]``, residuals ``R`` ``[d_out, n]`` and key second moment ``C`` ``[d_in, d_in]``;
    float64, ``[d_out, d_in]``.  ``λ_E = emmet_lambda`` is added only when ``n > 1`` (reference).

    It is the minimiser of ``tr(ΔW A ΔWᵀ)`` subject to ``ΔW K = R`` (for ``λ_E = 0`` and ``K`` of
    full column rank).  When ``D = Kᵀ A⁻¹ K (+ λ_E I)`` is not positive definite (``λ_E = 0`` and
    more edits than key dimensions, or numerically singular), its pseudo-inverse is used, as the
    reference falls back to ``torch.linalg.pinv``.
    """
    k = keys.double()
    n, d_in = k.shape[1], k.shape[0]
    a = weight * cov.double().to(k.device)
    if update_norm_lambda:
        a = a + update_norm_lambda * torch.eye(d_in, dtype=a.dtype, device=a.device)
    a = (a + a.T) / 2
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        a_inv_k = torch.cholesky_solve(k, chol)  # A⁻¹ K, [d_in, n]
    else:
        try:
            a_inv_k = torch.linalg.solve(a, k)
        except RuntimeError as err:  # torch.linalg.LinAlgError
            raise EditError("EMMET: the key second moment is singular (too few statistics tokens?); "
                            "set update_norm_lambda > 0") from err
    d = k.T @ a_inv_k
    d = (d + d.T) / 2
    if n > 1:
        d = d + emmet_lambda * torch.eye(n, dtype=d.dtype, device=d.device)  # against an ill-conditioned D
    rank_deficient = n > d_in and emmet_lambda == 0  # singular by construction
    chol_d, info = torch.linalg.cholesky_ex(d)
    if int(info) == 0 and not rank_deficient:
        adj = torch.cholesky_solve(a_inv_k.T, chol_d)  # D⁻¹ Kᵀ A⁻¹, [n, d_in]
    else:
        log.warning("EMMET: K^T C^-1 K (%d x %d) is singular: pseudo-inverse", n, n)
        adj = torch.linalg.pinv(d, hermitian=True) @ a_inv_k.T
    return residuals.double().to(adj.device) @ adj


class EMMET(MEMIT):
    """Equality-constrained mass model editing (EMMET): MEMIT with ``W K₁ = V₁`` as constraints.

    Args:
        layers: the blocks whose ``mlp_out`` is edited (one layer in the reference's hparams;
            several spread the residual as MEMIT).
        fact_token, v_num_grad_steps, v_lr, v_weight_decay, clamp_norm_factor, kl_factor, kl_prompts,
            early_stop_loss: the optimisation of the target residuals (MEMIT's ``compute_z``).
        mom2_update_weight: scale of the key second moment ``C₀`` (reference: ``cov *= weight``);
            relative to ``emmet_lambda`` it sets the regulariser's strength.
        emmet_lambda: ``λ_E`` added to the diagonal of ``K₁ᵀ C₀⁻¹ K₁`` when a batch has more than
            one edit (keeps it invertible for large batches).
        update_norm_lambda: ``ν`` added to the diagonal of the scaled ``C₀`` (a penalty on
            ``‖ΔW‖²``; 0 in every reference hparams file).
        context_template_length_params, template_prompts, template_seed: context templates.
        v_batch_requests: requests optimised together (memory bound; results do not depend on it).
        mom2_corpus, mom2_n_tokens, mom2_dtype, stats_cache_dir: key statistics.
    """

    method = "EMMET"

    def __init__(
        self,
        layers: Sequence[int] = (17,),
        fact_token: str = "subject_last",
        v_num_grad_steps: int = 20,
        v_lr: float = 0.5,
        v_weight_decay: float = 0.5,
        clamp_norm_factor: float = 0.75,
        kl_factor: float = 0.0625,
        kl_prompts: Sequence[str] = ("{} is a",),
        early_stop_loss: float = 5e-2,
        mom2_update_weight: float = 1000.0,
        emmet_lambda: float = 0.1,
        update_norm_lambda: float = 0.0,
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
            layers=layers, fact_token=fact_token, v_num_grad_steps=v_num_grad_steps, v_lr=v_lr,
            v_weight_decay=v_weight_decay, clamp_norm_factor=clamp_norm_factor, kl_factor=kl_factor,
            kl_prompts=kl_prompts, early_stop_loss=early_stop_loss, mom2_update_weight=mom2_update_weight,
            context_template_length_params=context_template_length_params, template_prompts=template_prompts,
            template_seed=template_seed, v_batch_requests=v_batch_requests, mom2_corpus=mom2_corpus,
            mom2_n_tokens=mom2_n_tokens, mom2_dtype=mom2_dtype, stats_cache_dir=stats_cache_dir,
        )
        self.emmet_lambda = require_float(emmet_lambda, "emmet_lambda", ge=0)
        self.update_norm_lambda = require_float(update_norm_lambda, "update_norm_lambda", ge=0)

    def layer_update(self, keys: torch.Tensor, residuals: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
        """EMMET's equality-constrained solve (:func:`emmet_update`) in place of MEMIT's least squares."""
        if keys.shape[1] > keys.shape[0]:
            log.info("EMMET: %d edits > key dimension %d: the constraints hold only up to emmet_lambda",
                     keys.shape[1], keys.shape[0])
        return emmet_update(keys, residuals, cov, self.mom2_update_weight, self.emmet_lambda,
                            self.update_norm_lambda)
