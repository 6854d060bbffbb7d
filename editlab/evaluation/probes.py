"""Which (prompt, target) sequences score a batch of records, and which metric reads which.

Every metric of a batch is computed from one set of teacher-forced sequences, each scored once
per stage (pre / post): identical pairs are shared, so a CounterFact neighbourhood prompt with
the true answer serves both the locality metrics and the neighbourhood probability comparison.

Accuracy families (teacher-forced token accuracy, EasyEdit):
  ``reliability``   edit prompt → target_new
  ``generalization`` rephrase prompts → target_new
  ``portability``   portability probes → their answers
  ``locality``      locality probes → their answers (agreement with pre-edit predictions, and
                    accuracy against the ground truth)
Probability-comparison families (CounterFact, Meng et al. 2022), pairs scored by mean token NLL:
  ``efficacy``      edit prompt: P(target_new) > P(target_true)
  ``paraphrase``    rephrase prompts: P(target_new) > P(target_true)
  ``neighborhood``  neighbourhood prompts: P(target_true) > P(target_new)

Generation mode (:func:`build_generation_plan`) reads the accuracy families' (prompt, answer)
probes instead: each prompt, framed, is answered by greedy generation capped at a length derived
from its answer, and the answer is scored as text (``editlab.metrics.functional``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from editlab.data.records import EditRecord

__all__ = [
    "ACCURACY_FAMILIES", "COMPARISON_FAMILIES", "GenerationPlan", "ProbePlan", "build_generation_plan", "build_plan",
]

ACCURACY_FAMILIES = ("reliability", "generalization", "portability", "locality")
COMPARISON_FAMILIES = ("efficacy", "paraphrase", "neighborhood")


@dataclass
class ProbePlan:
    """Unique sequences to score plus, per family, which sequences (and records) it reads.

    ``accuracy[family] = (seq, rec)``; ``comparison[family] = (seq_preferred, seq_other, rec)``.
    """

    prompts: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    accuracy: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    comparison: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    num_records: int = 0

    def __len__(self) -> int:
        return len(self.prompts)


def answer_probes(rec: EditRecord) -> Iterator[tuple[str, str, str, tuple[str, ...]]]:
    """``(family, prompt, answer, aliases)`` of every answer-scored probe of a record, in plan
    order: the edit prompt (reliability), rephrasings (generalization), portability and locality
    probes.  Teacher forcing scores ``answer``; generation accepts any of ``answer`` and ``aliases``."""
    yield "reliability", rec.prompt, rec.target_new, ()
    for p in rec.rephrase_prompts:
        yield "generalization", p, rec.target_new, ()
    for probe in rec.portability:
        yield "portability", probe.prompt, probe.target, probe.aliases
    for probe in rec.locality:
        yield "locality", probe.prompt, probe.target, probe.aliases


def build_plan(records: Sequence[EditRecord], comparison: bool = True) -> ProbePlan:
    """The plan for ``records``; ``comparison=False`` leaves out the probability-comparison pairs."""
    plan = ProbePlan(num_records=len(records))
    index: dict[tuple[str, str], int] = {}

    def seq(prompt: str, target: str) -> int:
        key = (prompt, target)
        if key not in index:
            index[key] = len(plan.prompts)
            plan.prompts.append(prompt)
            plan.targets.append(target)
        return index[key]

    acc: dict[str, tuple[list[int], list[int]]] = {f: ([], []) for f in ACCURACY_FAMILIES}
    cmp: dict[str, tuple[list[int], list[int], list[int]]] = {f: ([], [], []) for f in COMPARISON_FAMILIES}

    def add_acc(family: str, r: int, prompt: str, target: str) -> None:
        acc[family][0].append(seq(prompt, target))
        acc[family][1].append(r)

    def add_cmp(family: str, r: int, prompt: str, preferred: str, other: str) -> None:
        cmp[family][0].append(seq(prompt, preferred))
        cmp[family][1].append(seq(prompt, other))
        cmp[family][2].append(r)

    for r, rec in enumerate(records):
        for family, prompt, target, _ in answer_probes(rec):
            add_acc(family, r, prompt, target)
        if comparison and rec.has_true_target and rec.target_true.strip() != rec.target_new.strip():
            add_cmp("efficacy", r, rec.prompt, rec.target_new, rec.target_true)
            for p in rec.rephrase_prompts:
                add_cmp("paraphrase", r, p, rec.target_new, rec.target_true)
            for p in rec.neighborhood_prompts:
                add_cmp("neighborhood", r, p, rec.target_true, rec.target_new)

    def t(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long)

    plan.accuracy = {f: (t(s), t(r)) for f, (s, r) in acc.items() if s}
    plan.comparison = {f: (t(a), t(b), t(r)) for f, (a, b, r) in cmp.items() if a}
    return plan


@dataclass
class GenerationPlan:
    """Unique generations to run (framed prompt, token cap) plus, per accuracy family, which
    generation each probe reads: ``families[family] = (seq, rec, references, prompts)`` with the
    probes' reference answers (a string, or a tuple ``(answer, *aliases)`` when the probe lists
    aliases: any of them counts) and their unframed prompts (what a judge is shown)."""

    prompts: list[str] = field(default_factory=list)
    caps: list[int] = field(default_factory=list)
    families: dict[str, tuple[torch.Tensor, torch.Tensor, list[str | tuple[str, ...]], list[str]]] = field(default_factory=dict)
    num_records: int = 0

    def __len__(self) -> int:
        return len(self.prompts)

    def keys(self) -> list[tuple[str, int]]:
        """``(framed prompt, cap)`` of each generation: what identifies it on one model state."""
        return list(zip(self.prompts, self.caps))


def build_generation_plan(
    records: Sequence[EditRecord], frame: Callable[[str], str], cap: Callable[[str], int]
) -> GenerationPlan:
    """The generation plan of ``records``: ``frame(prompt)`` is the text the model continues,
    ``cap(answer)`` its token cap; identical (framed prompt, cap) pairs are generated once."""
    plan = GenerationPlan(num_records=len(records))
    index: dict[tuple[str, int], int] = {}
    fams: dict[str, tuple[list[int], list[int], list[str], list[str]]] = {f: ([], [], [], []) for f in ACCURACY_FAMILIES}

    def add(family: str, r: int, prompt: str, target: str, aliases: tuple[str, ...]) -> None:
        key = (frame(prompt), cap(target))
        if key not in index:
            index[key] = len(plan.prompts)
            plan.prompts.append(key[0])
            plan.caps.append(key[1])
        seq, rec, refs, raw = fams[family]
        seq.append(index[key])
        rec.append(r)
        refs.append((target, *aliases) if aliases else target)
        raw.append(prompt)

    for r, rec in enumerate(records):
        for family, prompt, target, aliases in answer_probes(rec):
            add(family, r, prompt, target, aliases)
    plan.families = {
        f: (torch.tensor(s, dtype=torch.long), torch.tensor(r, dtype=torch.long), refs, raw)
        for f, (s, r, refs, raw) in fams.items() if s
    }
    return plan
