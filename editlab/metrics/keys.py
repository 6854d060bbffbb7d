"""Metric keys: the one place that builds and parses them.

A result key reads ``{stage}/{metric}``:

* ``stage``: ``pre`` (unedited model), ``post`` (right after a record's edit), ``final`` (after the
  whole edit stream), ``step`` (a checkpoint inside a stream), ``stream`` (a curve point sent to the
  loggers), and the run-level groups ``time`` and ``edits``;
* ``metric``: a metric name (``reliability``, ``efficacy_score``, ``general_perplexity``, …) or, for
  generation-mode scores, ``{family}@{label}_{kind}``: ``family`` the probe family
  (``reliability``, ``locality_acc``, …), ``label`` the generation framing's label
  (:data:`GENERATION_LABELS`: ``generation`` | ``generation_qa`` | ``generation_chat``) and ``kind``
  the score (:data:`GENERATION_KINDS`: ``em`` | ``f1`` | ``contains`` | ``judge``).

Timings are ``time/{name}_seconds_median``.
"""

from __future__ import annotations

from dataclasses import dataclass

from editlab.metrics.functional import GENERATION_SCORES

__all__ = [
    "GENERAL_PREFIX", "GENERATION_KINDS", "GENERATION_LABELS", "JUDGE", "STAGES", "STEP", "STREAM",
    "GenerationMetric", "MetricKey", "general_metric", "generation_metric", "is_general", "join",
    "parse_generation_metric", "parse_key", "time_key",
]

STAGES = ("pre", "post", "final")
"""The stages of a summary, in table order."""
STEP = "step"
"""Stream checkpoints: scored like the stages, kept as curve points, not in the summary."""
STREAM = "stream"
"""Curve points as the loggers receive them."""
TIME = "time"

JUDGE = "judge"
GENERATION_KINDS = (*GENERATION_SCORES, JUDGE)
"""Scores of a generated answer: exact match, token F1, containment (against the reference) and a judge's."""
GENERATION_LABELS = {"plain": "generation", "question_answer": "generation_qa", "chat": "generation_chat"}
"""Generation framing → the label its keys carry."""
GENERAL_PREFIX = "general_"


@dataclass(frozen=True)
class GenerationMetric:
    """The parts of a generation-mode metric name ``{family}@{label}_{kind}``."""

    family: str
    label: str
    kind: str

    def __str__(self) -> str:
        return generation_metric(self.family, self.label, self.kind)


@dataclass(frozen=True)
class MetricKey:
    """The parts of a result key ``{stage}/{metric}`` (``stage`` empty when the key has none)."""

    stage: str
    metric: str

    @property
    def generation(self) -> GenerationMetric | None:
        """The generation-mode parts of the metric, or None for any other metric."""
        return parse_generation_metric(self.metric)

    def __str__(self) -> str:
        return join(self.stage, self.metric) if self.stage else self.metric


def join(stage: str, metric: str) -> str:
    """``{stage}/{metric}``."""
    if not stage or "/" in stage:
        raise ValueError(f"a key's stage must be a non-empty name without '/', got {stage!r}")
    return f"{stage}/{metric}"


def parse_key(key: str) -> MetricKey:
    """Split ``{stage}/{metric}`` at its first ``/`` (a key without one has no stage)."""
    stage, sep, metric = key.partition("/")
    return MetricKey(stage, metric) if sep else MetricKey("", key)


def generation_metric(family: str, label: str, kind: str) -> str:
    """``{family}@{label}_{kind}``, e.g. ``reliability@generation_qa_em``."""
    if label not in GENERATION_LABELS.values():
        raise ValueError(f"unknown generation label {label!r}; choose from {sorted(GENERATION_LABELS.values())}")
    if kind not in GENERATION_KINDS:
        raise ValueError(f"unknown generation score {kind!r}; choose from {list(GENERATION_KINDS)}")
    return f"{family}@{label}_{kind}"


def parse_generation_metric(metric: str) -> GenerationMetric | None:
    """The parts of ``{family}@{label}_{kind}`` (a stage prefix is ignored), or None when ``metric``
    is not a generation-mode metric name."""
    family, sep, rest = parse_key(metric).metric.partition("@")
    if not sep or not family:
        return None
    label, _, kind = rest.rpartition("_")
    if label not in GENERATION_LABELS.values() or kind not in GENERATION_KINDS:
        return None
    return GenerationMetric(family, label, kind)


def general_metric(name: str) -> str:
    """``general_{name}``: a general-ability value (perplexity, PIQA accuracy, …)."""
    return f"{GENERAL_PREFIX}{name}"


def is_general(metric: str) -> bool:
    return metric.startswith(GENERAL_PREFIX)


def time_key(name: str) -> str:
    """``time/{name}_seconds_median``: the median seconds of a timed part of the run."""
    return join(TIME, f"{name}_seconds_median")
