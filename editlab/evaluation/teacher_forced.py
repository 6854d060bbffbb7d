"""Teacher-forced scores of (prompt, target) sequences: what the probe metrics read.

:func:`score_pairs` scores target tokens after prompts in chunks (sorted by length, so a chunk pads
little), projecting only the scored positions to the vocabulary (:func:`editlab.scoring.lm_logits_at`);
:class:`ScoreCache` keeps the scores of one fixed model state (the unedited model) so that each
pair is scored once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from dataclasses import dataclass

import torch
from torch import nn

from editlab.data.collate import PairBatch, encode_pairs
from editlab.models.arch import is_encoder_decoder
from editlab.scoring import lm_logits_at

__all__ = ["ProbeScores", "ScoreCache", "score_pairs"]


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
    seq2seq = is_encoder_decoder(model)
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

    def state_dict(self) -> dict[str, Any]:
        """The cached scores as a few flat tensors and lists of strings (a stream checkpoint saves
        them: the resumed stream reads the very same pre-edit scores)."""
        rows = list(self._rows.items())
        lengths = [len(pred) for _, (_, pred, _) in rows]
        flat = lambda i: torch.cat([r[i] for _, r in rows]) if rows else torch.zeros(0, dtype=torch.long)  # noqa: E731
        return {"prompts": [p for (p, _), _ in rows], "targets": [t for (_, t), _ in rows],
                "nll": torch.tensor([r[0] for _, r in rows], dtype=torch.float64),
                "lengths": torch.tensor(lengths, dtype=torch.long), "pred": flat(1), "target": flat(2)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the cache with what :meth:`state_dict` returned."""
        self._rows.clear()
        preds = torch.split(state["pred"], state["lengths"].tolist())
        targets = torch.split(state["target"], state["lengths"].tolist())
        for i, pair in enumerate(zip(state["prompts"], state["targets"])):
            self._rows[pair] = (float(state["nll"][i]), preds[i].clone(), targets[i].clone())

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
