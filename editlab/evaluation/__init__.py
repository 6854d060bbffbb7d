"""Everything that scores an edited model.

* :mod:`.probes`: which (prompt, answer) probes score a record, per metric family;
* :mod:`.teacher_forced`: teacher-forced scores of (prompt, target) pairs (:func:`score_pairs`),
  the basis of the token-accuracy and probability-comparison metrics;
* :mod:`.generation`: greedy generation (:func:`greedy_generate`), generation framing (plain,
  question-answer, chat) and answer-length caps (:class:`GenerationScoring`);
* :mod:`.fluency`: n-gram entropy of greedy continuations (:class:`Fluency`);
* :mod:`.judge`: judges of generated answers (:class:`LLMJudge`, :func:`build_judge`);
* :mod:`.general`: general ability, perplexity on held-out text and PIQA (:class:`GeneralAbility`);
* :mod:`.scorer`: all of the above for a batch of records on a model state, feeding the metrics
  (:class:`RecordScorer`, built from the edit loop's settings, :class:`ScoringSettings`, by
  :func:`build_scorer`).

The metrics themselves (torchmetrics classes, maths, metric keys) are :mod:`editlab.metrics`; the
LM-head primitives shared with editors are :mod:`editlab.scoring`.  Nothing here imports Lightning.
"""

from editlab.evaluation.fluency import Fluency
from editlab.evaluation.general import GeneralAbility, token_nll
from editlab.evaluation.generation import FRAMINGS, QA_TEMPLATE, GenerationScoring, cut_answer, greedy_generate
from editlab.evaluation.judge import Judge, LLMJudge, build_judge, judge_scores
from editlab.evaluation.probes import GenerationPlan, ProbePlan, build_generation_plan, build_plan
from editlab.evaluation.scorer import SCORING_MODES, RecordScorer, ScoringSettings, StateCache, build_scorer
from editlab.evaluation.teacher_forced import ProbeScores, ScoreCache, score_pairs

__all__ = [
    "FRAMINGS", "QA_TEMPLATE", "SCORING_MODES", "Fluency", "GeneralAbility", "GenerationPlan", "GenerationScoring",
    "Judge", "LLMJudge", "ProbePlan", "ProbeScores", "RecordScorer", "ScoreCache", "ScoringSettings", "StateCache",
    "build_generation_plan", "build_judge", "build_plan", "build_scorer", "cut_answer", "greedy_generate",
    "judge_scores", "score_pairs", "token_nll",
]
