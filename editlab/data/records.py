"""The one record type every loader produces and every editor and metric consumes.

An :class:`EditRecord` is one requested edit ("``prompt`` → ``target_new``") together with the
probes used to score it: rephrasings (generalization), locality probes (things that must not
change), portability probes (consequences of the edit), and the CounterFact prompt families used
by the probability-comparison scores.  Loaders validate their input and raise
:class:`RecordError`, which names the file, the record index and the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any


class RecordError(ValueError):
    """A malformed input record: names the file, the record index and the field."""

    def __init__(self, source: str, index: int | None, field_name: str, problem: str):
        self.source = source
        self.index = index
        self.field = field_name
        where = f"{source}" + (f", record {index}" if index is not None else "")
        super().__init__(f"{where}, field '{field_name}': {problem}")


# What a text may not hold.  Anywhere: a lone surrogate (not Unicode text: it cannot be encoded as
# UTF-8, and a tokenizer raises a TypeError naming no record) or a NUL.  In a prompt: any other C0/C1
# control character except tab, newline and carriage return (real prompts hold those).  In a line
# (a target, an answer, a subject, an id): any control character, tab included, and any line break
# (U+2028/U+2029 too): generation stops at the end of a line, so an answer spanning lines cannot be
# produced, and a subject must be found verbatim in its prompt.
_SURROGATE = re.compile("[\ud800-\udfff]")
# what no string of a record may hold, fed to the model or not
BAD_ANYWHERE = re.compile("[\x00\ud800-\udfff]")
_PROMPT_BAD = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
_LINE_BAD = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def _describe(char: str, at: int, line: bool) -> str:
    code = f"U+{ord(char):04X}"
    if _SURROGATE.match(char):
        return (f"holds a lone surrogate ({code}) at character {at}: not Unicode text "
                f"(it cannot be encoded as UTF-8)")
    if char == "\x00":
        return f"holds a NUL character (U+0000) at character {at}"
    if line and char in _LINE_BREAKS:
        return f"holds a line break ({code}) at character {at}: it must be a single line"
    return f"holds a control character ({code}) at character {at}"


def text_problem(text: str, kind: str = "prompt") -> str | None:
    """Why ``text`` cannot be used, or None.  ``kind``: ``"prompt"`` (tab and line breaks allowed),
    ``"line"`` (a target, answer, subject or id: no control character, no line break) or ``"any"``
    (any string of a record, fed to the model or not: no lone surrogate, no NUL)."""
    found = _SEARCH[kind](text)
    return None if found is None else _describe(found.group(), found.start(), kind == "line")


_SEARCH = {"prompt": _PROMPT_BAD.search, "line": _LINE_BAD.search, "any": BAD_ANYWHERE.search}


@dataclass(frozen=True)
class Probe:
    """A prompt and the answer it is scored against (teacher-forced after the prompt).

    ``group`` names the probe family in the source (e.g. KnowEdit's ``Relation_Specificity`` or
    ``Subject_Aliasing``); ``aliases`` keeps alternative answers the source lists.
    """

    prompt: str
    target: str
    group: str = ""
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class EditRecord:
    """One edit request and everything needed to score it.

    Attributes:
        record_id: the source's id (``case_id``) or, when it has none, the record's index.
        prompt: the edit prompt with the subject filled in ("The mother tongue of X is").
        subject: the subject string as it occurs in ``prompt`` (locate-then-edit methods need it).
        target_new: the answer the edit installs.
        target_true: the answer before the edit (None when the source has none, e.g. new facts).
        rephrase_prompts: paraphrases of ``prompt`` (generalization, CounterFact paraphrase score).
        locality: probes whose answers must not change (EasyEdit / zsRE locality).
        portability: probes whose answers should follow from the edit.
        neighborhood_prompts: CounterFact prompts about other subjects sharing ``target_true``:
            scored by comparing P(target_true) with P(target_new).
        attribute_prompts: CounterFact prompts about subjects that have ``target_new``.
        generation_prompts: prompts for free generation (fluency, consistency).
        source: the file the record came from; index: its position in that file.
        extra: source fields with no first-class slot (relation id, condition strings, ...).
    """

    record_id: int | str
    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    rephrase_prompts: tuple[str, ...] = ()
    locality: tuple[Probe, ...] = ()
    portability: tuple[Probe, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    attribute_prompts: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    source: str = ""
    index: int = -1
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        for name in ("prompt", "subject", "target_new"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                self._fail(name, f"must be a non-empty string, got {value!r}")
        if self.target_true is not None and not isinstance(self.target_true, str):
            self._fail("target_true", f"must be a string or None, got {self.target_true!r}")
        # Text a tokenizer or the scorer would choke on later, far from the record: refused here.
        self._check("prompt", self.prompt, "prompt")
        self._check("subject", self.subject, "line")
        self._check("target_new", self.target_new, "line")
        if self.target_true is not None:
            self._check("target_true", self.target_true, "line")
        for family in ("rephrase_prompts", "neighborhood_prompts", "attribute_prompts", "generation_prompts"):
            for i, text in enumerate(getattr(self, family)):
                self._check(f"{family}[{i}]", text, "prompt")
        for family in ("locality", "portability"):
            for i, probe in enumerate(getattr(self, family)):
                self._check(f"{family}[{i}].prompt", probe.prompt, "prompt")
                self._check(f"{family}[{i}].target", probe.target, "line")
                for j, alias in enumerate(probe.aliases):
                    self._check(f"{family}[{i}].aliases[{j}]", alias, "line")

    def _fail(self, name: str, problem: str) -> None:
        raise RecordError(self.source or "<record>", self.index if self.index >= 0 else None, name, problem)

    def _check(self, name: str, value: Any, kind: str) -> None:
        if not isinstance(value, str):
            self._fail(name, f"must be a string, got {type(value).__name__}")
        problem = text_problem(value, kind)
        if problem is not None:
            self._fail(name, f"{problem}: {value!r:.80}")

    @property
    def has_true_target(self) -> bool:
        return self.target_true is not None and bool(self.target_true.strip())


def check_complete_cases(records: list[EditRecord] | tuple[EditRecord, ...]) -> None:
    """Raise :class:`RecordError` when ``records`` hold part of a multi-edit case (MQuAKE: records
    with ``extra['case_id']`` / ``extra['case_size']``) but not all of it.  A case's probes assume
    all its edits are in place, so independent (non-sequential) editing must edit whole cases."""
    counts: dict[Any, int] = {}
    for rec in records:
        if "case_size" in rec.extra:
            counts[rec.extra["case_id"]] = counts.get(rec.extra["case_id"], 0) + 1
    for rec in records:
        if "case_size" in rec.extra and counts[rec.extra["case_id"]] != rec.extra["case_size"]:
            raise RecordError(
                rec.source or "<record>", rec.index if rec.index >= 0 else None, "case_id",
                f"the batch holds {counts[rec.extra['case_id']]} of case {rec.extra['case_id']!r}'s "
                f"{rec.extra['case_size']} edits; with independent edits set data.batch_size to a multiple of "
                f"the case size (and keep the file's order), or edit sequentially")
