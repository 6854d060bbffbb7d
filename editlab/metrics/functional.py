"""Knowledge-editing metrics as pure functions on tensors (and on strings, for fluency).

Per-probe quantities follow EasyEdit (Wang et al. 2024, "EasyEdit: An Easy-to-use Knowledge
Editing Framework for Large Language Models") and ROME / CounterFact (Meng et al. 2022,
"Locating and Editing Factual Associations in GPT").  Every per-row result is float64, so that
fractions such as 2/3 survive the later averaging over probes and records unrounded.

The inputs are teacher-forced: ``pred`` holds the argmax token id at each target position given
the gold prefix, ``target`` the gold ids and ``mask`` marks the real (non-padding) target tokens.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

__all__ = [
    "GENERATION_SCORES",
    "choice_accuracy",
    "perplexity",
    "WORD_PATTERN",
    "containment",
    "exact_match",
    "generation_scores",
    "normalize_answer",
    "token_f1",
    "harmonic_mean",
    "mean_ngram_entropy",
    "ngram_entropy",
    "probability_comparison",
    "segment_mean",
    "token_accuracy",
    "token_agreement",
]

WORD_PATTERN = re.compile(r"\w+|[^\w\s]")
"""Word tokens for :func:`ngram_entropy`: word-character runs, and each other non-space character alone."""


def _check_token_grid(a: Tensor, b: Tensor, mask: Tensor, names: tuple[str, str]) -> None:
    if a.dim() != 2:
        raise ValueError(f"{names[0]} must be [N, T], got shape {tuple(a.shape)}")
    if a.shape != b.shape or a.shape != mask.shape:
        raise ValueError(
            f"{names[0]}, {names[1]} and mask must have the same shape, got "
            f"{tuple(a.shape)}, {tuple(b.shape)} and {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")


def _masked_match_fraction(a: Tensor, b: Tensor, mask: Tensor) -> Tensor:
    lengths = mask.sum(dim=1)
    if bool((lengths == 0).any()):
        empty = torch.nonzero(lengths == 0).flatten().tolist()
        raise ValueError(f"rows {empty} have no target token in mask; a fraction over no tokens is undefined")
    hits = ((a == b) & mask).sum(dim=1)
    return hits.to(torch.float64) / lengths.to(torch.float64)


def token_accuracy(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Per row, the fraction of target tokens whose teacher-forced argmax equals the target.

    EasyEdit's ``test_prediction_acc`` (Wang et al. 2024): reliability, generalization,
    portability and locality-vs-ground-truth accuracy.  Rows with no masked token raise.

    Args:
        pred: [N, T] argmax token ids at the target positions.
        target: [N, T] target token ids.
        mask: [N, T] bool, True on real target tokens.

    Returns:
        [N] float64 fractions in [0, 1].
    """
    _check_token_grid(pred, target, mask, ("pred", "target"))
    return _masked_match_fraction(pred, target, mask)


def token_agreement(post_pred: Tensor, pre_pred: Tensor, mask: Tensor) -> Tensor:
    """Per row, the fraction of target positions where the post-edit argmax equals the pre-edit one.

    EasyEdit's locality (Wang et al. 2024): the edited model should keep the unedited model's
    teacher-forced predictions on unrelated prompts.  Rows with no masked token raise.

    Returns:
        [N] float64 fractions in [0, 1].
    """
    _check_token_grid(post_pred, pre_pred, mask, ("post_pred", "pre_pred"))
    return _masked_match_fraction(post_pred, pre_pred, mask)


def segment_mean(values: Tensor, segments: Tensor, num_segments: int | None = None) -> tuple[Tensor, Tensor]:
    """Mean of ``values`` within each segment id (e.g. the probes of one edit record).

    Args:
        values: [N] numbers.
        segments: [N] integer ids in ``[0, num_segments)``.
        num_segments: number of segments R; inferred as ``segments.max() + 1`` (0 when N is 0).

    Returns:
        ``(means, present)``: [R] float64 means and [R] bool.  A segment with no row is marked
        absent and its mean is NaN, so it cannot be averaged in by mistake.
    """
    if values.dim() != 1 or segments.dim() != 1 or values.shape[0] != segments.shape[0]:
        raise ValueError(
            "values and segments must be 1-D of the same length, got "
            f"{tuple(values.shape)} and {tuple(segments.shape)}"
        )
    if segments.dtype.is_floating_point or segments.dtype.is_complex or segments.dtype == torch.bool:
        raise TypeError(f"segments must be an integer tensor, got {segments.dtype}")
    segments = segments.to(device=values.device, dtype=torch.long)
    n = segments.shape[0]
    if num_segments is None:
        num_segments = int(segments.max()) + 1 if n > 0 else 0
    if num_segments < 0:
        raise ValueError(f"num_segments must be non-negative, got {num_segments}")
    if n > 0 and (int(segments.min()) < 0 or int(segments.max()) >= num_segments):
        raise ValueError(
            f"segment ids must lie in [0, {num_segments}), "
            f"got min {int(segments.min())}, max {int(segments.max())}"
        )
    sums = torch.zeros(num_segments, dtype=torch.float64, device=values.device)
    sums.index_add_(0, segments, values.to(torch.float64))
    counts = torch.zeros(num_segments, dtype=torch.float64, device=values.device)
    counts.index_add_(0, segments, torch.ones(n, dtype=torch.float64, device=values.device))
    present = counts > 0
    means = torch.where(present, sums / counts.clamp(min=1.0), torch.full_like(sums, math.nan))
    return means, present


def probability_comparison(nll_preferred: Tensor, nll_other: Tensor) -> tuple[Tensor, Tensor]:
    """CounterFact's probability comparison of two targets after the same prompt (Meng et al. 2022).

    Each NLL is the mean over a target's tokens of ``-log p`` (as ROME's scorer returns it).
    ``success`` is 1.0 where ``nll_preferred < nll_other`` (P(preferred) > P(other); a tie is a
    failure) - the efficacy / paraphrase / neighborhood *score*; ``magnitude`` is
    ``exp(-nll_preferred) - exp(-nll_other)`` - the corresponding *magnitude*.  For efficacy and
    paraphrase the preferred target is ``target_new``; for neighborhood it is ``target_true``.

    Returns:
        ``(success, magnitude)``, each [N] float64.
    """
    if nll_preferred.shape != nll_other.shape or nll_preferred.dim() != 1:
        raise ValueError(
            f"nll_preferred and nll_other must be 1-D of the same length, got "
            f"{tuple(nll_preferred.shape)} and {tuple(nll_other.shape)}"
        )
    preferred = nll_preferred.to(torch.float64)
    other = nll_other.to(device=preferred.device, dtype=torch.float64)
    success = (preferred < other).to(torch.float64)
    magnitude = torch.exp(-preferred) - torch.exp(-other)
    return success, magnitude


def harmonic_mean(values: Sequence[float | Tensor]) -> Tensor:
    """Harmonic mean of non-negative numbers; 0 when any of them is 0.

    CounterFact's "Score" (Meng et al. 2022) is the harmonic mean of efficacy, paraphrase and
    neighborhood success.

    Returns:
        A float64 scalar tensor (on the CPU).
    """
    numbers = [float(v) for v in values]
    if not numbers:
        raise ValueError("harmonic_mean needs at least one value")
    if any(v < 0 for v in numbers):
        raise ValueError(f"harmonic_mean is defined here for non-negative values, got {numbers}")
    if any(v == 0 for v in numbers):
        return torch.tensor(0.0, dtype=torch.float64)
    return torch.tensor(len(numbers) / sum(1.0 / v for v in numbers), dtype=torch.float64)


def _entropy_bits(counts: Iterable[int]) -> float:
    freqs = list(counts)
    total = sum(freqs)
    return -sum((c / total) * math.log2(c / total) for c in freqs) if total else 0.0


def ngram_entropy(
    text: str,
    ns: Sequence[int] = (2, 3),
    weights: Sequence[float] = (2 / 3, 4 / 3),
) -> float:
    """ROME's generation fluency, the weighted n-gram entropy of one text (Meng et al. 2022).

    For each ``n``: the entropy in bits of the frequency distribution of the text's word
    n-grams, times its weight; the result is the arithmetic mean of these over ``ns``.  An ``n``
    for which the text has no n-gram contributes 0, so empty or one-word text scores 0.0.

    Difference from ROME: ROME tokenises with ``nltk.word_tokenize``; here words are the matches
    of :data:`WORD_PATTERN` (``\\w+|[^\\w\\s]``: word-character runs, and every other non-space
    character as its own token).  The two agree on plain words and punctuation but not on
    contractions ("don't" -> "don", "'", "t" here; "do", "n't" in NLTK) or quote conventions.
    """
    if len(ns) != len(weights) or not ns:
        raise ValueError(
            f"ns and weights must be non-empty and of equal length, got {list(ns)} and {list(weights)}"
        )
    if any(n < 1 for n in ns):
        raise ValueError(f"n-gram orders must be >= 1, got {list(ns)}")
    tokens = WORD_PATTERN.findall(text)
    weighted = []
    for n, weight in zip(ns, weights):
        grams = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        weighted.append(weight * _entropy_bits(grams.values()))
    return sum(weighted) / len(weighted)


def mean_ngram_entropy(
    texts: Iterable[str],
    ns: Sequence[int] = (2, 3),
    weights: Sequence[float] = (2 / 3, 4 / 3),
) -> float:
    """Arithmetic mean of :func:`ngram_entropy` over texts (ROME's ``n_gram_entropy``, Meng et al. 2022)."""
    scores = [ngram_entropy(t, ns, weights) for t in texts]
    if not scores:
        raise ValueError("mean_ngram_entropy needs at least one text")
    return sum(scores) / len(scores)


# ------------------------------------------------------------------ generated answers (strings)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation (Rajpurkar et al. 2016, official evaluation script): lowercase,
    drop ASCII punctuation, drop the articles "a", "an", "the", collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised prediction equals the normalised reference (SQuAD EM), else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1 between the normalised prediction and reference (bag-of-words overlap).

    When either side normalises to no token the F1 is 1.0 if both do, else 0.0 (as in SQuAD).
    """
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def containment(prediction: str, reference: str) -> float:
    """1.0 when the normalised reference occurs in the normalised prediction as whole words
    ("rome" is in "in rome italy", not in "romeo"); an empty reference is contained only in an
    empty prediction."""
    pred, ref = normalize_answer(prediction), normalize_answer(reference)
    if not ref:
        return float(not pred)
    return float(f" {ref} " in f" {pred} ")


GENERATION_SCORES: dict[str, Callable[[str, str], float]] = {
    "em": exact_match,
    "f1": token_f1,
    "contains": containment,
}
"""Generation-mode scores by the name that labels them in metric keys (``…@generation_em``)."""


def generation_scores(predictions: Sequence[str], references: Sequence[str | Sequence[str]], kind: str) -> Tensor:
    """Per pair, the score ``kind`` (a key of :data:`GENERATION_SCORES`) of a generated answer
    against its reference; a reference given as a sequence of alternatives (an answer and its
    aliases) scores the best of them.

    Returns:
        [N] float64.
    """
    if kind not in GENERATION_SCORES:
        raise ValueError(f"unknown generation score {kind!r}; choose from {sorted(GENERATION_SCORES)}")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    fn = GENERATION_SCORES[kind]

    def best(prediction: str, reference: str | Sequence[str]) -> float:
        if isinstance(reference, str):
            return fn(prediction, reference)
        if not reference:
            raise ValueError("a reference given as alternatives must list at least one")
        return max(fn(prediction, alternative) for alternative in reference)

    return torch.tensor([best(p, r) for p, r in zip(predictions, references)], dtype=torch.float64)


# ------------------------------------------------------------------------------ general ability
def perplexity(nll_sum: Tensor | float, count: Tensor | int) -> Tensor:
    """``exp(nll_sum / count)`` (float64): perplexity of ``count`` tokens whose negative
    log-likelihoods (natural log) sum to ``nll_sum``; NaN when ``count`` is 0."""
    total = torch.as_tensor(nll_sum, dtype=torch.float64)
    n = torch.as_tensor(count, dtype=torch.float64, device=total.device)
    if float(n) == 0:
        return torch.tensor(math.nan, dtype=torch.float64, device=total.device)
    return torch.exp(total / n)


def choice_accuracy(loglik: Tensor, labels: Tensor, lengths: Tensor | None = None) -> Tensor:
    """Per question, 1.0 when the highest-scoring choice is the labelled one, else 0.0 (float64).

    The multiple-choice rule of lm-evaluation-harness: a choice's score is the total
    log-likelihood of its continuation given the context (``acc``), or that divided by the
    continuation's length (``acc_norm``; the harness uses the length in characters).  Ties go to
    the first choice.

    Args:
        loglik: [N, C] summed log-likelihood of each choice.
        labels: [N] index of the right choice.
        lengths: [N, C] positive continuation lengths, or None for unnormalised scores.
    """
    if loglik.dim() != 2:
        raise ValueError(f"loglik must be [N, C], got shape {tuple(loglik.shape)}")
    if labels.shape != loglik.shape[:1]:
        raise ValueError(f"labels must be [N] with N = {loglik.shape[0]}, got shape {tuple(labels.shape)}")
    scores = loglik.to(torch.float64)
    if lengths is not None:
        if lengths.shape != loglik.shape:
            raise ValueError(f"lengths must have the shape of loglik {tuple(loglik.shape)}, "
                             f"got {tuple(lengths.shape)}")
        if bool((lengths <= 0).any()):
            raise ValueError("choice lengths must be positive")
        scores = scores / lengths.to(device=scores.device, dtype=torch.float64)
    return (scores.argmax(dim=1) == labels.to(scores.device)).to(torch.float64)
