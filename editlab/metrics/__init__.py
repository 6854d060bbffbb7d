"""Knowledge-editing metrics.

Pure functions live in :mod:`.functional`; DDP-safe ``torchmetrics`` classes in :mod:`.edit`.
"""

from editlab.metrics.edit import (
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
    harmonic_mean,
    mean_ngram_entropy,
    ngram_entropy,
    probability_comparison,
    segment_mean,
    token_accuracy,
    token_agreement,
)

__all__ = [
    "NGramEntropy",
    "PredictionAgreement",
    "ProbabilityComparisonMagnitude",
    "ProbabilityComparisonScore",
    "RecordMean",
    "TeacherForcedAccuracy",
    "build_edit_metrics",
    "computed",
    "harmonic_mean",
    "mean_ngram_entropy",
    "ngram_entropy",
    "probability_comparison",
    "segment_mean",
    "token_accuracy",
    "token_agreement",
]
