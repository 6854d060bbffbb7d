"""General-ability metrics (the cost of an edit on everything else) as ``torchmetrics`` classes.

* :class:`Perplexity` — ``exp`` of the mean token negative log-likelihood over a held-out text;
* :class:`MultipleChoiceAccuracy` — lm-evaluation-harness ``acc`` / ``acc_norm`` on a
  multiple-choice task (PIQA).

States are sums reduced with ``dist_reduce_fx="sum"``: under DDP, processes that each score a
shard of the text or of the questions combine into the result over all of it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric

from editlab.metrics.functional import choice_accuracy, perplexity

__all__ = ["MultipleChoiceAccuracy", "Perplexity"]


class Perplexity(Metric):
    """``exp(Σ nll / Σ tokens)`` over every token scored; NaN when no token was scored.

    ``update(nll)``: the per-token negative log-likelihoods (natural log) of a batch, any shape.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    nll_sum: Tensor
    tokens: Tensor

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.add_state("nll_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, nll: Tensor) -> None:
        values = nll.detach().to(device=self.nll_sum.device, dtype=torch.float64)
        if not bool(torch.isfinite(values).all()):
            raise ValueError("Perplexity got a non-finite token NLL")
        self.nll_sum += values.sum()
        self.tokens += values.numel()

    def compute(self) -> Tensor:
        if int(self.tokens) == 0:
            return torch.tensor(math.nan, dtype=torch.float64, device=self.nll_sum.device)
        return perplexity(self.nll_sum, self.tokens)


class MultipleChoiceAccuracy(Metric):
    """Fraction of questions whose best-scoring choice is the labelled one (lm-evaluation-harness
    ``acc``; ``acc_norm`` with ``normalize=True``: scores divided by the choices' lengths).

    ``update(loglik, labels, lengths=None)``: ``[N, C]`` summed log-likelihood per choice, ``[N]``
    labels, ``[N, C]`` lengths (required when ``normalize``).  NaN when no question was counted.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    correct: Tensor
    total: Tensor

    def __init__(self, normalize: bool = False, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.normalize = normalize
        self.add_state("correct", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, loglik: Tensor, labels: Tensor, lengths: Tensor | None = None) -> None:
        if self.normalize and lengths is None:
            raise ValueError("MultipleChoiceAccuracy(normalize=True) needs the choices' lengths")
        hits = choice_accuracy(loglik.detach(), labels, lengths if self.normalize else None)
        self.correct += hits.sum().to(self.correct.device)
        self.total += hits.numel()

    def compute(self) -> Tensor:
        if int(self.total) == 0:
            return torch.tensor(math.nan, dtype=torch.float64, device=self.correct.device)
        return self.correct / self.total
