"""Knowledge-editing metrics.

Pure functions live in :mod:`.functional`; DDP-safe ``torchmetrics`` classes in :mod:`.edit`;
judges of generated answers in :mod:`.judge`.
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

__all__ = [
    "GenerationMatch",
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
