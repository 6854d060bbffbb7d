"""The one record type every loader produces and every editor and metric consumes.

An :class:`EditRecord` is one requested edit ("``prompt`` → ``target_new``") together with the
probes used to score it: rephrasings (generalization), locality probes (things that must not
change), portability probes (consequences of the edit), and the CounterFact prompt families used
by the probability-comparison scores.  Loaders validate their input and raise
:class:`RecordError`, which names the file, the record index and the field.
"""

from __future__ import annotations

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
                raise RecordError(self.source or "<record>", self.index if self.index >= 0 else None,
                                  name, f"must be a non-empty string, got {value!r}")
        if self.target_true is not None and not isinstance(self.target_true, str):
            raise RecordError(self.source or "<record>", self.index if self.index >= 0 else None,
                              "target_true", f"must be a string or None, got {self.target_true!r}")

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
