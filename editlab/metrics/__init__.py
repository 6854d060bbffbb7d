"""Knowledge-editing metrics.

Pure functions live in :mod:`.functional`; DDP-safe ``torchmetrics`` classes in :mod:`.edit`
(editing) and :mod:`.general` (perplexity, multiple-choice accuracy); metric keys
(``{stage}/{family}@{label}_{kind}``) are built and parsed by :mod:`.keys`.  What runs a model to
produce the values (probes, generation, judges, general ability) is :mod:`editlab.evaluation`.
"""

from editlab.metrics.edit import (
    GenerationMatch,
    NGramEntropy,
    PredictionAgreement,
    ProbabilityComparisonMagnitude,
    ProbabilityComparisonScore,
    RecordMean,
    TeacherForcedAccuracy,
    build_edit_metrics,
    computed,
)
from editlab.metrics.functional import (
    choice_accuracy,
    containment,
    exact_match,
    generation_scores,
    harmonic_mean,
    mean_ngram_entropy,
    ngram_entropy,
    normalize_answer,
    perplexity,
    probability_comparison,
    segment_mean,
    token_accuracy,
    token_agreement,
    token_f1,
)
from editlab.metrics.general import MultipleChoiceAccuracy, Perplexity

__all__ = [
    "GenerationMatch",
    "MultipleChoiceAccuracy",
    "Perplexity",
    "choice_accuracy",
    "perplexity",
    "NGramEntropy",
    "PredictionAgreement",
    "ProbabilityComparisonMagnitude",
    "ProbabilityComparisonScore",
    "RecordMean",
    "TeacherForcedAccuracy",
    "build_edit_metrics",
    "computed",
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
