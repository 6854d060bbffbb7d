"""Fuzz the record loaders: random mutations of valid records of every schema they read (ROME and
EasyEdit CounterFact, MEND zsRE, KnowEdit, WikiBio, MQuAKE, known_1000, PIQA JSONL).

Every input must either load into records that satisfy the record invariants (non-empty, stripped,
encodable text without control characters, one-line targets, unique ids, ...) or raise
:class:`RecordError` -- never another exception (``TypeError``, ``KeyError``, ``RecursionError``,
``UnicodeDecodeError``, ...); the one exception is a :class:`SettingError` for an ``offset`` past
the end of the file, a bad setting rather than bad data.  The valid records are written here in the shapes of the real
releases (no real data is read); Hypothesis mutates them: keys deleted, values replaced by JSON
values of other types, unicode injected (lone surrogates, NUL, line breaks, ``{}``), values nested
deeply, records duplicated, lists emptied, huge integers, NaN/Infinity, truncated files and bytes
that are not UTF-8.

Deterministic (``derandomize=True``) and without an example database (nothing is written into the
repository); the whole module runs in a few seconds.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("hypothesis")  # the `dev` extra

from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.configuration import set_hypothesis_home_dir  # noqa: E402

from editlab.data.loaders import (  # noqa: E402
    ChoiceItem,
    KnownRecord,
    load_counterfact_easyedit,
    load_counterfact_rome,
    load_known,
    load_knowedit,
    load_mquake,
    load_piqa,
    load_wikibio,
    load_zsre_mend,
)
from editlab.data.records import EditRecord, RecordError  # noqa: E402
from editlab.errors import SettingError  # noqa: E402

# Hypothesis keeps a cache (constants of local modules) in ./.hypothesis even without an example
# database: keep it out of the repository unless the user chose a place.
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "editlab-hypothesis")

EXAMPLES = 150  # per schema; 8 schemas: about 15 s in all
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])


# --------------------------------------------------------------------------------------------
# Valid records, one list per schema (shapes of the real releases; the content is invented)
# --------------------------------------------------------------------------------------------

def _rome(case_id: int, **more: Any) -> dict[str, Any]:
    return {
        "case_id": case_id, "pararel_idx": 5907,
        "requested_rewrite": {"prompt": "{}, a product created by", "relation_id": "P178",
                              "target_new": {"str": "Adobe", "id": "Q11463"},
                              "target_true": {"str": "Sega", "id": "Q122741"}, "subject": "Shinobi Quest"},
        "paraphrase_prompts": ["Regrets\nXI. Shinobi Quest, a product developed by", "Shinobi Quest is created by"],
        "neighborhood_prompts": ["Lucky Caper, a product developed by"],
        "attribute_prompts": ["Photo Studio, a product created by"],
        "generation_prompts": ["Shinobi Quest is sold by"],
        **more,
    }


ROME = [
    _rome(1, portability={"Recalled Relation": "(Adobe, headquarters, San Jose)",
                          "New Question": "Where is the maker of Shinobi Quest based?", "New Answer": "San Jose"}),
    _rome(2, alternative_subject="Quest of Shinobi"),
    _rome(3, distracting_neighborhood_prompts=["Shinobi Quest is made by Adobe. Lucky Caper is made by"],
          unrelated_relation={"relation_id": "P31", "object": "game", "question": "What is it?"}),
]

EASYEDIT = [
    {"case_id": 2, "prompt": "Toko Ama, the", "target_new": "piano", "subject": "Toko Ama", "ground_truth": "guitar",
     "rephrase_prompt": "Toko Ama is incredible at", "locality_prompt": "John Lenn performs on the",
     "locality_ground_truth": "guitar"},
    {"case_id": 3, "prompt": "Ann Vole plays the", "target_new": "violin", "subject": "Ann Vole",
     "ground_truth": "piano", "rephrase_prompt": "Ann Vole\tis a virtuoso on the",
     "locality_prompt": "Ben Oar plays the", "locality_ground_truth": "cello"},
]

ZSRE = [
    {"subject": "Ramalinaceae", "src": "Which family does Ramalinaceae belong to?", "pred": "Ramalinales",
     "rephrase": "What family are Ramalinaceae?", "alt": "Lamiinae", "answers": ["Lecanorales"],
     "loc": "nq question: types of skiing in the winter games", "loc_ans": "Downhill",
     "cond": "Ramalinales >> Lamiinae || Which family does Ramalinaceae belong to?",
     "portability": {"Recalled Relation": "(Lamiinae, subfamily of, Cerambycidae)",
                     "New Question": "Which family does Ramalinaceae belong to now?", "New Answer": "Cerambycidae"}},
    {"subject": "NGC 3953", "src": "Which was the constellation for NGC 3953?", "pred": "Ursa Major",
     "rephrase": "Which one was the constellation of NGC 3953?", "alt": "Triangulum", "answers": ["Ursa Major"],
     "cond": "Ursa Major >> Triangulum || Which was the constellation for NGC 3953?",
     "alternative_subject": "UGC 6870", "alter_subject_question": "What is the constellation of UGC 6870?"},
    {"subject": "Claire Clair", "src": "Who is Claire Clair's sister?", "pred": "Claire Clair",
     "rephrase": "Who's Claire Clair's sister?", "alt": "Marian Clair", "answers": ["Mary Shell"],
     "inverse question": "Who is Marian Clair's sister?"},
    {"subject": "Empty Alt", "src": "What is Empty Alt?", "rephrase": "Empty Alt is what?", "alt": "",
     "answers": ["nothing"]},
]

KNOWEDIT = [
    {"subject": "Louise Grand", "target_new": "mezzo soprano", "prompt": "What voice type is Louise Grand?",
     "ground_truth": ["soprano"], "rephrase_prompt": "What tone does Louise Grand sing in?",
     "cond": "soprano >> mezzo soprano || What voice type is Louise Grand?",
     "locality": {"Relation_Specificity": [{"prompt": "The citizenship of Louise Grand is",
                                            "ground_truth": ["France"]}]},
     "portability": {"Reasoning": [{"prompt": "What is the range of Louise Grand?", "ground_truth": "A3 to A5"}]}},
    {"subject": "Ingrida Aman", "prompt": "The gender of Ingrida Aman is", "target_new": "female", "portability": {},
     "locality": {"Relation_Specificity": [
         {"prompt": "The country of Ingrida Aman is", "ground_truth": [["Soviet Union", "USSR"]]},
         {"prompt": "The siblings of Ingrida Aman are", "ground_truth": [["Ina"], ["Oskar", "O."]]}]}},
    {"subject": "Port Elm", "prompt": "Port Elm is located in the country of", "target_new": "Chile",
     "ground_truth": "Peru",
     "portability": {"Subject_Aliasing": [{"prompt": "Elm Harbour is located in", "ground_truth": "Chile"}]},
     "locality": {"Forgetfulness": [{"prompt": "Port Elm, not in Chile, is in", "ground_truth": "Peru"}]}},
]

WIKIBIO = [
    {"text": "This is a Wikipedia passage about john rey. Sir John Rey (1828 \u2013 1896) was a neurologist.",
     "labels": "He received general education from his father.", "concept": "john rey",
     "locality": {"Relation_Specificity": [{"prompt": "The field of work of john rey is",
                                            "ground_truth": ["medicine"]}]}},
    {"text": "This is a Wikipedia passage about ada quill. Ada Quill was a composer.",
     "labels": "She studied in Vienna.", "concept": "ada quill", "locality": {}},
]

MQUAKE = [
    {"case_id": 7417,
     "requested_rewrite": [
         {"prompt": "{} was performed by", "relation_id": "P175", "target_new": {"str": "Madonna", "id": "Q1744"},
          "target_true": {"str": "The Beatles", "id": "Q1299"}, "subject": "Hey Jude",
          "question": "Who performed Hey Jude?"},
         {"prompt": "{} is a citizen of", "relation_id": "P27", "target_new": {"str": "Australia", "id": "Q408"},
          "target_true": {"str": "USA", "id": "Q30"}, "subject": "Madonna", "question": "Madonna is a citizen of?"}],
     "questions": ["Which country is the performer of Hey Jude a citizen of?"],
     "answer": "United Kingdom", "answer_alias": ["UK"], "new_answer": "Australia",
     "new_answer_alias": ["Commonwealth of Australia", "AU"], "single_hops": [], "new_single_hops": []},
    {"case_id": 7418,
     "requested_rewrite": [
         {"prompt": "The official language of {} is", "relation_id": "P37",
          "target_new": {"str": "Arabic", "id": "Q13955"}, "target_true": {"str": "English", "id": "Q1860"},
          "subject": "Australia"}],
     "questions": ["What is the official language of the country Madonna is a citizen of?"],
     "answer": "English", "answer_alias": ["en"], "new_answer": "Arabic", "new_answer_alias": [],
     "single_hops": [{"question": "What is the official language of Australia?", "cloze": "The official language "
                      "of Australia is", "answer": "English", "answer_alias": []}], "new_single_hops": []},
]

KNOWN = [
    {"known_id": 0, "subject": "Vinson Massif", "attribute": "Antarctica", "template": "{} is located in the continent",
     "prediction": " of Antarctica. It is the largest\n", "prompt": "Vinson Massif is located in the continent of",
     "relation_id": "P30"},
    {"known_id": 1, "subject": "Toyota", "attribute": "Japan", "template": "{} is a company from",
     "prediction": " Japan", "prompt": "Toyota is a company from", "relation_id": "P17"},
]

PIQA = [
    {"goal": "How do I ready a cage for its new occupants?", "sol1": "Fill it with paper strips.",
     "sol2": "Fill it with jeans material."},
    {"goal": "Open a jar", "sol1": "twist the lid ", "sol2": "hit it"},
]

SCHEMAS: dict[str, tuple[Callable[..., list[Any]], list[dict[str, Any]]]] = {
    "counterfact_rome": (load_counterfact_rome, ROME),
    "counterfact_easyedit": (load_counterfact_easyedit, EASYEDIT),
    "zsre_mend": (load_zsre_mend, ZSRE),
    "knowedit": (load_knowedit, KNOWEDIT),
    "wikibio": (load_wikibio, WIKIBIO),
    "mquake": (load_mquake, MQUAKE),
    "known": (load_known, KNOWN),
    "piqa": (load_piqa, PIQA),
}

# --------------------------------------------------------------------------------------------
# Mutations
# --------------------------------------------------------------------------------------------

NASTY = ["\ud800", "\udfff", "\ud800x", "\x00", "\n", "\r\n", "\t", "\x1b", "\x85", "\u2028", "{}", "{",
         " ", "\ufeff", "\u200b", "\U0001f600", "\\", '"']
NEST = "@@nest@@"  # a string replaced, after serialising, by raw JSON nested this deep
HUGE = "@@huge@@"  # ... by an integer of 5000 digits (more than Python's int parsing allows)

# pieces of text: any code point (surrogates included) or one of NASTY
texts = st.lists(st.characters(exclude_categories=()) | st.sampled_from(NASTY), max_size=8).map("".join)
scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.sampled_from([10**40, -1, 0])
           | st.floats(allow_nan=True, allow_infinity=True) | texts)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(texts, inner, max_size=3), max_leaves=6)


def _nodes(node: Any, path: tuple = ()) -> list[tuple]:
    """Paths (keys / list indices) of every node below the root."""
    out = [path] if path else []
    if isinstance(node, dict):
        for key, value in node.items():
            out += _nodes(value, path + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _nodes(value, path + (i,))
    return out


def _get(root: Any, path: tuple) -> Any:
    for key in path:
        root = root[key]
    return root


def mutate(data: st.DataObject, payload: list[Any]) -> list[Any]:
    """One random mutation of ``payload`` (a deep copy is changed and returned)."""
    payload = copy.deepcopy(payload)
    kind = data.draw(st.sampled_from(["delete", "replace", "inject", "empty", "nest", "huge", "duplicate",
                                      "same_target", "special"]), label="mutation")
    if kind == "duplicate" and payload:
        i = data.draw(st.integers(0, len(payload) - 1), label="duplicated record")
        payload.insert(data.draw(st.integers(0, len(payload)), label="at"), copy.deepcopy(payload[i]))
        return payload
    if kind == "same_target":  # target_new copied to target_true where the schema has both
        for rec in payload:
            if isinstance(rec, dict):
                rewrite = rec.get("requested_rewrite")
                for rw in rewrite if isinstance(rewrite, list) else [rewrite]:
                    if isinstance(rw, dict) and "target_new" in rw:
                        rw["target_true"] = copy.deepcopy(rw["target_new"])
                if "target_new" in rec and "ground_truth" in rec:
                    rec["ground_truth"] = copy.deepcopy(rec["target_new"])
                if "alt" in rec and "answers" in rec:
                    rec["answers"] = [rec["alt"]]
        return payload
    nodes = _nodes(payload)
    if not nodes:
        return payload
    path = data.draw(st.sampled_from(nodes), label="path")
    parent, key = _get(payload, path[:-1]), path[-1]
    value = parent[key]
    if kind == "delete":
        del parent[key]
    elif kind == "replace":
        parent[key] = data.draw(json_values, label="value")
    elif kind == "inject":
        text = value if isinstance(value, str) else data.draw(texts, label="text")
        at = data.draw(st.integers(0, len(text)), label="at")
        parent[key] = text[:at] + data.draw(st.sampled_from(NASTY), label="injected") + text[at:]
    elif kind == "empty":
        parent[key] = data.draw(st.sampled_from([[], {}, "", "   ", [[]], [""]]), label="empty")
    elif kind == "nest":
        parent[key] = f"{NEST}{data.draw(st.sampled_from([3, 40, 100_000]), label='depth')}"
    elif kind == "huge":
        parent[key] = HUGE
    else:  # special JSON numbers
        parent[key] = data.draw(st.sampled_from([math.nan, math.inf, -math.inf, 2**64, -0.0, 1e308]))
    return payload


def serialise(data: st.DataObject, payload: list[Any], jsonl: bool) -> bytes:
    """``payload`` as file bytes (JSON, or JSONL for PIQA), then maybe damaged as raw text."""
    ascii_only = data.draw(st.booleans(), label="ensure_ascii")
    if jsonl:
        text = "".join(json.dumps(item, ensure_ascii=ascii_only) + "\n" for item in payload)
    else:
        text = json.dumps(payload, ensure_ascii=ascii_only)
    text = re.sub(f'"{NEST}(\\d+)"', lambda m: "[" * int(m.group(1)) + "1" + "]" * int(m.group(1)), text)
    text = text.replace(f'"{HUGE}"', "9" * 5000)
    raw = text.encode("utf-8", "surrogatepass")  # a lone surrogate becomes bytes that are not UTF-8
    damage = data.draw(st.sampled_from(["none"] * 15 + ["truncate", "bad_bytes", "bom", "empty", "not_list"]),
                       label="damage")
    if damage == "truncate" and raw:
        raw = raw[:data.draw(st.integers(0, len(raw) - 1), label="cut")]
    elif damage == "bad_bytes":
        at = data.draw(st.integers(0, len(raw)), label="at")
        raw = raw[:at] + data.draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00"])) + raw[at:]
    elif damage == "bom":
        raw = b"\xef\xbb\xbf" + raw
    elif damage == "empty":
        raw = b"" if jsonl else b"[]"
    elif damage == "not_list" and not jsonl:
        raw = b'{"records": ' + raw + b"}"
    return raw


# --------------------------------------------------------------------------------------------
# Invariants of what loads
# --------------------------------------------------------------------------------------------

_PROMPT_BAD = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
_LINE_BAD = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def _text(value: Any, what: str, line: bool = True) -> None:
    assert isinstance(value, str) and value.strip() and value == value.strip(), f"{what}: {value!r}"
    value.encode("utf-8")  # no lone surrogate
    assert not (_LINE_BAD if line else _PROMPT_BAD).search(value), f"{what}: {value!r}"


def check_edit_records(records: list[EditRecord], path: Path, size: int, template: bool) -> None:
    assert records
    ids = [r.record_id for r in records]
    assert len(set(map(str, ids))) == len(ids), ids
    for r in records:
        assert isinstance(r, EditRecord) and r.source == str(path) and 0 <= r.index < size
        assert (isinstance(r.record_id, int) and not isinstance(r.record_id, bool)) or (
            isinstance(r.record_id, str) and r.record_id.strip())
        _text(r.prompt, "prompt", line=False)
        _text(r.subject, "subject")
        _text(r.target_new, "target_new")
        if r.target_true is not None:
            _text(r.target_true, "target_true")
        if template:
            assert "{}" not in r.subject and r.subject in r.prompt
        for family in ("rephrase_prompts", "neighborhood_prompts", "attribute_prompts", "generation_prompts"):
            for p in getattr(r, family):
                _text(p, family, line=False)
        for probe in (*r.locality, *r.portability):
            _text(probe.prompt, "probe.prompt", line=False)
            _text(probe.target, "probe.target")
            for alias in probe.aliases:
                _text(alias, "probe.aliases")


def check_known(records: list[KnownRecord], path: Path, size: int) -> None:
    assert records and len({r.known_id for r in records}) == len(records)
    for r in records:
        assert isinstance(r.known_id, int) and not isinstance(r.known_id, bool) and 0 <= r.index < size
        for name in ("subject", "attribute", "relation_id"):
            _text(getattr(r, name), name)
        _text(r.template, "template", line=False)
        _text(r.prompt, "prompt", line=False)
        assert r.subject in r.prompt and "{}" not in r.subject
        assert isinstance(r.prediction, str) and "\x00" not in r.prediction
        r.prediction.encode("utf-8")


def check_choices(items: list[ChoiceItem], size: int) -> None:
    assert items
    for it in items:
        assert it.label in (0, 1) and 0 <= it.index < size and len(it.choices) == 2
        _text(it.context, "goal", line=False)
        for choice in it.choices:
            assert isinstance(choice, str) and choice.strip() and choice == choice.rstrip()
            choice.encode("utf-8")
            assert not _PROMPT_BAD.search(choice)


# --------------------------------------------------------------------------------------------
# The fuzz test
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schema", list(SCHEMAS))
@FUZZ
@given(data=st.data())
def test_mutated_records_load_or_raise_record_error(tmp_path: Path, schema: str, data: st.DataObject) -> None:
    loader, valid = SCHEMAS[schema]
    payload = copy.deepcopy(valid)
    for _ in range(data.draw(st.sampled_from([1, 1, 1, 2, 3]), label="mutations")):
        payload = mutate(data, payload)
    jsonl = schema == "piqa"
    path = tmp_path / (f"{schema}.jsonl" if jsonl else f"{schema}.json")
    path.write_bytes(serialise(data, payload, jsonl))
    window: dict[str, Any] = {}
    if data.draw(st.booleans(), label="window"):
        window = {"offset": data.draw(st.integers(0, len(payload)), label="offset"),
                  "limit": data.draw(st.none() | st.integers(1, 3), label="limit")}
    if jsonl:
        good = ["01"[i % 2] for i in range(len(payload))]
        labels = data.draw(st.sampled_from([good] * 4 + [good[:-1], good + ["1"]])
                           | st.lists(st.sampled_from(["0", "1", "2", "", "x", "\x00", "0\u2028", " 1\r"]),
                                      min_size=len(payload), max_size=len(payload)), label="labels")
        (tmp_path / f"{schema}-labels.lst").write_bytes("".join(f"{x}\n" for x in labels).encode("utf-8"))
    try:
        loaded = loader(path, **window)
    except RecordError as err:
        assert path.name in str(err) or "labels" in str(err), err
        event("outcome", "RecordError")
        return
    except SettingError as err:  # only for an offset past the end of a (valid) file
        assert err.key == "offset" and window, err
        event("outcome", "offset past the end")
        return
    event("outcome", "loaded")
    size = len(payload)
    if schema == "known":
        check_known(loaded, path, size)
    elif schema == "piqa":
        check_choices(loaded, size)
    else:
        check_edit_records(loaded, path, size, template=schema in ("counterfact_rome", "mquake"))
