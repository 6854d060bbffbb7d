"""Pluggable judges of generated answers: ``judge(prompt, target, generation) -> float in [0, 1]``.

A judge is any callable with that signature (a rule, a lookup table, an API client) or, given a
model name or path, an :class:`LLMJudge`: a language model asked whether the generated answer
matches the reference, scored by ``P(yes) / (P(yes) + P(no))`` at its next token.  A judge may
also offer ``batch(prompts, targets, generations) -> list[float]``; :func:`judge_scores` uses it
when present (an LLM judge scores a whole batch in a few forwards).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from editlab.models.arch import is_encoder_decoder
from editlab.models.loading import ModelBundle, from_pretrained

__all__ = ["JUDGE_TEMPLATE", "Judge", "LLMJudge", "build_judge", "judge_scores"]

Judge = Callable[[str, str, str], float]

JUDGE_TEMPLATE = (
    "Question: {prompt}\nReference answer: {target}\nProposed answer: {generation}\n"
    "Does the proposed answer match the reference answer? Answer yes or no.\nAnswer:"
)


class LLMJudge:
    """A language model as judge: the probability it gives " yes" against " no" after
    :data:`JUDGE_TEMPLATE` (or ``template``) filled with the prompt, reference and generation.

    Args:
        model: a hub name / local path (loaded with :func:`editlab.models.loading.from_pretrained`
            and ``load_kwargs``; needs the weights locally or internet) or a loaded bundle.
        template: a format string with ``{prompt}``, ``{target}`` and ``{generation}``.
        yes, no: the two answers compared (their first token each).
        chunk_size: judge prompts per forward.
    """

    def __init__(self, model: str | ModelBundle, template: str = JUDGE_TEMPLATE, yes: str = " yes",
                 no: str = " no", chunk_size: int = 16, **load_kwargs: Any) -> None:
        self.bundle = model if isinstance(model, ModelBundle) else from_pretrained(model, **load_kwargs)
        self.template = template
        self.chunk_size = chunk_size
        tok = self.bundle.tokenizer
        self.yes_id = tok(yes, add_special_tokens=False)["input_ids"][0]
        self.no_id = tok(no, add_special_tokens=False)["input_ids"][0]
        if self.yes_id == self.no_id:
            raise ValueError(f"{yes!r} and {no!r} start with the same token")

    def __call__(self, prompt: str, target: str, generation: str) -> float:
        return self.batch([prompt], [target], [generation])[0]

    @torch.no_grad()
    def batch(self, prompts: Sequence[str], targets: Sequence[str], generations: Sequence[str]) -> list[float]:
        model, tok = self.bundle.model, self.bundle.tokenizer
        texts = [self.template.format(prompt=p, target=t, generation=g)
                 for p, t, g in zip(prompts, targets, generations)]
        side = tok.padding_side
        tok.padding_side = "left"
        out: list[float] = []
        try:
            for lo in range(0, len(texts), self.chunk_size):
                enc = tok(texts[lo: lo + self.chunk_size], return_tensors="pt", padding=True).to(self.bundle.device)
                if is_encoder_decoder(model):
                    start = torch.full((enc["input_ids"].shape[0], 1), model.config.decoder_start_token_id,
                                       device=self.bundle.device)
                    logits = model(**enc, decoder_input_ids=start).logits[:, -1]
                else:
                    logits = model(**enc).logits[:, -1]
                pair = torch.log_softmax(logits.float()[:, [self.yes_id, self.no_id]], dim=-1)
                out.extend(pair[:, 0].exp().tolist())
        finally:
            tok.padding_side = side
        return out


def build_judge(spec: Judge | str | ModelBundle | None, **kwargs: Any) -> Judge | None:
    """``None`` → no judge; a callable → itself; a name, path or bundle → :class:`LLMJudge`."""
    if spec is None or callable(spec):
        return spec
    if isinstance(spec, (str, ModelBundle)):
        return LLMJudge(spec, **kwargs)
    raise TypeError(f"a judge is a callable, a model name/path or a ModelBundle, got {type(spec).__name__}")


def judge_scores(judge: Judge, prompts: Sequence[str], targets: Sequence[str], generations: Sequence[str]) -> Tensor:
    """The judge's scores of the triples, [N] float64; raises when one is outside [0, 1]."""
    if not (len(prompts) == len(targets) == len(generations)):
        raise ValueError(f"{len(prompts)} prompts, {len(targets)} targets, {len(generations)} generations")
    batch = getattr(judge, "batch", None)
    values = (batch(prompts, targets, generations) if callable(batch)
              else [judge(p, t, g) for p, t, g in zip(prompts, targets, generations)])
    scores = torch.tensor([float(v) for v in values], dtype=torch.float64)
    bad = ((scores < 0) | (scores > 1) | torch.isnan(scores)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"judge scores must lie in [0, 1]; rows {bad} got {scores[bad].tolist()}")
    return scores
