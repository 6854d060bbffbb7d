"""Read the knowledge-editing datasets into validated :class:`EditRecord` lists.

One function per source schema (Hydra configs call them directly through ``_target_``):

* :func:`load_counterfact_rome` — ROME's CounterFact (``requested_rewrite`` with a ``{}`` template),
  including the EasyEdit portability variants (``portability``, ``alternative_subject``,
  ``distracting_neighborhood_prompts``).
* :func:`load_counterfact_easyedit` — EasyEdit's flat CounterFact (``counterfact-{train,val}.json``).
* :func:`load_zsre_mend` — MEND's zsRE (``src``/``alt``/``answers``/``loc``) and its portability
  variants (``portability``, ``alter_subject_question``, ``inverse question``).
* :func:`load_knowedit` / :func:`load_wikibio` — KnowEdit (ZsRE, WikiData_counterfact,
  WikiData_recent) and KnowEdit's WikiBio.
* :func:`load_piqa` — PIQA (``goal``/``sol1``/``sol2`` JSONL + a labels file) as
  :class:`ChoiceItem` lists, for the general-ability check (:mod:`editlab.evaluation.general`).
* :func:`load_known` — ROME's known_1000 facts as :class:`KnownRecord` lists, for causal tracing
  (:mod:`editlab.analysis.trace`).

Conventions shared by all loaders:

* Every string taken from the source is stripped of surrounding whitespace (the releases carry
  stray leading/trailing spaces on targets, subjects and questions); an empty string is an error.
* A malformed record raises :class:`RecordError` naming the file, the record index and the dotted
  field (``requested_rewrite.target_new.str``, ``locality.Relation_Specificity[0].ground_truth``);
  a wrong type (a number for a string, a list for an object) is such an error, never a
  ``TypeError``/``KeyError``.  A file that is not UTF-8, not valid JSON (truncated, an integer too
  long to read) or nested too deeply to read raises it naming the file (field ``<file>``).
* Text is checked for what would break an edit or its scoring later, far from the record
  (:func:`~editlab.data.records.text_problem`): no string anywhere in a record may hold a lone
  surrogate (not encodable as UTF-8; a tokenizer fails on it) or a NUL; prompts may hold tabs and
  line breaks (the releases' paraphrases do) but no other control character; targets, answers,
  subjects and ids must be single lines without any control character.  A subject filled into a
  ``{}`` template (ROME CounterFact, MQuAKE, known_1000) must not contain ``{}``.  A record nested
  more than :data:`MAX_DEPTH` levels deep is refused.
* Record ids (``case_id``; ``known_id``) must be unique among the records read: a repeat raises
  :class:`RecordError` naming both records.
* An empty file is an error ("no records"); so is a selection whose records are all skipped.
  ``limit``/``offset`` select records ``[offset, offset + limit)`` by position in the file, before
  validation; an ``offset`` at or past the end of the file raises
  :class:`~editlab.errors.SettingError` naming the offset and the file's record count (``limit=0``
  asks for nothing and gets an empty list).  ``EditRecord.index`` is always the position in the file.
* A record whose ``target_new`` equals its ``target_true`` is kept, with a warning naming it (see
  :func:`_load` for why it is not an error).
* ``extra['subject_in_prompt']`` tells whether ``subject`` occurs verbatim in ``prompt`` (locate-
  then-edit methods need it to); a record where it does not is kept, not rejected.
* Source fields a loader does not map are copied into ``extra`` unchanged.

zsRE specifics, following EasyEdit's ``ZsreDataset``: records whose ``alt`` is empty are not edits
and are skipped (with a warning); the NQ locality question is kept verbatim, ``"nq question: "``
prefix included, exactly as EasyEdit (and ROME's zsRE evaluation) feed it to the model.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from editlab.data.records import BAD_ANYWHERE, EditRecord, Probe, RecordError, text_problem
from editlab.errors import SettingError

__all__ = [
    "resolve_data_dir",
    "load_counterfact_rome",
    "load_counterfact_easyedit",
    "load_zsre_mend",
    "load_knowedit",
    "load_wikibio",
    "load_mquake",
    "ChoiceItem",
    "load_piqa",
    "KnownRecord",
    "load_known",
]

log = logging.getLogger(__name__)

DATA_DIR_ENV = "EDITLAB_DATA_DIR"
# The parent of the ``editlab`` package directory: a clone's root (site-packages for a wheel).
_REPO_ROOT = Path(__file__).resolve().parent.parent.parent
_DOWNLOAD_HINT = "python -m editlab.data.download --data-dir <dir>"


def _shared_data_candidates() -> list[Path]:
    """``../shared/data`` beside: the clone editlab is imported from, ``$EDITLAB_ROOT``, the cwd."""
    bases = [_REPO_ROOT]
    if os.environ.get("EDITLAB_ROOT"):
        bases.append(Path(os.environ["EDITLAB_ROOT"]))
    bases.append(Path.cwd())
    return [base.expanduser().resolve().parent / "shared" / "data" for base in bases]


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The data directory: ``data_dir``, else ``$EDITLAB_DATA_DIR``, else the first ``../shared/data``
    that exists beside the clone editlab is imported from, beside ``$EDITLAB_ROOT`` or beside the
    current directory, else ``./data``.  Raises ``FileNotFoundError`` when the chosen one is missing."""
    env = os.environ.get(DATA_DIR_ENV, "")
    if data_dir is not None and str(data_dir) != "":
        chosen, how = Path(data_dir), "the data_dir argument"
    elif env:
        chosen, how = Path(env), f"${DATA_DIR_ENV}"
    else:
        candidates = _shared_data_candidates()
        shared = next((c for c in candidates if c.is_dir()), None)
        if shared is not None:
            chosen, how = shared, f"the default {shared}"
        else:
            tried = ", ".join(dict.fromkeys(str(c) for c in candidates))
            chosen, how = Path("data"), f"the default ./data (none of {tried})"
    chosen = chosen.expanduser().resolve()
    if not chosen.is_dir():
        raise FileNotFoundError(
            f"data directory {chosen} (from {how}) does not exist. Pass data_dir, set ${DATA_DIR_ENV}, "
            f"or fetch the official releases with `{_DOWNLOAD_HINT}`.")
    return chosen


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------

class _Skip(Exception):
    """Raised by a parser for a record that is deliberately left out (the reason is logged)."""


# Nesting allowed inside one record (the releases nest at most 6 levels: KnowEdit's alias lists).
MAX_DEPTH = 32
_SHOWN_INDICES = 20  # record indices a warning lists


def _short(value: Any, width: int = 80) -> str:
    """``repr(value)`` cut to ``width`` characters (a repr escapes surrogates and control characters)."""
    try:
        text = repr(value)
    except ValueError:  # an integer too long to print
        text = f"<{type(value).__name__}>"
    return text if len(text) <= width else text[:width - 3] + "..."


def _scan(source: str, index: int, record: Any) -> None:
    """Refuse a record nested deeper than :data:`MAX_DEPTH` or holding, anywhere (keys and values of
    fields a loader does not map included), a string with a lone surrogate or a NUL: such a file is
    damaged or hostile, and its text would fail later (encoding, tokenizing) far from the record."""
    bad = BAD_ANYWHERE.search
    stack: list[tuple[Any, int]] = [(record, 0)]
    while stack:  # the common case: nothing wrong, no field paths built
        value, depth = stack.pop()
        if isinstance(value, str):
            if bad(value):
                break
        elif isinstance(value, (Mapping, list)):
            if depth >= MAX_DEPTH:
                break
            if isinstance(value, Mapping):
                if any(bad(key) for key in value):
                    break
                value = value.values()
            stack.extend((item, depth + 1) for item in value)
    else:
        return
    _locate(source, index, record)


def _locate(source: str, index: int, record: Any) -> None:
    """Raise the :class:`RecordError` :func:`_scan` found, naming the field."""
    stack: list[tuple[Any, str, int]] = [(record, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            problem = text_problem(value, "any")
            if problem is not None:
                raise RecordError(source, index, path or "<record>", f"{problem}: {_short(value)}")
        elif isinstance(value, (Mapping, list)):
            if depth >= MAX_DEPTH:
                raise RecordError(source, index, path or "<record>",
                                  f"is nested more than {MAX_DEPTH} levels deep")
            if isinstance(value, list):
                stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))
                continue
            for key, item in value.items():
                problem = text_problem(key, "any")
                if problem is not None:
                    raise RecordError(source, index, path or "<record>",
                                      f"has a key that {problem}: {_short(key)}")
                stack.append((item, f"{path}.{key}" if path else key, depth + 1))


def _read_text(file: Path) -> str:
    try:
        return file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecordError(str(file), None, "<file>", f"not UTF-8 text: {err}") from None


def _parse_json(text: str, source: str, index: int | None) -> Any:
    """``json.loads`` with its failures as :class:`RecordError` (``index``: a JSONL line, or None)."""
    where = "<file>" if index is None else "<record>"
    try:
        return json.loads(text)
    except RecursionError:
        raise RecordError(source, index, where, "invalid JSON: nested too deeply to read") from None
    except ValueError as err:  # JSONDecodeError, and integers too long to convert
        raise RecordError(source, index, where, f"invalid JSON: {err}") from None


def _window(source: str, count: int, limit: int | None, offset: int, empty: str = "an empty list") -> range:
    """The positions ``[offset, offset + limit)`` of a file's ``count`` records; an empty file, or
    an ``offset`` past the end of a file when records were asked for, is an error."""
    if count == 0:
        raise RecordError(source, None, "<file>", f"no records: the file holds {empty}")
    if offset >= count and limit != 0:
        raise SettingError("offset", f"must be below {count}, the number of records in {source}", offset)
    return range(offset, count if limit is None else min(count, offset + limit))


def _check_window(limit: int | None, offset: int) -> None:
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise SettingError("offset", "must be an integer >= 0", offset)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise SettingError("limit", "must be an integer >= 0 or None", limit)


class _Fields:
    """Validating access to one JSON object of a record; errors carry the dotted field path."""

    def __init__(self, source: str, index: int, data: Mapping[str, Any], prefix: str = "",
                 notes: list[str] | None = None) -> None:
        self.source = source
        self.index = index
        self.data = data
        self.prefix = prefix
        self.notes: list[str] = [] if notes is None else notes

    def path(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def fail(self, name: str, problem: str) -> NoReturn:
        raise RecordError(self.source, self.index, self.path(name), problem)

    def has(self, name: str) -> bool:
        return self.data.get(name) is not None

    def required(self, name: str) -> Any:
        if name not in self.data:
            self.fail(name, "missing")
        value = self.data[name]
        if value is None:
            self.fail(name, "is null")
        return value

    def _string(self, name: str, value: Any, kind: str = "prompt") -> str:
        """``value`` stripped; ``kind`` ``"prompt"`` or ``"line"`` (targets, answers, subjects, ids:
        one line, no control character) as :func:`~editlab.data.records.text_problem` checks."""
        if not isinstance(value, str):
            self.fail(name, f"must be a string, got {type(value).__name__} {_short(value)}")
        text = value.strip()
        if not text:
            self.fail(name, "must be a non-empty string")
        problem = text_problem(text, kind)
        if problem is not None:
            self.fail(name, f"{problem}: {text!r:.80}")
        return text

    def text(self, name: str, kind: str = "prompt") -> str:
        return self._string(name, self.required(name), kind)

    def line(self, name: str) -> str:
        """A target, answer, subject or id: one line without control characters."""
        return self.text(name, "line")

    def opt_text(self, name: str, kind: str = "prompt") -> str | None:
        return self.text(name, kind) if self.has(name) else None

    def opt_line(self, name: str) -> str | None:
        return self.opt_text(name, "line")

    def texts(self, name: str, kind: str = "prompt") -> tuple[str, ...]:
        value = self.required(name)
        if isinstance(value, str):  # a single string where a list is expected is a schema error
            self.fail(name, "must be a list of strings, got a string")
        if not isinstance(value, list):
            self.fail(name, f"must be a list of strings, got {type(value).__name__}")
        return tuple(self._string(f"{name}[{i}]", item, kind) for i, item in enumerate(value))

    def text_or_texts(self, name: str) -> tuple[str, ...]:
        """A string or a list of strings (KnowEdit writes both)."""
        value = self.required(name)
        return (self._string(name, value),) if isinstance(value, str) else self.texts(name)

    def ident(self, name: str) -> int | str:
        value = self.required(name)
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            self.fail(name, f"must be an integer or a string, got {type(value).__name__}")
        return self._string(name, value, "line") if isinstance(value, str) else value

    def child(self, name: str) -> _Fields:
        value = self.required(name)
        if not isinstance(value, Mapping):
            self.fail(name, f"must be an object, got {type(value).__name__}")
        return _Fields(self.source, self.index, value, f"{self.path(name)}.", self.notes)

    def opt_child(self, name: str) -> _Fields | None:
        return self.child(name) if self.has(name) else None

    def answers(self, name: str) -> tuple[str, ...]:
        """A string, a list of strings or a list of alias lists, flattened in order, duplicates dropped."""
        flat: list[str] = []

        def walk(value: Any, where: str) -> None:
            if isinstance(value, list):
                if not value:
                    self.fail(where, "must not be an empty list")
                for i, item in enumerate(value):
                    walk(item, f"{where}[{i}]")
            else:
                text = self._string(where, value, "line")
                if text not in flat:
                    flat.append(text)

        walk(self.required(name), name)
        return tuple(flat)

    def leftovers(self, known: set[str]) -> dict[str, Any]:
        return {k: v for k, v in self.data.items() if k not in known}


def _answer_probe(fields: _Fields, prompt_key: str, answer_key: str, group: str) -> list[Probe]:
    """Probes from ``{prompt_key: str | [str], answer_key: answers}``: target = first answer."""
    prompts = fields.text_or_texts(prompt_key)
    target, *aliases = fields.answers(answer_key)
    return [Probe(prompt, target, group, tuple(aliases)) for prompt in prompts]


def _probe_groups(rec: _Fields, name: str) -> tuple[Probe, ...]:
    """KnowEdit ``{group: [{prompt, ground_truth}, ...]}``; the group name is the key."""
    groups = rec.opt_child(name)
    if groups is None:
        return ()
    probes: list[Probe] = []
    for group, items in groups.data.items():
        if not isinstance(items, list):
            groups.fail(group, f"must be a list of {{prompt, ground_truth}} objects, "
                               f"got {type(items).__name__}")
        for i, item in enumerate(items):
            if not isinstance(item, Mapping):
                groups.fail(f"{group}[{i}]", f"must be an object, got {type(item).__name__}")
            probe_fields = _Fields(rec.source, rec.index, item, f"{groups.path(group)}[{i}].", rec.notes)
            probes.extend(_answer_probe(probe_fields, "prompt", "ground_truth", group))
    return tuple(probes)


def _resolve_path(path: str | Path, data_dir: str | Path | None) -> Path:
    file = Path(path).expanduser()
    if not file.is_absolute():
        file = resolve_data_dir(data_dir) / file
    if not file.is_file():
        raise FileNotFoundError(f"data file {file} does not exist (fetch official releases with "
                                f"`{_DOWNLOAD_HINT}`)")
    return file


Parser = Callable[[_Fields], Any]  # one record (EditRecord, KnownRecord) or a list of them

SAME_TARGET_NOTE = ("with target_new equal to target_true: kept, but the edit asks for the answer already "
                    "recorded as true, so the efficacy / paraphrase / neighbourhood comparisons "
                    "leave them out")


def _load(path: str | Path, limit: int | None, offset: int, data_dir: str | Path | None,
          parse: Parser, id_field: str | None = None) -> list[Any]:
    """Records ``[offset, offset + limit)`` of a JSON list file, each checked (:func:`_scan`) and
    parsed; ``id_field``: the source's record id, which must not repeat among them.

    Two things a release does hold are kept with a warning naming the records: records a parser
    skips (zsRE's empty ``alt``) and records whose ``target_new`` equals ``target_true``.  The latter
    are not errors: the official zsRE / KnowEdit files hold 66 of them (``zsre_mend_train-1k`` 17,
    ``zsre_mend_eval_portability_gpt4`` 13, ``zsre_subject_replace`` 11, ``zsre_inverse_relation`` 1,
    ``ZsRE-test-all`` 18, ``wiki_counterfact-train_cf`` 6), EasyEdit evaluates them, and dropping
    them would change the record counts published results are measured on.  Their edit still has a
    meaning (the model is taught the recorded answer: reliability and generalization accuracy are
    defined) while the probability comparisons are not, and the scorer already leaves such records
    out of those (:func:`editlab.evaluation.probes.build_plan`).  A selection that leaves no record
    (every record skipped) is an error.
    """
    _check_window(limit, offset)
    file = _resolve_path(path, data_dir)
    source = str(file)
    raw = _parse_json(_read_text(file), source, None)
    if not isinstance(raw, list):
        raise RecordError(source, None, "<file>",
                          f"top level must be a JSON list of records, got {type(raw).__name__}")
    window = _window(source, len(raw), limit, offset)
    records: list[Any] = []
    notes: dict[str, list[int]] = defaultdict(list)
    seen: dict[str, int] = {}
    for i in window:
        item = raw[i]
        if not isinstance(item, Mapping):
            raise RecordError(source, i, "<record>", f"must be a JSON object, got {type(item).__name__}")
        _scan(source, i, item)
        fields = _Fields(source, i, item)
        try:
            parsed = parse(fields)
        except _Skip as skip:
            notes[f"skipped: {skip}"].append(i)
        else:
            parsed = parsed if isinstance(parsed, list) else [parsed]
            if id_field is not None:
                key = str(fields.ident(id_field))
                if key in seen:
                    raise RecordError(source, i, id_field, f"{_short(fields.data[id_field])} repeats the "
                                      f"{id_field} of record {seen[key]}: record ids must be unique")
                seen[key] = i
            if any(isinstance(r, EditRecord) and r.target_true == r.target_new for r in parsed):
                fields.notes.append(SAME_TARGET_NOTE)
            records.extend(parsed)
        for note in dict.fromkeys(fields.notes):
            notes[note].append(i)
    for note, indices in notes.items():
        shown = ", ".join(map(str, indices[:_SHOWN_INDICES]))
        shown += ", ..." if len(indices) > _SHOWN_INDICES else ""
        log.warning("%s: %d record(s) %s (indices %s)", source, len(indices), note, shown)
    if not records and len(window):
        raise RecordError(source, None, "<file>", f"no records: all {len(window)} selected "
                                                  f"(offset {offset}, limit {limit}) were skipped")
    log.debug("loaded %d records from %s", len(records), source)
    return records


def _template_subject(fields: _Fields, name: str) -> str:
    """A subject that fills a ``{}`` template: one line, and no ``{}`` of its own (the filled prompt
    would hold a placeholder, and a template filled twice would differ)."""
    subject = fields.line(name)
    if "{}" in subject:
        fields.fail(name, f"must not contain '{{}}', the template's placeholder for the subject: "
                          f"{subject!r:.80}")
    return subject


def _subject_in_prompt(subject: str, prompt: str) -> bool:
    return subject in prompt


# --------------------------------------------------------------------------------------------
# ROME CounterFact
# --------------------------------------------------------------------------------------------

_ROME_KNOWN = {"case_id", "pararel_idx", "requested_rewrite", "paraphrase_prompts", "neighborhood_prompts",
               "attribute_prompts", "generation_prompts", "portability", "alternative_subject",
               "distracting_neighborhood_prompts"}


def _parse_counterfact_rome(rec: _Fields) -> EditRecord:
    rewrite = rec.child("requested_rewrite")
    template = rewrite.text("prompt")
    if template.count("{}") != 1:
        rewrite.fail("prompt", f"template must contain exactly one '{{}}' for the subject: {template!r}")
    subject = _template_subject(rewrite, "subject")
    target_new = rewrite.child("target_new")
    target_true = rewrite.child("target_true")
    new, true = target_new.line("str"), target_true.line("str")
    prompt = template.replace("{}", subject)
    neighborhood = rec.texts("neighborhood_prompts")

    locality = [Probe(p, true, "neighborhood") for p in neighborhood]
    if rec.has("distracting_neighborhood_prompts"):
        locality += [Probe(p, true, "distracting_neighborhood")
                     for p in rec.texts("distracting_neighborhood_prompts")]
    portability: list[Probe] = []
    extra: dict[str, Any] = {"prompt_template": template, "subject_in_prompt": True}
    port = rec.opt_child("portability")
    if port is not None:
        portability.append(Probe(port.text("New Question"), port.line("New Answer"), "one_hop"))
        extra["recalled_relation"] = port.opt_text("Recalled Relation")
    alternative = _template_subject(rec, "alternative_subject") if rec.has("alternative_subject") else None
    if alternative is not None:
        portability.append(Probe(template.replace("{}", alternative), new, "subject_aliasing"))
        extra["alternative_subject"] = alternative
    extra["relation_id"] = rewrite.opt_line("relation_id")
    extra["target_new_id"] = target_new.opt_line("id")
    extra["target_true_id"] = target_true.opt_line("id")
    if rec.has("pararel_idx"):
        extra["pararel_idx"] = rec.ident("pararel_idx")
    extra.update(rec.leftovers(_ROME_KNOWN))
    return EditRecord(
        record_id=rec.ident("case_id"), prompt=prompt, subject=subject, target_new=new, target_true=true,
        rephrase_prompts=rec.texts("paraphrase_prompts"), locality=tuple(locality),
        portability=tuple(portability), neighborhood_prompts=neighborhood,
        attribute_prompts=rec.texts("attribute_prompts"), generation_prompts=rec.texts("generation_prompts"),
        source=rec.source, index=rec.index, extra=extra)


def load_counterfact_rome(path: str | Path, limit: int | None = None, offset: int = 0, *,
                          data_dir: str | Path | None = None) -> list[EditRecord]:
    """ROME CounterFact (``counterfact.json``, EasyEdit's portability / subject-replace /
    distracting-neighbour variants).

    ``prompt`` is the ``requested_rewrite.prompt`` template filled with the subject; locality
    probes are the neighbourhood prompts (group ``neighborhood``) and, when present, the
    distracting ones (``distracting_neighborhood``), all scored against ``target_true``;
    portability probes come from ``portability`` (``one_hop``) and ``alternative_subject``
    (``subject_aliasing``: the template filled with the alias, scored against ``target_new``).
    """
    return _load(path, limit, offset, data_dir, _parse_counterfact_rome, id_field="case_id")


# --------------------------------------------------------------------------------------------
# EasyEdit CounterFact
# --------------------------------------------------------------------------------------------

_EASYEDIT_KNOWN = {"case_id", "prompt", "subject", "target_new", "ground_truth", "rephrase_prompt",
                   "locality_prompt", "locality_ground_truth"}


def _parse_counterfact_easyedit(rec: _Fields) -> EditRecord:
    prompt, subject = rec.text("prompt"), rec.line("subject")
    true = rec.line("ground_truth")
    loc_prompt, loc_true = rec.text("locality_prompt"), rec.line("locality_ground_truth")
    extra: dict[str, Any] = {"subject_in_prompt": _subject_in_prompt(subject, prompt)}
    extra.update(rec.leftovers(_EASYEDIT_KNOWN))
    return EditRecord(
        record_id=rec.ident("case_id"), prompt=prompt, subject=subject, target_new=rec.line("target_new"),
        target_true=true, rephrase_prompts=(rec.text("rephrase_prompt"),),
        locality=(Probe(loc_prompt, loc_true, "neighborhood"),),
        # The probability-comparison neighbourhood score needs the neighbour to share target_true.
        neighborhood_prompts=(loc_prompt,) if loc_true == true else (),
        source=rec.source, index=rec.index, extra=extra)


def load_counterfact_easyedit(path: str | Path, limit: int | None = None, offset: int = 0, *,
                              data_dir: str | Path | None = None) -> list[EditRecord]:
    """EasyEdit CounterFact (``counterfact-{train,val}.json``): one rephrase and one locality probe.

    ``neighborhood_prompts`` holds the locality prompt only when its answer equals
    ``ground_truth``, the condition under which CounterFact's neighbourhood score is defined.
    """
    return _load(path, limit, offset, data_dir, _parse_counterfact_easyedit, id_field="case_id")


# --------------------------------------------------------------------------------------------
# MEND zsRE
# --------------------------------------------------------------------------------------------

_ZSRE_KNOWN = {"subject", "src", "pred", "rephrase", "alt", "answers", "loc", "loc_ans", "cond",
               "portability", "alternative_subject", "alter_subject_question", "inverse question"}


def _parse_zsre_mend(rec: _Fields) -> EditRecord:
    alt = rec.required("alt")
    if isinstance(alt, str) and not alt.strip():
        raise _Skip("with an empty 'alt' (no edit requested; EasyEdit skips them too)")
    target_new = rec.line("alt")
    prompt, subject = rec.text("src"), rec.line("subject")
    answers = rec.texts("answers", "line")
    if not answers:
        rec.fail("answers", "must not be an empty list")
    locality: tuple[Probe, ...] = ()
    if rec.has("loc"):
        locality = (Probe(rec.text("loc"), rec.line("loc_ans"), "nq"),)
    portability: list[Probe] = []
    extra: dict[str, Any] = {"answers": answers, "subject_in_prompt": _subject_in_prompt(subject, prompt)}
    port = rec.opt_child("portability")
    if port is not None:
        portability.append(Probe(port.text("New Question"), port.line("New Answer"), "one_hop"))
        extra["recalled_relation"] = port.opt_text("Recalled Relation")
    if rec.has("alter_subject_question"):
        portability.append(Probe(rec.text("alter_subject_question"), target_new, "subject_aliasing"))
    if rec.has("inverse question"):
        portability.append(Probe(rec.text("inverse question"), subject, "inverse_relation"))
    for key, kind in (("pred", "line"), ("cond", "prompt"), ("alternative_subject", "line")):
        if rec.has(key):
            extra[key] = rec.text(key, kind)
    extra.update(rec.leftovers(_ZSRE_KNOWN))
    return EditRecord(
        record_id=rec.index, prompt=prompt, subject=subject, target_new=target_new, target_true=answers[0],
        rephrase_prompts=(rec.text("rephrase"),), locality=locality, portability=tuple(portability),
        source=rec.source, index=rec.index, extra=extra)


def load_zsre_mend(path: str | Path, limit: int | None = None, offset: int = 0, *,
                   data_dir: str | Path | None = None) -> list[EditRecord]:
    """MEND zsRE (``zsre_mend_{train,eval}.json`` and EasyEdit's portability variants).

    ``target_true`` is ``answers[0]`` (all answers in ``extra['answers']``); the NQ question is
    the locality probe (group ``nq``, ``"nq question: "`` prefix kept, as EasyEdit does);
    portability groups: ``one_hop``, ``subject_aliasing`` (answer ``alt``) and
    ``inverse_relation`` (answer: the subject).  Records with an empty ``alt`` are skipped.
    """
    return _load(path, limit, offset, data_dir, _parse_zsre_mend)


# --------------------------------------------------------------------------------------------
# KnowEdit
# --------------------------------------------------------------------------------------------

_KNOWEDIT_KNOWN = {"subject", "prompt", "target_new", "ground_truth", "rephrase_prompt", "locality",
                   "portability"}


def _parse_knowedit(rec: _Fields) -> EditRecord:
    prompt, subject = rec.text("prompt"), rec.line("subject")
    extra: dict[str, Any] = {"subject_in_prompt": _subject_in_prompt(subject, prompt)}
    target_true: str | None = None
    raw_truth = rec.data.get("ground_truth")
    if isinstance(raw_truth, str) and not raw_truth.strip():
        rec.notes.append("with an empty 'ground_truth' (read as no true target)")
    elif raw_truth is not None:
        answers = rec.answers("ground_truth")
        target_true = answers[0]
        extra["answers"] = answers
    rephrase = rec.text_or_texts("rephrase_prompt") if rec.has("rephrase_prompt") else ()
    extra.update(rec.leftovers(_KNOWEDIT_KNOWN))
    return EditRecord(
        record_id=rec.index, prompt=prompt, subject=subject, target_new=rec.line("target_new"),
        target_true=target_true, rephrase_prompts=rephrase, locality=_probe_groups(rec, "locality"),
        portability=_probe_groups(rec, "portability"), source=rec.source, index=rec.index, extra=extra)


def load_knowedit(path: str | Path, limit: int | None = None, offset: int = 0, *,
                  data_dir: str | Path | None = None) -> list[EditRecord]:
    """KnowEdit (ZsRE, WikiData_counterfact, WikiData_recent).

    ``ground_truth`` may be a string, a list, or absent (new knowledge: ``target_true`` None);
    probe answers may be a string, a list or a list of alias lists: the first string is the
    target, the rest become ``aliases``.  Each probe's group is its key (``Relation_Specificity``,
    ``Forgetfulness``, ``Reasoning``, ``Subject_Aliasing``, ``Logical_Generalization``).
    """
    return _load(path, limit, offset, data_dir, _parse_knowedit)


_WIKIBIO_KNOWN = {"text", "labels", "concept", "locality"}


def _parse_wikibio(rec: _Fields) -> EditRecord:
    prompt, subject = rec.text("text"), rec.line("concept")
    extra: dict[str, Any] = {"subject_in_prompt": _subject_in_prompt(subject, prompt)}
    extra.update(rec.leftovers(_WIKIBIO_KNOWN))
    return EditRecord(
        record_id=rec.index, prompt=prompt, subject=subject, target_new=rec.line("labels"),
        locality=_probe_groups(rec, "locality"), source=rec.source, index=rec.index, extra=extra)


def load_wikibio(path: str | Path, limit: int | None = None, offset: int = 0, *,
                 data_dir: str | Path | None = None) -> list[EditRecord]:
    """KnowEdit WikiBio (``wikibio-{train,test}-all.json``): ``text`` → prompt, ``labels`` →
    target_new (a continuation sentence), ``concept`` → subject; no true target."""
    return _load(path, limit, offset, data_dir, _parse_wikibio)


# --------------------------------------------------------------------------------------------
# Multiple choice (general ability)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice question: ``context`` followed by one of ``choices``; ``label`` is the
    index of the right choice; ``index`` the position in the source file."""

    context: str
    choices: tuple[str, ...]
    label: int
    index: int


# --------------------------------------------------------------------------------------------
# MQuAKE
# --------------------------------------------------------------------------------------------

def _parse_mquake(rec: _Fields) -> list[EditRecord]:
    case_id = rec.ident("case_id")
    rewrites = rec.required("requested_rewrite")
    if not isinstance(rewrites, list) or not rewrites:
        rec.fail("requested_rewrite", f"must be a non-empty list of edits, got {rewrites!r}")
    questions = rec.texts("questions")
    new_answer, *new_aliases = rec.answers("new_answer")
    if rec.has("new_answer_alias") and rec.data["new_answer_alias"] != []:
        new_aliases = [a for a in rec.answers("new_answer_alias") if a not in new_aliases and a != new_answer]
    multi_hop = tuple(Probe(q, new_answer, "multi_hop", tuple(new_aliases)) for q in questions)
    records = []
    for j, item in enumerate(rewrites):
        if not isinstance(item, Mapping):
            rec.fail(f"requested_rewrite[{j}]", f"must be an object, got {type(item).__name__}")
        edit = _Fields(rec.source, rec.index, item, f"requested_rewrite[{j}].", rec.notes)
        template, subject = edit.text("prompt"), _template_subject(edit, "subject")
        if template.count("{}") != 1:
            edit.fail("prompt", f"must contain '{{}}' once, for the subject, got {template!r}")
        records.append(EditRecord(
            record_id=f"{case_id}:{j}",
            prompt=template.replace("{}", subject),
            subject=subject,
            target_new=edit.child("target_new").line("str"),
            target_true=edit.child("target_true").line("str"),
            rephrase_prompts=(edit.text("question"),) if edit.has("question") else (),
            portability=multi_hop if j == len(rewrites) - 1 else (),
            source=rec.source,
            index=rec.index,
            extra={"case_id": case_id, "case_size": len(rewrites), "case_position": j,
                   "relation_id": edit.opt_line("relation_id"), "answer": rec.opt_line("answer")},
        ))
    return records


def load_mquake(path: str | Path = "mquake/MQuAKE-hard.json", limit: int | None = None, offset: int = 0, *,
                data_dir: str | Path | None = None) -> list[EditRecord]:
    """MQuAKE (Zhong et al. 2023; the MQuAKE-hard subset of wangywUST/DeepEdit): multi-hop ripple effects.

    ``limit`` / ``offset`` count *cases*.  Each case becomes one record per requested rewrite, in
    order (``record_id`` ``"{case_id}:{j}"``; ``extra`` holds ``case_id``, ``case_size`` and
    ``case_position``): the prompt is the rewrite's cloze template filled with its subject, the
    rewrite's ``question`` its rephrase.  The case's multi-hop questions are portability probes of
    the case's *last* record (group ``multi_hop``, answer ``new_answer``, aliases
    ``new_answer_alias``), so they are scored once every edit of the case is in place: the edit
    loop edits a case's records as one batch (``data.batch_size`` = the case size) or
    sequentially, and refuses batches that split a case in independent-edit mode.
    """
    return _load(path, limit, offset, data_dir, _parse_mquake, id_field="case_id")


def load_piqa(path: str | Path = "locality/piqa_valid.jsonl", labels: str | Path | None = None,
              limit: int | None = None, offset: int = 0, *,
              data_dir: str | Path | None = None) -> list[ChoiceItem]:
    """PIQA (Bisk et al. 2020): ``{"goal", "sol1", "sol2"}`` per JSONL line and the answer (``0`` for
    ``sol1``, ``1`` for ``sol2``) on the same line of ``labels`` (default: ``<stem>-labels.lst``
    beside ``path``).  Relative paths are read from the data directory
    (:func:`resolve_data_dir`).  Items ``[offset, offset + limit)`` by line; a malformed line raises
    :class:`RecordError` naming the file, the line index (0-based) and the field.  Strings must not
    be blank, nor hold what a prompt may not (:func:`~editlab.data.records.text_problem`); the goal
    is stripped and the solutions right-stripped (some end in a space).  Lines are split at ``\\n``
    only (JSON text may hold U+2028 and other characters ``str.splitlines`` splits at).  An empty
    file, or an ``offset`` past its end, is an error, as for the other loaders."""
    _check_window(limit, offset)
    file = _resolve_path(path, data_dir)
    label_file = (_resolve_path(labels, data_dir) if labels is not None
                  else file.with_name(f"{file.stem}-labels.lst"))
    if not label_file.is_file():
        raise FileNotFoundError(f"PIQA labels file {label_file} (for {file}) does not exist")
    lines = _read_text(file).split("\n")
    answers = _read_text(label_file).split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    while answers and not answers[-1].strip():
        answers.pop()
    if len(lines) != len(answers):
        raise RecordError(str(label_file), None, "<file>",
                          f"{len(answers)} labels for the {len(lines)} items of {file}")
    items: list[ChoiceItem] = []
    for i in _window(str(file), len(lines), limit, offset, empty="no lines"):
        raw = _parse_json(lines[i], str(file), i)
        if not isinstance(raw, Mapping):
            raise RecordError(str(file), i, "<record>", f"must be a JSON object, got {type(raw).__name__}")
        _scan(str(file), i, raw)
        fields = _Fields(str(file), i, raw)
        texts = []
        for name in ("goal", "sol1", "sol2"):
            value = fields.required(name)
            if not isinstance(value, str) or not value.strip():
                fields.fail(name, f"must be a non-empty string, got {_short(value)}")
            text = value.strip() if name == "goal" else value.rstrip()
            problem = text_problem(text, "prompt")
            if problem is not None:
                fields.fail(name, f"{problem}: {text!r:.80}")
            texts.append(text)
        label = answers[i].strip()
        if label not in ("0", "1"):
            raise RecordError(str(label_file), i, "label", f"must be 0 or 1, got {label!r:.40}")
        items.append(ChoiceItem(texts[0], (texts[1], texts[2]), int(label), i))
    return items


# --------------------------------------------------------------------------------------------
# known_1000 (causal tracing)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KnownRecord:
    """One record of ROME's ``known_1000.json`` (facts GPT-2 XL was found to know).

    ``prompt`` is the text traced (it ends where the attribute should follow); ``template`` and
    ``prediction`` (GPT-2 XL's continuation) are kept for reference only.
    """

    known_id: int
    subject: str
    attribute: str
    template: str
    prediction: str
    prompt: str
    relation_id: str
    source: str = ""
    index: int = -1


_KNOWN_TEXT = {"subject": "line", "attribute": "line", "template": "prompt", "prompt": "prompt",
               "relation_id": "line"}


def _parse_known(rec: _Fields) -> KnownRecord:
    values = {name: rec.text(name, kind) for name, kind in _KNOWN_TEXT.items()}
    if "{}" in values["subject"]:
        rec.fail("subject", f"must not contain '{{}}', the template's placeholder for the subject: "
                            f"{values['subject']!r:.80}")
    prediction = rec.required("prediction")
    if not isinstance(prediction, str):
        rec.fail("prediction", f"must be a string, got {type(prediction).__name__}")
    known_id = rec.required("known_id")
    if isinstance(known_id, bool) or not isinstance(known_id, int):
        rec.fail("known_id", f"must be an integer, got {type(known_id).__name__}")
    if values["subject"] not in values["prompt"]:
        rec.fail("subject", f"{values['subject']!r} does not occur in the prompt {values['prompt']!r}")
    return KnownRecord(known_id=known_id, prediction=prediction, source=rec.source, index=rec.index, **values)


def load_known(path: str | Path = "known_1000/known_1000.json", limit: int | None = None, offset: int = 0, *,
               data_dir: str | Path | None = None) -> list[KnownRecord]:
    """ROME's known_1000 file: records ``[offset, offset + limit)`` by position.

    Validated like every loader here: a bad record raises :class:`RecordError` naming the file,
    the record index and the field.  Strings are stripped of surrounding whitespace except
    ``prediction`` (a raw continuation).  The subject must occur in the prompt (causal tracing
    corrupts its tokens).
    """
    return _load(path, limit, offset, data_dir, _parse_known, id_field="known_id")
