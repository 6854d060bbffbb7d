"""Reading a model's LM head: logits only where they are needed.

The forward runs up to the LM head (stopped at the head's input, so the vocabulary projection is
skipped), and only the positions that are scored are projected.  With a 262k-token vocabulary
(Gemma-3) this is the difference between megabytes and gigabytes.

These are the primitives shared by editors (:mod:`editlab.methods`: target likelihoods, the fused
NLL :func:`head_nll`), causal tracing and evaluation (:mod:`editlab.evaluation`: teacher-forced
scores, perplexity), so training objectives and metrics read logits the same way.  They live here,
below both, because editors may not import :mod:`editlab.evaluation` (imports point one way:
``lit → methods, evaluation → models, data, metrics, tracing, scoring``).
"""

from __future__ import annotations

import torch
from torch import nn

from editlab.data.collate import PairBatch, encode_pairs
from editlab.models.arch import arch_for, get_module, is_encoder_decoder
from editlab.tracing import CallRecorder

__all__ = ["broken_pairs", "head_logits", "head_nll", "is_edit_wrapper", "lm_head_input", "lm_logits_at",
           "wrapper_logits_at"]


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Project hidden states (already final-normed, as the LM head receives them) to logits,
    applying the model's final logit soft-capping when its config has one (Gemma-2/3)."""
    head = get_module(model, arch_for(model).lm_head)
    if isinstance(head, nn.Linear) and hidden.dim() == 2:
        # (W h^T)^T reads the [V, d] weight row-major: several times faster than F.linear's
        # h W^T for the few rows scored here (the weight is streamed, not packed).
        logits = (head.weight @ hidden.t()).t()
        if head.bias is not None:
            logits = logits + head.bias
        logits = logits.float()
    else:
        logits = head(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


class _FusedHeadNLL(torch.autograd.Function):
    """``-log softmax(cap(W h + b))[y]`` per row, with its gradient w.r.t. ``h``, in ONE pass over W.

    The vocabulary is processed in chunks with an online log-sum-exp; the gradient
    ``E_p[f(z) w] - f(z_y) w_y`` (``f`` = derivative of the soft-cap, 1 without one) is accumulated
    in the same pass while each chunk of W is still in cache.  Optimising a target likelihood
    on CPU is bound by streaming weights from memory; an LM head read once instead of twice
    (forward, then backward) is the largest single saving for small models with big vocabularies.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, cap, chunk):
        h = hidden.detach().float()
        m = torch.full((h.shape[0],), -float("inf"), device=h.device)
        s = torch.zeros(h.shape[0], device=h.device)
        u = torch.zeros_like(h)
        for lo in range(0, weight.shape[0], chunk):
            w = weight[lo: lo + chunk].float()
            z = (w @ h.t()).t()
            if bias is not None:
                z = z + bias[lo: lo + chunk].float()
            if cap:
                z = torch.tanh(z / cap) * cap
            new_m = torch.maximum(m, z.max(dim=1).values)
            scale = torch.exp(m - new_m)
            e = torch.exp(z - new_m.unsqueeze(1))
            s = s * scale + e.sum(dim=1)
            if cap:
                e = e * (1 - (z / cap) ** 2)
            u = u * scale.unsqueeze(1) + e @ w
            m = new_m
        w_y = weight[targets].float()
        z_y = (h * w_y).sum(dim=1)
        if bias is not None:
            z_y = z_y + bias[targets].float()
        f_y = torch.ones_like(z_y)
        if cap:
            z_y = torch.tanh(z_y / cap) * cap
            f_y = 1 - (z_y / cap) ** 2
        ctx.save_for_backward(u / s.unsqueeze(1) - f_y.unsqueeze(1) * w_y)
        return m + torch.log(s) - z_y

    @staticmethod
    def backward(ctx, grad_out):
        (grad_h,) = ctx.saved_tensors
        return grad_out.unsqueeze(1) * grad_h, None, None, None, None, None


def head_nll(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Per-row negative log-likelihood of ``targets`` under the LM head applied to ``hidden``
    (``[M, d]`` → ``[M]``), differentiable w.r.t. ``hidden``; equal to
    ``-log_softmax(head_logits(model, hidden))[targets]`` but reading the head's weight once."""
    head = get_module(model, arch_for(model).lm_head)
    if not isinstance(head, nn.Linear) or hidden.dim() != 2:
        logp = torch.log_softmax(head_logits(model, hidden), dim=-1)
        return -logp.gather(1, targets.unsqueeze(1)).squeeze(1)
    cap = getattr(model.config, "final_logit_softcapping", None) or None
    return _FusedHeadNLL.apply(hidden, head.weight, head.bias, targets, cap, chunk)


def lm_head_input(model: nn.Module, batch: PairBatch) -> torch.Tensor:
    """The tensor the LM head would receive for ``batch`` (``[N, L, d]``), without computing logits."""
    with CallRecorder(model, [], stop_at=arch_for(model).lm_head) as rec:
        model(**batch.model_inputs(), use_cache=False)
    if rec.stopped_input is None:
        raise RuntimeError("the forward pass never reached the LM head")
    return rec.stopped_input


def is_edit_wrapper(model: nn.Module) -> bool:
    """True for a memory-based editor's view of a model (IKE, SERAC; see
    :class:`editlab.methods.base.Edit`): it is called like the model and returns logits aligned
    with its inputs, but has no LM head of its own to stop at."""
    return bool(getattr(model, "is_edit_wrapper", False))


def wrapper_logits_at(model: nn.Module, rows: torch.Tensor, positions: torch.Tensor,
                      inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """An edit wrapper's logits (float32 ``[M, V]``) at ``(rows, positions)`` of ``model(**inputs)``:
    through its ``logits_at`` (the LM head only where asked, e.g.
    :meth:`editlab.methods.conditioned.ConditionedLM.logits_at`) when it has one, else by
    indexing its full aligned logits."""
    at = getattr(model, "logits_at", None)
    if callable(at):
        return at(rows, positions, **inputs).float()
    return model(**inputs, use_cache=False).logits[rows, positions].float()


def lm_logits_at(model: nn.Module, batch: PairBatch) -> torch.Tensor:
    """Logits (float32) at every real target position of ``batch``, row-major: ``[M, V]``."""
    rows, pos = batch.gather_index()
    if is_edit_wrapper(model):
        return wrapper_logits_at(model, rows, pos, batch.model_inputs())
    hidden = lm_head_input(model, batch)
    return head_logits(model, hidden[rows, pos])


@torch.no_grad()
def broken_pairs(model: nn.Module, tokenizer, prompts: list[str], targets: list[str],
                 blocks_of: nn.Module | None = None, chunk_size: int = 32) -> list[int]:
    """Indices of the ``(prompt, target)`` pairs on which ``model`` is numerically broken: its
    teacher-forced logits at the target positions are not all finite (NaN or ±Inf), or — with
    ``blocks_of``, the base model whose blocks ``model`` runs — a block's output (the residual
    stream) has a mean square that is not finite in float32.  That mean square is what the next
    RMSNorm / LayerNorm computes; once it overflows, the norm returns zeros or NaN and the output
    no longer depends on the input, even where the logits stay finite (FT-L with a learning rate
    of 1e30 on a Llama).  One forward per chunk of pairs of similar length (less padding), the LM
    head only at the target positions."""
    seq2seq = is_encoder_decoder(model)
    start = getattr(getattr(model, "config", None), "decoder_start_token_id", None)
    device = next(model.parameters()).device
    blocks = list(get_module(blocks_of, arch_for(blocks_of).layers)) if blocks_of is not None else []
    bad: list[int] = []
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(targets[i]))
    for lo in range(0, len(order), chunk_size):
        group = order[lo: lo + chunk_size]
        batch = encode_pairs(tokenizer, [prompts[i] for i in group], [targets[i] for i in group],
                             seq2seq=seq2seq, decoder_start_token_id=start).to(device)
        broken = torch.zeros(len(batch), dtype=torch.long, device=device)

        def check(module: nn.Module, args: tuple, output) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            if not torch.is_tensor(hidden) or not hidden.is_floating_point():
                return
            ok = torch.isfinite(hidden.float().pow(2).mean(-1))
            if hidden.dim() == 3 and hidden.shape[0] == len(broken):
                broken.add_((~ok).any(-1).long().to(device))
            elif not ok.all():  # rows that do not map to the batch's (an editor's own inputs)
                broken.add_(1)

        handles = [block.register_forward_hook(check) for block in blocks]
        try:
            logits = lm_logits_at(model, batch)
        finally:
            for handle in handles:
                handle.remove()
        rows, _ = batch.gather_index()
        broken.index_add_(0, rows.to(device), (~torch.isfinite(logits).all(dim=-1)).long().to(device))
        bad.extend(group[int(i)] for i in broken.nonzero().flatten())
    return sorted(bad)
