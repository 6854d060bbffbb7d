"""Score a batch of edit records on a model as it is: every metric of the edit loop, no Lightning.

:class:`RecordScorer` bundles the evaluation settings (scoring modes, teacher-forced chunking,
generation framing and caps, fluency, the judge) and does three things:

* :meth:`~RecordScorer.observe` runs the model on a batch's probes: teacher-forced scores
  (:mod:`.teacher_forced`), fluency texts (:mod:`.fluency`), generated answers (:mod:`.generation`),
  optionally through a :class:`StateCache` of one fixed model state (the unedited model);
* :meth:`~RecordScorer.update` feeds one stage's observations into that stage's metrics
  (:func:`~RecordScorer.metrics`, torchmetrics from :mod:`editlab.metrics`) and returns per-record
  values, keyed as in the summary (:mod:`editlab.metrics.keys`);
* :func:`answers_by_record` regroups generated answers per record, for ``records.jsonl``.

Scoring modes (:data:`SCORING_MODES`): ``teacher_forced`` token accuracy (``reliability``,
``generalization``, ``portability``, ``locality``, ``locality_acc``), ``probability_comparison``
(CounterFact's ``efficacy_*``, ``paraphrase_*``, ``neighborhood_*``, ``cf_score``) and
``generation``: greedy answers to the same probes scored as text, ``{family}@{label}_{kind}``;
``locality@…`` compares the post-edit answer with the unedited model's, ``locality_acc@…`` with the
ground truth.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torchmetrics import MetricCollection

from editlab.data.collate import check_lengths
from editlab.data.records import EditRecord
from editlab.errors import require
from editlab.evaluation.fluency import Fluency
from editlab.evaluation.generation import FRAMINGS, QA_TEMPLATE, GenerationScoring
from editlab.evaluation.judge import Judge, build_judge, judge_scores
from editlab.evaluation.probes import GenerationPlan, ProbePlan, build_plan
from editlab.evaluation.teacher_forced import ProbeScores, ScoreCache, score_pairs
from editlab.metrics import functional as F
from editlab.metrics.edit import build_edit_metrics
from editlab.metrics.keys import JUDGE, generation_metric

__all__ = ["SCORING_MODES", "Observation", "Probes", "RecordScorer", "ScoringSettings", "StateCache",
           "answers_by_record", "build_scorer"]

SCORING_MODES = ("teacher_forced", "probability_comparison", "generation")


@dataclass
class Probes:
    """What a batch of records is scored on: the teacher-forced plan and, in generation mode, the
    generation plan."""

    records: list[EditRecord]
    plan: ProbePlan
    generation: GenerationPlan | None = None


@dataclass
class Observation:
    """A batch's raw results on one model state: teacher-forced scores, fluency texts (and the
    record of each) and generated answers (one per generation of the plan)."""

    scores: ProbeScores
    fluency: tuple[list[str], list[int]] = field(default_factory=lambda: ([], []))
    answers: list[str] = field(default_factory=list)


@dataclass
class StateCache:
    """Everything observed on one fixed model state (the unedited model), each item computed once."""

    scores: ScoreCache = field(default_factory=ScoreCache)
    fluency: dict[str, str] = field(default_factory=dict)
    answers: dict[tuple[str, int], str] = field(default_factory=dict)

    def clear(self) -> None:
        self.scores.clear()
        self.fluency.clear()
        self.answers.clear()

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain data (what a stream checkpoint holds)."""
        return {"scores": self.scores.state_dict(), "fluency": dict(self.fluency),
                "answers": [[prompt, cap, text] for (prompt, cap), text in self.answers.items()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scores.load_state_dict(state["scores"])
        self.fluency = dict(state["fluency"])
        self.answers = {(prompt, int(cap)): text for prompt, cap, text in state["answers"]}


class RecordScorer:
    """Scores batches of records (see the module docstring).

    Usually built from :class:`ScoringSettings` (:meth:`ScoringSettings.build`), which checks the values.

    Args:
        tokenizer: the model's tokenizer.
        probability_comparison: also score CounterFact's probability comparisons.
        chunk_size: sequences per teacher-forced forward.
        max_prompt_tokens: truncate over-long prompts from the left when scoring.
        generation: generation-mode settings (None: no generation scores).
        fluency: fluency settings (None: no fluency scores).
        judge: a judge of generated answers (needs ``generation``): adds ``…@{label}_judge`` keys.
    """

    def __init__(self, tokenizer, *, probability_comparison: bool = True, chunk_size: int = 64,
                 max_prompt_tokens: int | None = None, generation: GenerationScoring | None = None,
                 fluency: Fluency | None = None, judge: Judge | None = None) -> None:
        if judge is not None and generation is None:
            raise ValueError("a judge scores generated answers: it needs the generation scoring mode")
        self.tokenizer = tokenizer
        self.probability_comparison = probability_comparison
        self.chunk_size = chunk_size
        self.max_prompt_tokens = max_prompt_tokens
        self.generation = generation
        self.fluency = fluency
        self.judge = judge

    # ----------------------------------------------------------------- plans
    def metrics(self, prefix: str) -> MetricCollection:
        """The metrics of one stage, keys ``{prefix}{name}``."""
        label = self.generation.label if self.generation is not None else None
        return build_edit_metrics(prefix, generation=label, judge=self.judge is not None)

    def probes(self, records: Sequence[EditRecord]) -> Probes:
        records = list(records)
        gplan = self.generation.plan(records) if self.generation is not None else None
        return Probes(records, build_plan(records, self.probability_comparison), gplan)

    # -------------------------------------------------------------- observe
    def scores(self, model: nn.Module, plan: ProbePlan, cache: ScoreCache | None = None) -> ProbeScores:
        """Teacher-forced scores of the plan's sequences on ``model`` (through ``cache`` if given)."""
        kwargs = {"chunk_size": self.chunk_size, "max_prompt_tokens": self.max_prompt_tokens}
        if cache is not None:
            return cache.scores(model, self.tokenizer, plan.prompts, plan.targets, **kwargs)
        return score_pairs(model, self.tokenizer, plan.prompts, plan.targets, **kwargs)

    def observe(self, model: nn.Module, probes: Probes, cache: StateCache | None = None) -> Observation:
        """Run ``model`` as it is on the probes (through ``cache``, the state's cache, if given)."""
        with torch.no_grad():
            scores = self.scores(model, probes.plan, cache.scores if cache is not None else None)
            texts = ([], [])
            if self.fluency is not None:
                texts = self.fluency.texts(model, self.tokenizer, probes.records,
                                           cache.fluency if cache is not None else None)
            answers = []
            if probes.generation is not None:
                answers = self.generation.generate(model, probes.generation,
                                                   cache.answers if cache is not None else None)
        return Observation(scores, texts, answers)

    # --------------------------------------------------------------- update
    def update(self, metrics: MetricCollection, probes: Probes, now: Observation, pre: Observation,
               compare_with_pre: bool, device: torch.device | str) -> dict[str, torch.Tensor]:
        """Feed ``now`` into ``metrics``; return per-record values (NaN where a record has none).

        ``pre`` is the observation of the unedited model: the reference of the locality agreement
        metrics, which are scored only when ``compare_with_pre`` (not on the unedited model itself).
        """
        plan, n = probes.plan, probes.plan.num_records
        scores, before = now.scores.to(device), pre.scores.to(device)
        out: dict[str, torch.Tensor] = {}

        def keep(name: str, values: torch.Tensor, rec: torch.Tensor) -> None:
            means, present = F.segment_mean(values.float().cpu(), rec, n)
            out[name] = torch.where(present, means, torch.full_like(means, math.nan))

        for family, (seq, rec) in plan.accuracy.items():
            s, r = seq.to(device), rec.to(device)
            pred, target, mask = scores.pred[s], scores.target[s], scores.mask[s]
            name = "locality_acc" if family == "locality" else family
            metrics[name].update(pred, target, mask, r, n)
            keep(name, F.token_accuracy(pred, target, mask), rec)
            if family == "locality" and compare_with_pre:
                metrics["locality"].update(pred, before.pred[s], mask, r, n)
                keep("locality", F.token_agreement(pred, before.pred[s], mask), rec)

        for family, (a, b, rec) in plan.comparison.items():
            na, nb, r = scores.nll[a.to(device)], scores.nll[b.to(device)], rec.to(device)
            metrics[f"{family}_score"].update(na, nb, r, n)
            metrics[f"{family}_magnitude"].update(na, nb, r, n)
            success, magnitude = F.probability_comparison(na, nb)
            keep(f"{family}_score", success, rec)
            keep(f"{family}_magnitude", magnitude, rec)

        texts, owners = now.fluency
        if texts:
            owner = torch.tensor(owners, dtype=torch.long)
            metrics["fluency"].update(texts, owner.to(device), n)
            keep("fluency", torch.tensor([F.ngram_entropy(t) for t in texts]), owner)

        if probes.generation is not None:
            label = self.generation.label
            for family, (seq, rec, refs, prompts) in probes.generation.families.items():
                answers = [now.answers[i] for i in seq.tolist()]
                name = "locality_acc" if family == "locality" else family
                comparisons = [(name, refs)]
                if family == "locality" and compare_with_pre:
                    comparisons.append(("locality", [pre.answers[i] for i in seq.tolist()]))
                for target_name, references in comparisons:
                    for kind in F.GENERATION_SCORES:
                        key = generation_metric(target_name, label, kind)
                        metrics[key].update(answers, references, rec, n)
                        keep(key, F.generation_scores(answers, references, kind), rec)
                if self.judge is not None:
                    key = generation_metric(name, label, JUDGE)
                    primary = [r if isinstance(r, str) else r[0] for r in refs]
                    values = judge_scores(self.judge, prompts, primary, answers)
                    metrics[key].update(values, rec, n)
                    keep(key, values, rec)
        return out


def answers_by_record(probes: Probes, answers: list[str]) -> list[dict[str, list[str]]]:
    """Per record, the generated answers of each family, in probe order (what ``records.jsonl``
    keeps under ``generations``, so every generation score can be audited); ``[]`` without
    generation."""
    gplan = probes.generation
    if gplan is None:
        return []
    out: list[dict[str, list[str]]] = [{} for _ in range(gplan.num_records)]
    for family, (seq, rec, _, _) in gplan.families.items():
        for s, r in zip(seq.tolist(), rec.tolist()):
            out[r].setdefault(family, []).append(answers[s])
    return out


@dataclass(frozen=True)
class ScoringSettings:
    """How the edit loop scores records: the ``module.scoring`` node of ``configs/module/edit_eval.yaml``.

    Every field is checked when the settings are made (a :class:`~editlab.errors.SettingError`, a
    ValueError, naming the field), before any model is loaded; :meth:`build` turns them into a
    :class:`RecordScorer` for a tokenizer.

    Args:
        scoring_modes: the modes scored side by side, from :data:`SCORING_MODES`; ``None`` keeps
            ``teacher_forced`` plus ``probability_comparison`` when that flag is set.  Given, it
            overrides ``probability_comparison``; ``teacher_forced`` cannot be left out (yet).
        probability_comparison: score the CounterFact probability comparisons (efficacy,
            paraphrase, neighbourhood: each needs the true target scored too).  False keeps the
            teacher-forced families only (EasyEdit's set), halving the sequences per record.
        chunk_size: sequences per teacher-forced forward.
        max_prompt_tokens: truncate over-long prompts from the left when scoring.
        fluency: also score fluency (n-gram entropy of greedy generations, ROME) on each record's
            generation prompts.
        fluency_prompts: how many distinct generation prompts per record.
        fluency_max_new_tokens: generation length for fluency.
        generation_framing: ``plain``, ``question_answer`` or ``chat``
            (:class:`~editlab.evaluation.generation.GenerationScoring`); labels the keys
            ``@generation_…`` / ``@generation_qa_…`` / ``@generation_chat_…``.
        qa_template: format string with ``{prompt}`` for the question-answer framing.
        generation_margin: a generated answer is capped at its reference's token count plus this.
        generation_max_new_tokens: absolute cap on a generated answer's tokens.
        generation_chunk_size: prompts per batched generation.
        judge: optional judge of generated answers (``judge(prompt, target, generation)`` in
            [0, 1], or a model name/path for an LLM judge; see :mod:`editlab.evaluation.judge`):
            adds ``…@generation_judge`` keys.  Used in generation mode only.

    The generation and fluency settings are checked even when their mode is off, so a typo fails
    early.
    """

    scoring_modes: tuple[str, ...] | None = None
    probability_comparison: bool = True
    chunk_size: int = 64
    max_prompt_tokens: int | None = None
    fluency: bool = False
    fluency_prompts: int = 2
    fluency_max_new_tokens: int = 50
    generation_framing: str = "plain"
    qa_template: str = QA_TEMPLATE
    generation_margin: int = 5
    generation_max_new_tokens: int = 32
    generation_chunk_size: int = 32
    judge: Judge | str | None = None

    def __post_init__(self) -> None:
        if self.scoring_modes is not None:
            require(not isinstance(self.scoring_modes, str), "scoring_modes",
                    f"must be a list of modes from {list(SCORING_MODES)}", self.scoring_modes)
            modes = tuple(self.scoring_modes)  # a list, or Hydra's ListConfig
            unknown = [m for m in modes if m not in SCORING_MODES]
            require(not unknown, "scoring_modes", f"has unknown scoring modes {unknown}; choose from "
                    f"{list(SCORING_MODES)}", list(modes))
            require("teacher_forced" in modes, "scoring_modes",
                    "must include 'teacher_forced' (the edit loop's base scores)", list(modes))
            object.__setattr__(self, "scoring_modes", modes)
        require(self.generation_framing in FRAMINGS, "generation_framing",
                f"is unknown; choose from {list(FRAMINGS)}", self.generation_framing)
        require("{prompt}" in self.qa_template, "qa_template", "must contain '{prompt}'", self.qa_template)
        for name in ("chunk_size", "fluency_prompts", "fluency_max_new_tokens", "generation_max_new_tokens",
                     "generation_chunk_size"):
            require(getattr(self, name) >= 1, name, "must be positive", getattr(self, name))
        require(self.generation_margin >= 0, "generation_margin", "must be >= 0", self.generation_margin)

    def check_lengths(self, records: Sequence[EditRecord], tokenizer, max_positions: int | None,
                      model_name: str = "the model") -> None:
        """Refuse records with a text longer than the model's ``max_positions`` as these settings
        score them (:func:`editlab.data.collate.check_lengths`: answers generated in generation
        mode, in their framing, fluency's generations, prompts truncated to ``max_prompt_tokens``)."""
        generating = "generation" in self.modes
        frame = None
        if generating and self.generation_framing != "plain":  # the chat / question-answer text generated from
            frame = GenerationScoring(tokenizer, self.generation_framing, self.qa_template).frame
        check_lengths(records, tokenizer, max_positions,
                      generation_tokens=self.fluency_max_new_tokens if self.fluency else 0,
                      answer_tokens=self.generation_max_new_tokens if generating else 0,
                      max_prompt_tokens=self.max_prompt_tokens, frame=frame, model_name=model_name)

    @property
    def modes(self) -> tuple[str, ...]:
        """The modes scored: :attr:`scoring_modes`, or what ``probability_comparison`` implies."""
        if self.scoring_modes is not None:
            return self.scoring_modes
        return ("teacher_forced", "probability_comparison") if self.probability_comparison else ("teacher_forced",)

    def build(self, tokenizer) -> RecordScorer:
        """The :class:`RecordScorer` of these settings for ``tokenizer`` (an LLM judge named by a
        model name/path is loaded here)."""
        modes = self.modes
        generation = None
        if "generation" in modes:
            generation = GenerationScoring(tokenizer, self.generation_framing, self.qa_template, self.generation_margin,
                                           self.generation_max_new_tokens, self.generation_chunk_size)
        return RecordScorer(
            tokenizer,
            probability_comparison="probability_comparison" in modes,
            chunk_size=self.chunk_size,
            max_prompt_tokens=self.max_prompt_tokens,
            generation=generation,
            fluency=Fluency(self.fluency_prompts, self.fluency_max_new_tokens) if self.fluency else None,
            judge=build_judge(self.judge) if generation is not None else None,
        )


def build_scorer(tokenizer, settings: ScoringSettings | None = None) -> RecordScorer:
    """A :class:`RecordScorer` for ``tokenizer`` from ``settings`` (None: the defaults)."""
    return (settings if settings is not None else ScoringSettings()).build(tokenizer)
