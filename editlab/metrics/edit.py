"""Knowledge-editing metrics as ``torchmetrics`` classes that reduce correctly under DDP.

Averaging follows EasyEdit (Wang et al. 2024) and ROME's summaries (Meng et al. 2022): a value
per probe sequence, then the mean over the probes of one record, then the mean over records.
Each metric therefore keeps two states, both summed across processes: ``total`` (float64 sum
of per-record means) and ``count`` (number of records).  ``compute()`` returns
``total / count``, or NaN when no record was counted (the metric was never fed).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection

from editlab.metrics.functional import (
    GENERATION_SCORES,
    generation_scores,
    harmonic_mean,
    ngram_entropy,
    probability_comparison,
    segment_mean,
    token_accuracy,
    token_agreement,
)
from editlab.metrics.keys import JUDGE, generation_metric, parse_generation_metric

__all__ = [
    "GENERATION_FAMILIES",
    "GenerationMatch",
    "NGramEntropy",
    "PredictionAgreement",
    "ProbabilityComparisonMagnitude",
    "ProbabilityComparisonScore",
    "RecordMean",
    "TeacherForcedAccuracy",
    "build_edit_metrics",
    "computed",
    "generation_metric_names",
]

_CF_SCORE_PARTS = ("efficacy_score", "paraphrase_score", "neighborhood_score")

GENERATION_FAMILIES = ("reliability", "generalization", "portability", "locality_acc", "locality")
"""Metric families scored in generation mode: against the reference answer, except ``locality``
(agreement of the post-edit generation with the unedited model's generation)."""


class RecordMean(Metric):
    """Mean over records of the mean over each record's rows (EasyEdit / ROME averaging).

    ``update(values, record_index, num_records=None)``: ``values[i]`` is the value of row ``i``,
    which belongs to record ``record_index[i]`` of the batch (records ``0..R-1``, R given or
    inferred as ``max + 1``).  Each record present in the batch adds its mean to ``total`` and 1
    to ``count``; a record with no rows in this update (say, no portability probe) adds nothing.
    Call ``update`` once per batch with all rows of a record: rows of the same record split over
    two calls count as two records.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better: bool | None = None

    total: Tensor
    count: Tensor

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _accumulate(
        self, values: Tensor, record_index: Tensor | Sequence[int], num_records: int | None
    ) -> None:
        if not isinstance(record_index, Tensor):
            record_index = torch.as_tensor(list(record_index), dtype=torch.long)
        values = values.to(self.total.device)
        if bool(torch.isnan(values).any()):
            raise ValueError(f"{type(self).__name__} got NaN values; NaN is reserved for 'no record counted'")
        means, present = segment_mean(values, record_index.to(values.device), num_records)
        self.total += means[present].sum().to(self.total.dtype)
        self.count += present.sum().to(self.count.dtype)

    def update(self, values: Tensor, record_index: Tensor, num_records: int | None = None) -> None:
        """Add the per-record means of ``values`` ([N]) grouped by ``record_index`` ([N])."""
        self._accumulate(values, record_index, num_records)

    def compute(self) -> Tensor:
        """``total / count`` as a float64 scalar; NaN exactly when no record was counted."""
        if int(self.count) == 0:
            return torch.tensor(math.nan, dtype=torch.float64, device=self.total.device)
        return self.total / self.count


class TeacherForcedAccuracy(RecordMean):
    """Teacher-forced token accuracy against a target (EasyEdit ``test_prediction_acc``, Wang et al. 2024).

    Reliability, generalization, portability, and locality measured against the ground truth.
    """

    higher_is_better = True

    def update(  # type: ignore[override]
        self,
        pred: Tensor,
        target: Tensor,
        mask: Tensor,
        record_index: Tensor,
        num_records: int | None = None,
    ) -> None:
        """``pred``, ``target``, ``mask``: [N, T]; ``record_index``: [N]."""
        self._accumulate(token_accuracy(pred, target, mask), record_index, num_records)


class PredictionAgreement(RecordMean):
    """Fraction of target tokens whose post-edit argmax equals the pre-edit one.

    EasyEdit's locality (Wang et al. 2024).
    """

    higher_is_better = True

    def update(  # type: ignore[override]
        self,
        post_pred: Tensor,
        pre_pred: Tensor,
        mask: Tensor,
        record_index: Tensor,
        num_records: int | None = None,
    ) -> None:
        """``post_pred``, ``pre_pred``, ``mask``: [N, T]; ``record_index``: [N]."""
        self._accumulate(token_agreement(post_pred, pre_pred, mask), record_index, num_records)


class ProbabilityComparisonScore(RecordMean):
    """Fraction of prompts where P(preferred) > P(other): CounterFact's efficacy / paraphrase /
    neighborhood score (Meng et al. 2022)."""

    higher_is_better = True

    def update(  # type: ignore[override]
        self,
        nll_preferred: Tensor,
        nll_other: Tensor,
        record_index: Tensor,
        num_records: int | None = None,
    ) -> None:
        """``nll_preferred``, ``nll_other``: [N] mean token NLLs of the two targets; ``record_index``: [N]."""
        success, _ = probability_comparison(nll_preferred, nll_other)
        self._accumulate(success, record_index, num_records)


class ProbabilityComparisonMagnitude(RecordMean):
    """Mean of ``exp(-nll_preferred) - exp(-nll_other)``: CounterFact's efficacy / paraphrase /
    neighborhood magnitude (Meng et al. 2022)."""

    higher_is_better = True

    def update(  # type: ignore[override]
        self,
        nll_preferred: Tensor,
        nll_other: Tensor,
        record_index: Tensor,
        num_records: int | None = None,
    ) -> None:
        """``nll_preferred``, ``nll_other``: [N] mean token NLLs of the two targets; ``record_index``: [N]."""
        _, magnitude = probability_comparison(nll_preferred, nll_other)
        self._accumulate(magnitude, record_index, num_records)


class NGramEntropy(RecordMean):
    """Generation fluency: weighted bi/tri-gram entropy of generated texts (ROME, Meng et al. 2022).

    See :func:`editlab.metrics.functional.ngram_entropy` for the definition and tokenisation.
    """

    higher_is_better = True

    def __init__(
        self,
        ns: Sequence[int] = (2, 3),
        weights: Sequence[float] = (2 / 3, 4 / 3),
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)
        self.ns = tuple(ns)
        self.weights = tuple(weights)

    def update(  # type: ignore[override]
        self,
        texts: Sequence[str],
        record_index: Tensor | Sequence[int],
        num_records: int | None = None,
    ) -> None:
        """``texts``: N generated texts; ``record_index``: [N] record of each text."""
        scores = torch.tensor(
            [ngram_entropy(t, self.ns, self.weights) for t in texts],
            dtype=torch.float64,
            device=self.total.device,
        )
        self._accumulate(scores, record_index, num_records)


class GenerationMatch(RecordMean):
    """A score of greedily generated answers against references (exact match, token F1 or
    containment after SQuAD normalisation; see :func:`editlab.metrics.functional.generation_scores`).

    Generation-mode reliability / generalization / portability / locality (Yang et al. 2025,
    "The Mirage of Model Editing: Revisiting Evaluation in the Wild").
    """

    higher_is_better = True

    def __init__(self, kind: str = "em", **kwargs: object) -> None:
        super().__init__(**kwargs)
        if kind not in GENERATION_SCORES:
            raise ValueError(f"unknown generation score {kind!r}; choose from {sorted(GENERATION_SCORES)}")
        self.kind = kind

    def update(  # type: ignore[override]
        self,
        predictions: Sequence[str],
        references: Sequence[str],
        record_index: Tensor | Sequence[int],
        num_records: int | None = None,
    ) -> None:
        """``predictions``, ``references``: N strings; ``record_index``: [N] record of each pair."""
        self._accumulate(generation_scores(predictions, references, self.kind), record_index, num_records)


def generation_metric_names(label: str = "generation", kinds: Sequence[str] = tuple(GENERATION_SCORES),
                            judge: bool = False) -> list[str]:
    """Names of the generation-mode members (:func:`editlab.metrics.keys.generation_metric`):
    ``{family}@{label}_{kind}`` for every family of
    :data:`GENERATION_FAMILIES` and score kind, plus ``{family}@{label}_judge`` for the families
    scored against a reference when ``judge``."""
    names = [generation_metric(family, label, kind) for family in GENERATION_FAMILIES for kind in kinds]
    if judge:
        names += [generation_metric(family, label, JUDGE) for family in GENERATION_FAMILIES if family != "locality"]
    return names


def build_edit_metrics(prefix: str, generation: str | None = None, judge: bool = False) -> MetricCollection:
    """All editing metrics in one collection whose computed keys read ``{prefix}{name}``.

    Members: ``reliability``, ``generalization``, ``portability``, ``locality_acc``
    (:class:`TeacherForcedAccuracy`); ``locality`` (:class:`PredictionAgreement`);
    ``efficacy_score``, ``paraphrase_score``, ``neighborhood_score``
    (:class:`ProbabilityComparisonScore`); the matching ``*_magnitude``
    (:class:`ProbabilityComparisonMagnitude`); ``fluency`` (:class:`NGramEntropy`).  Members are
    reached by base or prefixed name (``collection["reliability"]``) and updated one by one;
    compute groups are off because members of one class see different inputs.  Use
    :func:`computed` to read the results.

    ``generation`` (a mode label such as ``"generation"`` or ``"generation_qa"``) adds the
    generation-mode members named by :func:`generation_metric_names`: a :class:`GenerationMatch`
    per family and score kind, and with ``judge`` a :class:`RecordMean` of judge scores per family.
    """
    members: dict[str, Metric] = {
        "reliability": TeacherForcedAccuracy(),
        "generalization": TeacherForcedAccuracy(),
        "portability": TeacherForcedAccuracy(),
        "locality": PredictionAgreement(),
        "locality_acc": TeacherForcedAccuracy(),
        "efficacy_score": ProbabilityComparisonScore(),
        "efficacy_magnitude": ProbabilityComparisonMagnitude(),
        "paraphrase_score": ProbabilityComparisonScore(),
        "paraphrase_magnitude": ProbabilityComparisonMagnitude(),
        "neighborhood_score": ProbabilityComparisonScore(),
        "neighborhood_magnitude": ProbabilityComparisonMagnitude(),
        "fluency": NGramEntropy(),
    }
    if generation:
        for name in generation_metric_names(generation, judge=judge):
            kind = parse_generation_metric(name).kind
            members[name] = RecordMean() if kind == JUDGE else GenerationMatch(kind)
    return MetricCollection(members, prefix=prefix, compute_groups=False)


def computed(collection: MetricCollection) -> dict[str, float]:
    """The collection's results, leaving out metrics that counted no record.

    Adds ``{prefix}cf_score{postfix}``, CounterFact's Score (Meng et al. 2022): the harmonic mean
    of ``efficacy_score``, ``paraphrase_score`` and ``neighborhood_score`` when all three are
    present.  Every member's ``compute()`` is called in a fixed order, so that under DDP every
    process joins the same state syncs even where its own shard had no record of some metric; a
    :class:`RecordMean` is then left out when its synced result is NaN (no record anywhere).
    Other metrics are included when they have been updated on this process (a local decision:
    under DDP, feed them on every process).
    """
    prefix = collection.prefix or ""
    postfix = collection.postfix or ""
    results: dict[str, float] = {}
    base_values: dict[str, float] = {}
    for name, metric in collection.items(keep_base=True):
        if isinstance(metric, RecordMean):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r".*was called before the ``update``.*")
                value = float(metric.compute())
            if math.isnan(value):
                continue
        elif metric.update_called:
            value = float(metric.compute())
        else:
            continue
        base_values[str(name)] = value
        results[f"{prefix}{name}{postfix}"] = value
    if all(part in base_values for part in _CF_SCORE_PARTS):
        score = harmonic_mean([base_values[part] for part in _CF_SCORE_PARTS])
        results[f"{prefix}cf_score{postfix}"] = float(score)
    return results
