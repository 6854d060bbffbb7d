"""Teacher-forced scoring that computes only the logits it scores.

One forward per chunk of (prompt, target) sequences runs the network up to the LM head (the
vocabulary projection itself is skipped by stopping the forward at the head's input), gathers the
hidden states at the positions that predict target tokens, and projects just those.  With a
262k-token vocabulary (Gemma-3) this is the difference between megabytes and gigabytes.

:func:`lm_logits_at` is the shared primitive; editors that optimise a target likelihood use it
too, so training objectives and metrics read logits the same way.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList

from editlab.data.collate import PairBatch, encode_pairs
from editlab.models.arch import arch_for, get_module
from editlab.tracing import CallRecorder

__all__ = [
    "ANSWER_END", "ProbeScores", "ScoreCache", "answer_token_table", "cut_answer", "greedy_generate", "head_logits",
    "head_nll", "is_edit_wrapper", "lm_logits_at", "score_pairs", "wrapper_logits_at",
]


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


@dataclass
class ProbeScores:
    """Per-sequence teacher-forced results.

    ``nll``: mean negative log-likelihood of the target tokens (ROME's per-token mean);
    ``pred``/``target``/``mask``: ``[N, T]`` argmax tokens, target tokens, real-token mask.
    """

    nll: torch.Tensor
    pred: torch.Tensor
    target: torch.Tensor
    mask: torch.Tensor

    def to(self, device: torch.device | str) -> ProbeScores:
        return ProbeScores(self.nll.to(device), self.pred.to(device), self.target.to(device), self.mask.to(device))


@torch.no_grad()
def _score_batch(model: nn.Module, batch: PairBatch) -> ProbeScores:
    logits = lm_logits_at(model, batch)
    logp = torch.log_softmax(logits, dim=-1)
    targets = batch.target_ids[batch.target_mask]
    token_nll = -logp.gather(1, targets.unsqueeze(1)).squeeze(1)
    pred_flat = logits.argmax(dim=-1)
    pred = torch.zeros_like(batch.target_ids)
    pred[batch.target_mask] = pred_flat
    nll_tok = torch.zeros(batch.target_ids.shape, dtype=torch.float32, device=logits.device)
    nll_tok[batch.target_mask] = token_nll
    counts = batch.target_mask.sum(dim=1).clamp(min=1)
    return ProbeScores(nll_tok.sum(dim=1) / counts, pred, batch.target_ids, batch.target_mask)


def score_pairs(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    chunk_size: int = 64,
    max_prompt_tokens: int | None = None,
) -> ProbeScores:
    """Teacher-forced scores of ``targets`` after ``prompts``, in chunks of ``chunk_size`` sequences.

    Sequences are sorted by length before chunking so each chunk pads little.
    """
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    start = getattr(model.config, "decoder_start_token_id", None)
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(targets[i]))
    parts: list[tuple[list[int], ProbeScores]] = []
    width = 0
    for lo in range(0, len(order), chunk_size):
        idx = order[lo: lo + chunk_size]
        batch = encode_pairs(
            tokenizer,
            [prompts[i] for i in idx],
            [targets[i] for i in idx],
            seq2seq=seq2seq,
            decoder_start_token_id=start,
            max_prompt_tokens=max_prompt_tokens,
        ).to(device)
        scores = _score_batch(model, batch)
        width = max(width, scores.pred.shape[1])
        parts.append((idx, scores))
    n = len(prompts)
    nll = torch.empty(n, device=device)
    pred = torch.zeros((n, width), dtype=torch.long, device=device)
    target = torch.zeros((n, width), dtype=torch.long, device=device)
    mask = torch.zeros((n, width), dtype=torch.bool, device=device)
    for idx, s in parts:
        rows = torch.tensor(idx, device=device)
        t = s.pred.shape[1]
        nll[rows] = s.nll
        pred[rows, :t] = s.pred
        target[rows, :t] = s.target
        mask[rows, :t] = s.mask
    return ProbeScores(nll, pred, target, mask)


class ScoreCache:
    """Scores of (prompt, target) pairs on one fixed model state, computed once.

    The edit loop keeps one for the unedited model: pre-edit scores of every record are computed
    in large batches up front (identical pairs shared across records) and read back per batch.
    """

    def __init__(self) -> None:
        self._rows: dict[tuple[str, str], tuple[float, torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, pair: tuple[str, str]) -> bool:
        return pair in self._rows

    def clear(self) -> None:
        self._rows.clear()

    def scores(self, model: nn.Module, tokenizer, prompts: Sequence[str], targets: Sequence[str],
               **kwargs) -> ProbeScores:
        """Scores of the pairs, computing (in one batched call) only those not cached yet."""
        pairs = list(zip(prompts, targets))
        missing = list(dict.fromkeys(p for p in pairs if p not in self._rows))
        if missing:
            new = score_pairs(model, tokenizer, [p for p, _ in missing], [t for _, t in missing], **kwargs)
            for i, pair in enumerate(missing):
                n = int(new.mask[i].sum())
                self._rows[pair] = (float(new.nll[i]), new.pred[i, :n].cpu(), new.target[i, :n].cpu())
        rows = [self._rows[p] for p in pairs]
        width = max(len(r[1]) for r in rows)
        nll = torch.tensor([r[0] for r in rows])
        pred = torch.zeros((len(rows), width), dtype=torch.long)
        target = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, (_, p, t) in enumerate(rows):
            pred[i, : len(p)] = p
            target[i, : len(t)] = t
            mask[i, : len(p)] = True
        return ProbeScores(nll, pred, target, mask)


ANSWER_END = re.compile(r"\n|[.!?](?=\s|$)")
"""Where a generated answer ends: a newline, or ``.``/``!``/``?`` followed by whitespace or the end."""


def cut_answer(text: str) -> str:
    """The answer part of a generation: leading whitespace dropped, cut before the first
    :data:`ANSWER_END` (so ``" Paris.\nThe"`` → ``"Paris"``)."""
    text = text.lstrip()
    match = ANSWER_END.search(text)
    return text[: match.start()] if match else text


_ANSWER_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def answer_token_table(tokenizer, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ends, content)``, two bool tensors over token ids (cached per tokenizer).

    ``ends[v]``: token ``v``'s text contains a newline or ends (right-stripped) with ``.``, ``!``
    or ``?``, i.e. it can end an answer; ``content[v]``: its text has a non-space character.
    ``size`` pads both to the model's vocabulary (ids past the tokenizer's are neither).
    """
    n = len(tokenizer)
    table = _ANSWER_TABLES.get(tokenizer)
    if table is None:
        texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=True)
        ends = torch.tensor([("\n" in t) or t.rstrip().endswith((".", "!", "?")) for t in texts])
        content = torch.tensor([bool(t.strip()) for t in texts])
        table = (ends, content)
        _ANSWER_TABLES[tokenizer] = table
    ends, content = table
    if size is not None and size > n:
        pad = torch.zeros(size - n, dtype=torch.bool)
        ends, content = torch.cat([ends, pad]), torch.cat([content, pad])
    return ends, content


class _AnswerStop(StoppingCriteria):
    """Per-row stop: the row reached its own token cap, or (``answer_end``) produced a token that
    ends an answer after the answer had started (a leading newline does not end an empty answer).
    Records how many new tokens each row kept."""

    def __init__(self, caps: torch.Tensor, offset: int, tables: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        self.caps = caps
        self.offset = offset
        self.tables = tables
        self.done = torch.zeros_like(caps, dtype=torch.bool)
        self.started = torch.zeros_like(self.done)
        self.kept = caps.clone()

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        step = input_ids.shape[1] - self.offset
        stop = torch.full_like(self.caps, step) >= self.caps
        if self.tables is not None:
            last = input_ids[:, -1]
            ends, content = self.tables[0].to(last.device), self.tables[1].to(last.device)
            self.started |= content[last]
            stop |= ends[last] & self.started
        new = stop & ~self.done
        self.kept[new] = step
        self.done |= stop
        return self.done.clone()


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int | Sequence[int] = 50,
    chunk_size: int = 16,
    stop_at_answer_end: bool = False,
) -> list[str]:
    """Greedy continuations of ``prompts`` (batched, KV cache, left padding for decoder-only models;
    a seq2seq model's encoder reads the prompt as is), decoded without the prompt.

    ``max_new_tokens``: one cap for all, or one per prompt (answer scoring derives it from the
    target's length); with per-prompt caps the prompts are sorted by cap and length before chunking,
    so a chunk's rows need similar numbers of steps and little padding.  A row stops at its cap;
    with ``stop_at_answer_end`` also at EOS, at a newline or at a sentence end (see
    :func:`answer_token_table`), and the text returned is :func:`cut_answer` of the generation.
    A chunk stops as soon as all its rows have stopped (rows that stopped earlier are carried as
    padding until then; sorting by cap keeps that short).
    """
    device = next(model.parameters()).device
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    per_row = not isinstance(max_new_tokens, int)
    caps = list(max_new_tokens) if per_row else [max_new_tokens] * len(prompts)
    if len(caps) != len(prompts):
        raise ValueError(f"{len(caps)} token caps for {len(prompts)} prompts")
    if any(c < 1 for c in caps):
        raise ValueError(f"token caps must be >= 1, got {min(caps)}")
    order = (sorted(range(len(prompts)), key=lambda i: (caps[i], len(prompts[i]))) if per_row
             else list(range(len(prompts))))
    tables = None
    if stop_at_answer_end:
        tables = answer_token_table(tokenizer, int(model.get_output_embeddings().weight.shape[0]))
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs: list[str] = [""] * len(prompts)
    try:
        for lo in range(0, len(order), chunk_size):
            idx = order[lo: lo + chunk_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True).to(device)
            row_caps = torch.tensor([caps[i] for i in idx], device=device)
            offset = 1 if seq2seq else enc["input_ids"].shape[1]
            stop = _AnswerStop(row_caps, offset, tables)
            out = model.generate(
                **enc,
                max_new_tokens=int(row_caps.max()),
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                stopping_criteria=StoppingCriteriaList([stop]),
            )
            new = out[:, offset:]
            for j, i in enumerate(idx):
                tokens = new[j, : int(stop.kept[j])]
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                outputs[i] = cut_answer(text) if stop_at_answer_end else text
    finally:
        tokenizer.padding_side = side
    return outputs
