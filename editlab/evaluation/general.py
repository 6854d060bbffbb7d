"""General ability of a model: what an edit (stream) costs on everything else.

:class:`GeneralAbility` measures, on the model as it is when called,

* **perplexity** on a fixed held-out text sample: the first ``n_tokens`` tokens of a corpus of
  :mod:`editlab.data.corpora` (:class:`~editlab.data.corpora.WikipediaSample`, the offline English Wikipedia
  extract, by default; :class:`~editlab.data.corpora.TextFile` or :class:`~editlab.data.corpora.HFDataset` for
  other text), packed as in :func:`editlab.data.corpora.pack_rows` (documents joined by EOS, rows of
  ``seq_len`` tokens).  When the tokenizer adds a BOS token by default it is prepended to every
  row and every row token is scored; otherwise a row's first token is context only.  Rows have
  equal lengths within a forward (no padding); the forward stops at the LM head's input and the
  vocabulary projection runs on ``logit_rows`` positions at a time.
* **PIQA accuracy** (Bisk et al. 2020) on the first ``piqa_examples`` items of the validation set:
  each solution is scored by its log-likelihood after ``"Question: {goal}\\nAnswer:"``
  (:func:`editlab.evaluation.teacher_forced.score_pairs`: batched, padding-safe, only the scored logits), and the
  prediction is the solution with the higher total (``piqa_acc``) or the higher total per
  character of the continuation (``piqa_acc_norm``): lm-evaluation-harness's ``acc`` /
  ``acc_norm``.

Every value is of the model in this process: under DDP each process measures its own model
(metric states are not reduced over processes; the edit loop's logger averages the values).

Seq2seq models get PIQA (the encoder reads the question, the decoder scores the solution) but no
perplexity: a decoder has no free-running text to score, so that part is skipped with a warning.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from torch import nn

from editlab.data.collate import target_text
from editlab.data.loaders import ChoiceItem, load_piqa
from editlab.evaluation.teacher_forced import score_pairs
from editlab.metrics.general import MultipleChoiceAccuracy, Perplexity
from editlab.models.arch import arch_for, is_encoder_decoder
from editlab.scoring import head_logits, is_edit_wrapper, wrapper_logits_at
from editlab.data.corpora import Corpus, WikipediaSample, batch_rows, pack_rows
from editlab.stats import effective_seq_len
from editlab.tracing import CallRecorder

__all__ = ["GeneralAbility", "PIQA_TEMPLATE", "token_nll"]

log = logging.getLogger(__name__)

PIQA_TEMPLATE = "Question: {goal}\nAnswer:"
"""lm-evaluation-harness's PIQA context; the continuation is ``" " + solution``."""


def token_nll(model: nn.Module, ids: torch.Tensor, logit_rows: int = 512) -> torch.Tensor:
    """Negative log-likelihood of ``ids[:, 1:]`` given the tokens before them (``[B, L]`` →
    ``[B, L-1]``, float32), without materialising more than ``logit_rows`` rows of logits.

    A memory-based editor's wrapper (:func:`editlab.scoring.is_edit_wrapper`) runs whole rows, so
    it is called on as many rows at a time as fit in ``logit_rows`` scored positions (at least
    one row), with the LM head applied at those positions only
    (:func:`editlab.scoring.wrapper_logits_at`)."""
    if is_edit_wrapper(model):
        n_pos = ids.shape[1] - 1
        out = torch.empty((ids.shape[0], n_pos), dtype=torch.float32, device=ids.device)
        step = max(1, logit_rows // max(1, n_pos))
        for lo in range(0, ids.shape[0], step):
            rows = ids[lo: lo + step]
            n = rows.shape[0]
            row_idx = torch.arange(n, device=ids.device).repeat_interleave(n_pos)
            pos_idx = torch.arange(n_pos, device=ids.device).repeat(n)
            logits = wrapper_logits_at(model, row_idx, pos_idx,
                                       {"input_ids": rows, "attention_mask": torch.ones_like(rows)})
            targets = rows[:, 1:].reshape(-1, 1).to(logits.device)
            nll = torch.logsumexp(logits, dim=-1) - logits.gather(1, targets).squeeze(1)
            out[lo: lo + n] = nll.view(n, n_pos).to(out.device)
        return out
    head = arch_for(model).lm_head
    with CallRecorder(model, [], stop_at=head) as rec:
        model(input_ids=ids, use_cache=False)
    if rec.stopped_input is None:
        raise RuntimeError("the forward pass never reached the LM head")
    hidden = rec.stopped_input[:, :-1]
    flat = hidden.reshape(-1, hidden.shape[-1])
    targets = ids[:, 1:].reshape(-1)
    out = torch.empty(targets.shape[0], dtype=torch.float32, device=ids.device)
    for lo in range(0, flat.shape[0], logit_rows):
        logits = head_logits(model, flat[lo: lo + logit_rows])
        picked = logits.gather(1, targets[lo: lo + logit_rows].unsqueeze(1)).squeeze(1)
        out[lo: lo + logit_rows] = torch.logsumexp(logits, dim=-1) - picked
    return out.view(ids.shape[0], -1)


class GeneralAbility:
    """``evaluator(model, tokenizer) -> {"perplexity", "nll", "tokens", "piqa_acc",
    "piqa_acc_norm", "piqa_examples"}`` on the model as it is (weights and training flags are
    left unchanged).

    Args:
        corpus: the held-out text (None: no perplexity).
        n_tokens: tokens taken from the start of the corpus (deterministic).
        seq_len: packed row length (clipped to the model's positions, BOS included).
        batch_size: rows per perplexity forward.
        logit_rows: positions projected to the vocabulary at a time.
        piqa: PIQA JSONL, relative to the data directory (None: no PIQA).
        piqa_labels: its labels file (None: ``<stem>-labels.lst`` beside it).
        piqa_examples: the first this many items (None: all 1,838).
        choice_batch_size: (question, solution) sequences per PIQA forward.
        data_dir: the data directory (:func:`editlab.data.loaders.resolve_data_dir`).
    """

    def __init__(
        self,
        corpus: Corpus | None = WikipediaSample(),
        n_tokens: int = 16384,
        seq_len: int = 256,
        batch_size: int = 8,
        logit_rows: int = 512,
        piqa: str | os.PathLike[str] | None = "locality/piqa_valid.jsonl",
        piqa_labels: str | os.PathLike[str] | None = None,
        piqa_examples: int | None = 200,
        choice_batch_size: int = 32,
        data_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if corpus is None and piqa is None:
            raise ValueError("GeneralAbility needs a corpus, a PIQA file or both")
        for name, value in (("n_tokens", n_tokens), ("seq_len", seq_len), ("batch_size", batch_size),
                            ("logit_rows", logit_rows), ("choice_batch_size", choice_batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        self.corpus = corpus
        self.n_tokens = n_tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.logit_rows = logit_rows
        self.piqa = piqa
        self.piqa_labels = piqa_labels
        self.piqa_examples = piqa_examples
        self.choice_batch_size = choice_batch_size
        self.data_dir = data_dir
        self._items: list[ChoiceItem] | None = None
        self._rows: dict[tuple[int, str, int, int], list[torch.Tensor]] = {}
        self._warned_seq2seq = False

    # ------------------------------------------------------------------ data
    def items(self) -> list[ChoiceItem]:
        """The PIQA items scored (loaded once)."""
        if self._items is None:
            if self.piqa is None:
                self._items = []
            else:
                self._items = load_piqa(Path(self.piqa), self.piqa_labels, limit=self.piqa_examples,
                                        data_dir=self.data_dir)
        return self._items

    def rows(self, model: nn.Module, tokenizer) -> list[torch.Tensor]:
        """The token rows scored for perplexity (BOS first when the tokenizer adds one), cached
        per (tokenizer, row length)."""
        bos = _default_bos(tokenizer)
        seq_len = effective_seq_len(model, self.seq_len) - (bos is not None)
        key = (id(tokenizer), str(getattr(tokenizer, "name_or_path", "")), len(tokenizer), seq_len)
        if key not in self._rows:
            rows = list(pack_rows(tokenizer, self.corpus.texts(), seq_len, self.n_tokens))
            if not rows:
                raise ValueError(f"corpus {self.corpus.key!r} yielded no tokens")
            if bos is not None:
                rows = [torch.cat([torch.tensor([bos]), row]) for row in rows]
            rows = [row for row in rows if row.numel() >= 2]
            self._rows[key] = rows
        return self._rows[key]

    # --------------------------------------------------------------- measure
    @torch.no_grad()
    def __call__(self, model: nn.Module, tokenizer) -> dict[str, float]:
        modes = {module: module.training for module in model.modules()}
        model.eval()
        start = time.perf_counter()
        try:
            out: dict[str, float] = {}
            if self.corpus is not None:
                out.update(self.perplexity(model, tokenizer))
            if self.piqa is not None:
                out.update(self.piqa_accuracy(model, tokenizer))
        finally:
            for module, training in modes.items():
                module.training = training
        log.info("general ability in %.2fs: %s", time.perf_counter() - start,
                 ", ".join(f"{k}={v:.4g}" for k, v in out.items()))
        return out

    def perplexity(self, model: nn.Module, tokenizer) -> dict[str, float]:
        """``perplexity``, ``nll`` (mean token NLL) and ``tokens`` (tokens scored) on the corpus sample."""
        if is_encoder_decoder(model):
            if not self._warned_seq2seq:
                log.warning("general ability: perplexity is skipped for the seq2seq model %s "
                            "(only decoder-only models are scored on free text); PIQA is still scored",
                            type(model).__name__)
                self._warned_seq2seq = True
            return {}
        device = next(model.parameters()).device
        metric = Perplexity(sync_on_compute=False)
        for batch in batch_rows(self.rows(model, tokenizer), self.batch_size):
            metric.update(token_nll(model, batch.to(device), self.logit_rows))
        tokens = int(metric.tokens)
        return {"perplexity": float(metric.compute()), "nll": float(metric.nll_sum) / tokens,
                "tokens": float(tokens)}

    def piqa_accuracy(self, model: nn.Module, tokenizer) -> dict[str, float]:
        """``piqa_acc``, ``piqa_acc_norm`` and ``piqa_examples`` (questions scored)."""
        items = self.items()
        if not items:
            return {}
        prompts, targets = [], []
        for item in items:
            for choice in item.choices:
                prompts.append(PIQA_TEMPLATE.format(goal=item.context))
                targets.append(choice)
        scores = score_pairs(model, tokenizer, prompts, targets, chunk_size=self.choice_batch_size)
        n_choices = len(items[0].choices)
        loglik = (-scores.nll.double() * scores.mask.sum(dim=1).double()).view(len(items), n_choices).cpu()
        lengths = torch.tensor([float(len(target_text(t))) for t in targets], dtype=torch.float64)
        labels = torch.tensor([item.label for item in items])
        acc = MultipleChoiceAccuracy(sync_on_compute=False)
        acc_norm = MultipleChoiceAccuracy(normalize=True, sync_on_compute=False)
        acc.update(loglik, labels)
        acc_norm.update(loglik, labels, lengths.view(len(items), n_choices))
        return {"piqa_acc": float(acc.compute()), "piqa_acc_norm": float(acc_norm.compute()),
                "piqa_examples": float(len(items))}


def _default_bos(tokenizer) -> int | None:
    """The BOS id when the tokenizer puts one before a text by default (Llama, Gemma), else None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None
