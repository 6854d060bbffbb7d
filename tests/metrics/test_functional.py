"""Hand-computed checks of editlab.metrics.functional."""

from __future__ import annotations

import math

import pytest
import torch

from editlab.metrics.functional import (
    WORD_PATTERN,
    containment,
    exact_match,
    generation_scores,
    harmonic_mean,
    mean_ngram_entropy,
    ngram_entropy,
    normalize_answer,
    probability_comparison,
    segment_mean,
    token_accuracy,
    token_agreement,
    token_f1,
)


def test_token_accuracy_counts_only_masked_positions() -> None:
    pred = torch.tensor([[5, 6, 7], [5, 9, 0]])
    target = torch.tensor([[5, 6, 8], [5, 6, 3]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    # row 0: 5=5, 6=6, 7!=8 -> 2/3; row 1: 5=5, 9!=6, padding ignored -> 1/2
    acc = token_accuracy(pred, target, mask)
    assert acc.dtype == torch.float64
    assert acc.tolist() == pytest.approx([2 / 3, 0.5], abs=1e-15)


def test_token_accuracy_padding_match_is_not_counted() -> None:
    # the pad positions agree (0 == 0) but are masked out: 0 of 1 real tokens right
    mask = torch.tensor([[True, False, False]])
    acc = token_accuracy(torch.tensor([[1, 0, 0]]), torch.tensor([[2, 0, 0]]), mask)
    assert acc.tolist() == [0.0]


def test_token_agreement() -> None:
    post = torch.tensor([[1, 2, 3, 4], [7, 7, 0, 0]])
    pre = torch.tensor([[1, 2, 9, 4], [7, 8, 0, 0]])
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    # row 0: 3 of 4 agree; row 1: 1 of 2 agree
    assert token_agreement(post, pre, mask).tolist() == pytest.approx([0.75, 0.5], abs=1e-15)


def test_token_fraction_input_checks() -> None:
    ids = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="no target token"):
        token_accuracy(ids, ids, torch.tensor([[False, False]]))
    with pytest.raises(TypeError, match="bool"):
        token_accuracy(ids, ids, torch.tensor([[1, 1]]))
    with pytest.raises(ValueError, match="same shape"):
        token_agreement(ids, torch.tensor([[1, 2, 3]]), torch.tensor([[True, True]]))
    with pytest.raises(ValueError, match=r"\[N, T\]"):
        token_accuracy(torch.tensor([1, 2]), torch.tensor([1, 2]), torch.tensor([True, True]))


def test_segment_mean_with_empty_segments() -> None:
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 6.0])
    segments = torch.tensor([0, 0, 2, 2, 2])
    # segment 0: (1+2)/2 = 1.5; segment 1: no rows; segment 2: (3+4+6)/3 = 13/3; segment 3: no rows
    means, present = segment_mean(values, segments, num_segments=4)
    assert present.tolist() == [True, False, True, False]
    assert means.dtype == torch.float64
    assert means[0].item() == 1.5
    assert means[2].item() == pytest.approx(4.333333333333333, abs=1e-15)
    assert math.isnan(means[1].item()) and math.isnan(means[3].item())


def test_segment_mean_infers_count_and_checks_ids() -> None:
    means, present = segment_mean(torch.tensor([2.0, 5.0]), torch.tensor([1, 1]))
    assert present.tolist() == [False, True]
    assert means[1].item() == 3.5
    empty_means, empty_present = segment_mean(torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert empty_means.shape == (0,) and empty_present.shape == (0,)
    with pytest.raises(ValueError, match="segment ids"):
        segment_mean(torch.tensor([1.0]), torch.tensor([3]), num_segments=3)
    with pytest.raises(ValueError, match="segment ids"):
        segment_mean(torch.tensor([1.0]), torch.tensor([-1]))
    with pytest.raises(TypeError, match="integer"):
        segment_mean(torch.tensor([1.0]), torch.tensor([0.0]))


def test_probability_comparison_exact_values() -> None:
    nll_preferred = torch.tensor([0.5, 2.0, 1.0])
    nll_other = torch.tensor([1.0, 0.5, 1.0])
    success, magnitude = probability_comparison(nll_preferred, nll_other)
    # lower NLL = higher probability; a tie is not a success
    assert success.tolist() == [1.0, 0.0, 0.0]
    # exp(-0.5) - exp(-1) = 0.6065306597 - 0.3678794412; exp(-2) - exp(-0.5) = 0.1353352832 - 0.6065306597
    assert magnitude.tolist() == pytest.approx([0.2386512185411911, -0.4711953764760207, 0.0], abs=1e-12)


def test_harmonic_mean() -> None:
    # 3 / (1/1 + 1/0.5 + 1/0.25) = 3/7
    assert harmonic_mean([1.0, 0.5, 0.25]).item() == pytest.approx(0.42857142857142855, abs=1e-15)
    assert harmonic_mean([torch.tensor(0.5), torch.tensor(0.5)]).item() == pytest.approx(0.5, abs=1e-15)
    assert harmonic_mean([0.9, 0.0, 0.8]).item() == 0.0
    with pytest.raises(ValueError):
        harmonic_mean([])
    with pytest.raises(ValueError):
        harmonic_mean([0.5, -0.1])


def test_ngram_entropy_by_hand() -> None:
    # "a b a b": bigrams ab, ba, ab -> p = 2/3, 1/3 -> H2 = log2(3) - 2/3 = 0.9182958340544896 bits;
    # trigrams aba, bab -> p = 1/2, 1/2 -> H3 = 1 bit;
    # score = mean(2/3 * H2, 4/3 * H3) = (0.6121972227029931 + 1.3333333333333333) / 2 = 0.9727652780181632
    assert ngram_entropy("a b a b") == pytest.approx(0.9727652780181632, abs=1e-12)
    # "a b c": bigrams ab, bc -> H2 = 1; one trigram -> H3 = 0; score = (2/3 * 1 + 0) / 2 = 1/3
    assert ngram_entropy("a b c") == pytest.approx(0.3333333333333333, abs=1e-15)
    # a fully repetitive text has one distinct n-gram of each order -> 0
    assert ngram_entropy("a a a a a") == 0.0


def test_ngram_entropy_short_or_empty_text_is_zero() -> None:
    assert ngram_entropy("") == 0.0
    assert ngram_entropy("   ") == 0.0
    assert ngram_entropy("hello") == 0.0


def test_ngram_entropy_custom_orders_and_tokenisation() -> None:
    # unigrams of "x y" -> H1 = 1 bit; weight 3 -> 3.0
    assert ngram_entropy("x y", ns=(1,), weights=(3.0,)) == pytest.approx(3.0, abs=1e-15)
    assert WORD_PATTERN.findall("Paris, isn't it?") == ["Paris", ",", "isn", "'", "t", "it", "?"]
    with pytest.raises(ValueError):
        ngram_entropy("a b", ns=(2, 3), weights=(1.0,))


def test_mean_ngram_entropy() -> None:
    # (0.9727652780181632 + 1/3) / 2
    assert mean_ngram_entropy(["a b a b", "a b c"]) == pytest.approx(0.6530493056757483, abs=1e-12)
    with pytest.raises(ValueError):
        mean_ngram_entropy([])


# ------------------------------------------------------------------ generated answers
def test_normalize_answer_is_squad_normalisation() -> None:
    assert normalize_answer("  The  Eiffel-Tower, in PARIS! ") == "eiffeltower in paris"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words
    assert normalize_answer("...") == ""


def test_exact_match_f1_and_containment_by_hand() -> None:
    assert exact_match("The Paris.", "paris") == 1.0
    assert exact_match("Paris Rome", "Paris") == 0.0
    # prediction "paris rome rome" vs "paris": 1 common token, precision 1/3, recall 1 -> F1 = 0.5
    assert token_f1("Paris Rome Rome", "Paris") == 0.5
    # repeated tokens count by multiplicity: "new new york" vs "new york": common 2, p 2/3, r 1 -> 0.8
    assert token_f1("new new york", "New York") == pytest.approx(0.8, abs=1e-15)
    assert token_f1("", "") == 1.0 and token_f1("a", "Paris") == 0.0 and token_f1("Rome", "Paris") == 0.0
    assert containment("It is in New York, USA", "new york") == 1.0
    assert containment("Romeo", "Rome") == 0.0  # whole words only
    assert containment("anything", "the") == 0.0 and containment("", "an") == 1.0


def test_generation_scores_vector_and_errors() -> None:
    got = generation_scores(["Paris.", "Rome", "Paris Rome"], ["paris", "Paris", "paris"], "contains")
    assert got.dtype == torch.float64 and got.tolist() == [1.0, 0.0, 1.0]
    assert generation_scores(["Paris Rome"], ["Paris"], "f1").tolist() == [pytest.approx(2 / 3)]
    with pytest.raises(ValueError, match="unknown generation score"):
        generation_scores(["a"], ["a"], "bleu")
    with pytest.raises(ValueError, match="references"):
        generation_scores(["a", "b"], ["a"], "em")


def test_generation_scores_take_the_best_alias() -> None:
    refs = [("Australia", "AU", "Commonwealth of Australia"), "Australia"]
    em = generation_scores(["au", "AU"], refs, "em")
    assert em.tolist() == [1.0, 0.0]
    f1 = generation_scores(["the Commonwealth of Australia", "x"], refs, "f1")
    assert f1[0] == 1.0 and f1[1] == 0.0  # "the" is an article: dropped by the normalisation
    with pytest.raises(ValueError, match="at least one"):
        generation_scores(["a"], [()], "em")
