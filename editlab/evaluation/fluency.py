"""Fluency of an edited model: n-gram entropy of its greedy continuations (ROME, Meng et al. 2022).

:class:`Fluency` generates from each record's generation prompts; the metric itself is
:class:`editlab.metrics.edit.NGramEntropy` (maths in :func:`editlab.metrics.functional.ngram_entropy`).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from editlab.data.records import EditRecord
from editlab.evaluation.generation import greedy_generate

__all__ = ["Fluency"]


class Fluency:
    """Greedy continuations of the first ``prompts`` distinct generation prompts of each record,
    ``max_new_tokens`` tokens long (settings ``fluency_prompts`` / ``fluency_max_new_tokens``, checked by
    :class:`~editlab.evaluation.scorer.ScoringSettings`)."""

    def __init__(self, prompts: int = 2, max_new_tokens: int = 50) -> None:
        self.prompts = prompts
        self.max_new_tokens = max_new_tokens

    def texts(self, model: nn.Module, tokenizer, records: Sequence[EditRecord],
              cache: dict[str, str] | None = None) -> tuple[list[str], list[int]]:
        """``(texts, owners)``: the generated texts and the index (in ``records``) of each text's
        record; through ``cache`` (texts of one fixed model state by prompt) when given."""
        prompts, owners = [], []
        for r, rec in enumerate(records):
            for p in list(dict.fromkeys(rec.generation_prompts))[: self.prompts]:
                prompts.append(p)
                owners.append(r)
        if not prompts:
            return [], []
        if cache is None:
            return greedy_generate(model, tokenizer, prompts, max_new_tokens=self.max_new_tokens), owners
        missing = [p for p in dict.fromkeys(prompts) if p not in cache]
        if missing:
            cache.update(zip(missing, greedy_generate(model, tokenizer, missing, max_new_tokens=self.max_new_tokens)))
        return [cache[p] for p in prompts], owners
