"""General-ability maths (functional) and metrics (torchmetrics)."""

import math

import pytest
import torch

from editlab.metrics.functional import choice_accuracy, perplexity
from editlab.metrics.general import MultipleChoiceAccuracy, Perplexity


def test_perplexity_function():
    assert float(perplexity(torch.tensor(6.0), 3)) == pytest.approx(math.exp(2.0))
    assert math.isnan(float(perplexity(0.0, 0)))


def test_choice_accuracy_normalised_and_not():
    # question 0: choice 1 has the higher total, choice 0 the higher per-character score
    loglik = torch.tensor([[-4.0, -3.0], [-1.0, -2.0]])
    lengths = torch.tensor([[8.0, 2.0], [1.0, 1.0]])
    labels = torch.tensor([0, 0])
    assert choice_accuracy(loglik, labels).tolist() == [0.0, 1.0]
    assert choice_accuracy(loglik, labels, lengths).tolist() == [1.0, 1.0]
    assert choice_accuracy(torch.tensor([[-1.0, -1.0]]), torch.tensor([0])).tolist() == [1.0]  # tie: first
    with pytest.raises(ValueError, match="positive"):
        choice_accuracy(loglik, labels, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="labels"):
        choice_accuracy(loglik, torch.tensor([0]))


def test_metrics_accumulate_over_updates():
    ppl = Perplexity()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(float(ppl.compute()))
    ppl.update(torch.tensor([1.0, 2.0]))
    ppl.update(torch.tensor([[3.0]]))
    assert float(ppl.compute()) == pytest.approx(math.exp(2.0)) and int(ppl.tokens) == 3
    with pytest.raises(ValueError, match="non-finite"):
        ppl.update(torch.tensor([math.inf]))
    acc, norm = MultipleChoiceAccuracy(), MultipleChoiceAccuracy(normalize=True)
    loglik, lengths = torch.tensor([[-4.0, -3.0]]), torch.tensor([[8.0, 2.0]])
    for _ in range(2):
        acc.update(loglik, torch.tensor([0]))
        norm.update(loglik, torch.tensor([0]), lengths)
    acc.update(loglik, torch.tensor([1]))
    assert float(acc.compute()) == pytest.approx(1 / 3) and float(norm.compute()) == 1.0
    with pytest.raises(ValueError, match="lengths"):
        norm.update(loglik, torch.tensor([0]))
