"""Tests for the dataset loaders (own schema-true fixtures) and the release downloader."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path
from collections.abc import Callable
from typing import Any

import pytest

from editlab.data import download, loaders
from editlab.data.loaders import (
    load_counterfact_easyedit,
    load_counterfact_rome,
    load_knowedit,
    load_wikibio,
    load_zsre_mend,
    resolve_data_dir,
)
from editlab.data.records import EditRecord, Probe, RecordError
from editlab.errors import SettingError

Loader = Callable[..., list[EditRecord]]


# --------------------------------------------------------------------------------------------
# Fixture writers: small records in each source schema, invented for the tests
# --------------------------------------------------------------------------------------------

def write_json(path: Path, payload: Any) -> Path:
    path.write_text(json.dumps(payload), encoding="utf-8")
    return path


def rome_record(case_id: int = 7, **variants: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "case_id": case_id,
        "pararel_idx": 100 + case_id,
        "requested_rewrite": {
            "prompt": "The capital of {} is",
            "relation_id": "P36",
            "target_new": {"str": " Lyon", "id": "Q456"},  # leading space: real-data quirk
            "target_true": {"str": "Paris ", "id": "Q90"},
            "subject": "Freedonia",
        },
        "paraphrase_prompts": ["Some text. Freedonia has its capital at", "Freedonia's capital city is"],
        "neighborhood_prompts": ["The capital of Sylvania is", "Marsovia's capital is"],
        "attribute_prompts": ["Grand Fenwick's capital is"],
        "generation_prompts": ["Freedonia is known for", "People in Freedonia"],
    }
    record.update(variants)
    return record


def easyedit_record(case_id: int, loc_truth: str) -> dict[str, Any]:
    return {
        "case_id": case_id, "prompt": "Ada Quill plays the", "target_new": "violin", "subject": "Ada Quill",
        "ground_truth": "piano", "rephrase_prompt": "Ada Quill is a virtuoso on the",
        "locality_prompt": "Ben Stroke plays the", "locality_ground_truth": loc_truth,
    }


def zsre_record(**variants: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "subject": "Zeta Fornacis", "src": "Which constellation is Zeta Fornacis in?", "pred": "Fornax",
        "rephrase": "In which constellation is Zeta Fornacis?", "alt": "Lyra",
        "answers": ["Fornax", "Fornax constellation"],
        "loc": "nq question: who wrote the song of the rolling river", "loc_ans": "Jane Doe",
        "cond": "Fornax >> Lyra || Which constellation is Zeta Fornacis in?",
    }
    record.update(variants)
    return record


def knowedit_records() -> list[dict[str, Any]]:
    return [
        {   # KnowEdit-ZsRE style: list ground truths, rephrase, probes with list answers
            "subject": "Mila Borg", "target_new": "alto", "prompt": "What voice type is Mila Borg?",
            "ground_truth": ["soprano", "coloratura"], "rephrase_prompt": "Mila Borg sings as which voice?",
            "cond": "soprano >> alto || What voice type is Mila Borg?",
            "locality": {"Relation_Specificity": [
                {"prompt": "The citizenship of Mila Borg is", "ground_truth": ["Norway"]}]},
            "portability": {"Reasoning": [{"prompt": "The range of Mila Borg as an alto is",
                                           "ground_truth": " F3 to D5"}]},
        },
        {   # WikiData_counterfact style: string ground truths, two groups each
            "subject": "Port Elm", "prompt": "Port Elm is located in the country of", "target_new": "Chile",
            "ground_truth": "Peru",
            "portability": {"Subject_Aliasing": [{"prompt": "Elm Harbour is located in the country of",
                                                  "ground_truth": "Chile"}],
                            "Logical_Generalization": [{"prompt": "Chile contains",
                                                        "ground_truth": "Port Elm"}]},
            "locality": {"Relation_Specificity": [{"prompt": "Port Elm was founded by",
                                                   "ground_truth": "Ana Ruiz"}],
                         "Forgetfulness": [{"prompt": "Port Elm, not in Chile, is in",
                                            "ground_truth": "Peru"}]},
        },
        {   # WikiData_recent style: no ground_truth, alias lists (one answer with aliases, two answers)
            "subject": "Tomas Vey", "prompt": "The team Tomas Vey plays for is", "target_new": "Red Owls",
            "portability": {},
            "locality": {"Relation_Specificity": [
                {"prompt": "The country of Tomas Vey is",
                 "ground_truth": [["Soviet Union", "USSR", "Soviet Union"]]},
                {"prompt": "The siblings of Tomas Vey are",
                 "ground_truth": [["Ina Vey"], ["Oskar Vey", "O. Vey"]]}]},
        },
    ]


def wikibio_records() -> list[dict[str, Any]]:
    return [
        {"text": "This is a Wikipedia passage about ada quill. Ada Quill (born 1901) was a composer. ",
         "labels": "She studied in Vienna.", "concept": "ada quill",
         "locality": {"Relation_Specificity": [{"prompt": "The occupation of ada quill is",
                                                "ground_truth": ["composer"]}]}},
        {"text": "This is a Wikipedia passage about ben stroke. Ben Stroke was a rower.",
         "labels": "He won two medals.", "concept": "ben stroke", "locality": {}},
    ]


# --------------------------------------------------------------------------------------------
# Field mapping
# --------------------------------------------------------------------------------------------

def test_counterfact_rome_maps_fields(tmp_path: Path) -> None:
    portability = {"Recalled Relation": "(Lyon, river, Rhone)", "New Question": "Which river flows through "
                   "the capital of Freedonia?", "New Answer": "Rhone"}
    distracting = ["The capital of Freedonia is Lyon. The capital of Sylvania is",
                   "The capital of Freedonia is Lyon. Marsovia's capital is"]
    path = write_json(tmp_path / "cf.json", [
        rome_record(7, portability=portability),
        rome_record(8, alternative_subject="Free Land"),
        rome_record(9, distracting_neighborhood_prompts=distracting,
                    unrelated_relation={"relation_id": "P31", "object": "country", "question": "Q?"}),
    ])
    first, second, third = load_counterfact_rome(path)

    assert first.record_id == 7 and first.source == str(path) and first.index == 0
    assert first.prompt == "The capital of Freedonia is"
    assert first.subject == "Freedonia"
    assert (first.target_new, first.target_true) == ("Lyon", "Paris")
    assert first.rephrase_prompts == ("Some text. Freedonia has its capital at",
                                      "Freedonia's capital city is")
    assert first.neighborhood_prompts == ("The capital of Sylvania is", "Marsovia's capital is")
    assert first.attribute_prompts == ("Grand Fenwick's capital is",)
    assert first.generation_prompts == ("Freedonia is known for", "People in Freedonia")
    assert first.locality == (Probe("The capital of Sylvania is", "Paris", "neighborhood"),
                              Probe("Marsovia's capital is", "Paris", "neighborhood"))
    assert first.portability == (Probe(portability["New Question"], "Rhone", "one_hop"),)
    assert first.extra["relation_id"] == "P36" and first.extra["pararel_idx"] == 107
    assert first.extra["target_new_id"] == "Q456" and first.extra["target_true_id"] == "Q90"
    assert first.extra["recalled_relation"] == "(Lyon, river, Rhone)"
    assert first.extra["prompt_template"] == "The capital of {} is"

    assert second.portability == (Probe("The capital of Free Land is", "Lyon", "subject_aliasing"),)
    assert second.extra["alternative_subject"] == "Free Land"

    assert [p.group for p in third.locality] == ["neighborhood"] * 2 + ["distracting_neighborhood"] * 2
    assert third.locality[2:] == tuple(Probe(p, "Paris", "distracting_neighborhood") for p in distracting)
    assert third.extra["unrelated_relation"]["object"] == "country"  # unmapped fields kept in extra


def test_counterfact_easyedit_maps_fields(tmp_path: Path) -> None:
    path = write_json(tmp_path / "cf-train.json", [easyedit_record(2, "piano"), easyedit_record(3, "cello")])
    same, other = load_counterfact_easyedit(path)
    assert same.record_id == 2 and same.prompt == "Ada Quill plays the" and same.subject == "Ada Quill"
    assert (same.target_new, same.target_true) == ("violin", "piano")
    assert same.rephrase_prompts == ("Ada Quill is a virtuoso on the",)
    assert same.locality == (Probe("Ben Stroke plays the", "piano", "neighborhood"),)
    assert same.neighborhood_prompts == ("Ben Stroke plays the",)  # neighbour shares target_true
    assert other.locality == (Probe("Ben Stroke plays the", "cello", "neighborhood"),)
    assert other.neighborhood_prompts == ()
    assert same.extra["subject_in_prompt"] is True


def test_zsre_mend_maps_fields(tmp_path: Path) -> None:
    port = {"Recalled Relation": "(Lyra, contains, Vega)", "New Question": "Which bright star shares "
            "a constellation with Zeta Fornacis?", "New Answer": "Vega"}
    path = write_json(tmp_path / "zsre.json", [
        zsre_record(portability=port),
        zsre_record(alternative_subject="ZF", alter_subject_question=" Which constellation is ZF in?"),
        zsre_record(**{"inverse question": "Which star in Lyra is this?"}),
        zsre_record(subject="Zeta Phoenicis", alt=" Vela "),
    ])
    recs = load_zsre_mend(path)
    first = recs[0]
    assert first.record_id == 0 and first.index == 0
    assert first.prompt == "Which constellation is Zeta Fornacis in?"
    assert (first.target_new, first.target_true) == ("Lyra", "Fornax")
    assert first.extra["answers"] == ("Fornax", "Fornax constellation")
    assert first.rephrase_prompts == ("In which constellation is Zeta Fornacis?",)
    # The "nq question: " prefix is kept, as EasyEdit's ZsreDataset does.
    nq = "nq question: who wrote the song of the rolling river"
    assert first.locality == (Probe(nq, "Jane Doe", "nq"),)
    assert first.portability == (Probe(port["New Question"], "Vega", "one_hop"),)
    assert first.extra["pred"] == "Fornax" and first.extra["cond"].startswith("Fornax >> Lyra")
    assert first.extra["recalled_relation"] == "(Lyra, contains, Vega)"
    assert recs[1].portability == (Probe("Which constellation is ZF in?", "Lyra", "subject_aliasing"),)
    assert recs[1].extra["alternative_subject"] == "ZF"
    assert recs[2].portability == (Probe("Which star in Lyra is this?", "Zeta Fornacis", "inverse_relation"),)
    assert all(r.extra["subject_in_prompt"] for r in recs[:3])
    assert recs[3].extra["subject_in_prompt"] is False and recs[3].target_new == "Vela"
    assert recs[3].record_id == 3


def test_zsre_mend_without_loc_and_empty_alt_skipped(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    no_loc = zsre_record()
    del no_loc["loc"], no_loc["loc_ans"]
    path = write_json(tmp_path / "zsre.json", [zsre_record(alt=""), no_loc])
    with caplog.at_level(logging.WARNING, logger="editlab.data.loaders"):
        recs = load_zsre_mend(path)
    assert len(recs) == 1 and recs[0].index == 1 and recs[0].record_id == 1
    assert recs[0].locality == ()
    assert "empty 'alt'" in caplog.text and "indices 0" in caplog.text


def test_knowedit_maps_fields(tmp_path: Path) -> None:
    path = write_json(tmp_path / "knowedit.json", knowedit_records())
    zsre, wiki_cf, recent = load_knowedit(path)

    assert zsre.record_id == 0 and zsre.prompt == "What voice type is Mila Borg?"
    assert (zsre.target_new, zsre.target_true) == ("alto", "soprano")
    assert zsre.extra["answers"] == ("soprano", "coloratura") and zsre.extra["cond"].startswith("soprano")
    assert zsre.rephrase_prompts == ("Mila Borg sings as which voice?",)
    assert zsre.locality == (Probe("The citizenship of Mila Borg is", "Norway", "Relation_Specificity"),)
    assert zsre.portability == (Probe("The range of Mila Borg as an alto is", "F3 to D5", "Reasoning"),)

    assert wiki_cf.target_true == "Peru" and wiki_cf.rephrase_prompts == ()
    assert {p.group for p in wiki_cf.portability} == {"Subject_Aliasing", "Logical_Generalization"}
    assert {p.group for p in wiki_cf.locality} == {"Relation_Specificity", "Forgetfulness"}
    alias = Probe("Elm Harbour is located in the country of", "Chile", "Subject_Aliasing")
    assert alias in wiki_cf.portability

    assert recent.target_true is None and not recent.has_true_target and recent.portability == ()
    country, siblings = recent.locality
    assert country == Probe("The country of Tomas Vey is", "Soviet Union", "Relation_Specificity", ("USSR",))
    assert siblings.target == "Ina Vey" and siblings.aliases == ("Oskar Vey", "O. Vey")


def test_knowedit_empty_ground_truth_is_no_true_target(tmp_path: Path) -> None:
    record = knowedit_records()[1]
    record["ground_truth"] = ""
    (rec,) = load_knowedit(write_json(tmp_path / "k.json", [record]))
    assert rec.target_true is None


def test_wikibio_maps_fields(tmp_path: Path) -> None:
    path = write_json(tmp_path / "wikibio.json", wikibio_records())
    first, second = load_wikibio(path)
    assert first.prompt.startswith("This is a Wikipedia passage about ada quill.")
    assert not first.prompt.endswith(" ")
    assert (first.subject, first.target_new) == ("ada quill", "She studied in Vienna.")
    assert first.target_true is None
    assert first.locality == (Probe("The occupation of ada quill is", "composer", "Relation_Specificity"),)
    assert second.locality == () and second.extra["subject_in_prompt"] is True


# --------------------------------------------------------------------------------------------
# Malformed input
# --------------------------------------------------------------------------------------------

MALFORMED = [
    # (loader, good record, dotted field, bad value (... = missing), expected field in the message)
    (load_counterfact_rome, rome_record(), "requested_rewrite.target_new.str", ...,
     "requested_rewrite.target_new.str"),
    (load_counterfact_rome, rome_record(), "requested_rewrite.target_true.str", 5,
     "requested_rewrite.target_true.str"),
    (load_counterfact_rome, rome_record(), "requested_rewrite.subject", "  ", "requested_rewrite.subject"),
    (load_counterfact_rome, rome_record(), "requested_rewrite.prompt", "The capital of Freedonia is",
     "requested_rewrite.prompt"),
    (load_counterfact_rome, rome_record(), "paraphrase_prompts", "not a list", "paraphrase_prompts"),
    (load_counterfact_rome, rome_record(), "neighborhood_prompts", ["ok", ""], "neighborhood_prompts[1]"),
    (load_counterfact_rome, rome_record(portability={"New Question": "q?", "New Answer": "a"}),
     "portability.New Answer", ..., "portability.New Answer"),
    (load_counterfact_rome, rome_record(), "case_id", [1], "case_id"),
    (load_counterfact_easyedit, easyedit_record(1, "piano"), "ground_truth", ..., "ground_truth"),
    (load_counterfact_easyedit, easyedit_record(1, "piano"), "rephrase_prompt", ["a"], "rephrase_prompt"),
    (load_zsre_mend, zsre_record(), "src", "", "src"),
    (load_zsre_mend, zsre_record(), "answers", [], "answers"),
    (load_zsre_mend, zsre_record(), "answers", "Fornax", "answers"),
    (load_zsre_mend, zsre_record(), "alt", None, "alt"),
    (load_zsre_mend, zsre_record(), "loc_ans", ..., "loc_ans"),
    (load_knowedit, knowedit_records()[0], "target_new", ..., "target_new"),
    (load_knowedit, knowedit_records()[0], "locality.Relation_Specificity", {"prompt": "p"},
     "locality.Relation_Specificity"),
    (load_knowedit, knowedit_records()[2], "locality.Relation_Specificity.1.ground_truth", [[]],
     "locality.Relation_Specificity[1].ground_truth[0]"),
    (load_knowedit, knowedit_records()[1], "portability.Subject_Aliasing.0.prompt", "",
     "portability.Subject_Aliasing[0].prompt"),
    (load_wikibio, wikibio_records()[0], "labels", 3, "labels"),
]


def _set_path(record: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``record`` with the dotted field (numeric parts index lists) set to ``value``;
    ``...`` deletes it."""
    out = copy.deepcopy(record)
    *parents, last = dotted.split(".")
    node: Any = out
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if isinstance(node, list):
        node[int(last)] = value
    elif value is ...:
        del node[last]
    else:
        node[last] = value
    return out


@pytest.mark.parametrize("loader, good, dotted, value, field", MALFORMED,
                         ids=[f"{m[0].__name__}-{m[4]}" for m in MALFORMED])
def test_malformed_record_names_file_index_and_field(tmp_path: Path, loader: Loader, good: dict[str, Any],
                                                     dotted: str, value: Any, field: str) -> None:
    path = write_json(tmp_path / "broken_file.json", [good, _set_path(good, dotted, value)])
    with pytest.raises(RecordError) as info:
        loader(path)
    message = str(info.value)
    assert "broken_file.json" in message and "record 1" in message and f"'{field}'" in message
    assert info.value.index == 1 and info.value.field == field and info.value.source == str(path)
    assert len(loader(path, limit=1)) == 1  # only the selected records are validated


@pytest.mark.parametrize("content, field, expect", [
    ("{not json", "<file>", "invalid JSON"),
    ('{"a": 1}', "<file>", "JSON list"),
    ("[1]", "<record>", "record 0"),
])
def test_bad_file_names_the_file(tmp_path: Path, content: str, field: str, expect: str) -> None:
    path = tmp_path / "bad_file.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(RecordError) as info:
        load_zsre_mend(path)
    assert "bad_file.json" in str(info.value) and expect in str(info.value) and info.value.field == field


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_knowedit(tmp_path / "nope.json")


# --------------------------------------------------------------------------------------------
# limit / offset, relative paths
# --------------------------------------------------------------------------------------------

def test_limit_and_offset(tmp_path: Path) -> None:
    path = write_json(tmp_path / "cf.json", [easyedit_record(i, "piano") for i in range(5)])
    assert [r.record_id for r in load_counterfact_easyedit(path, limit=2)] == [0, 1]
    assert [r.record_id for r in load_counterfact_easyedit(path, limit=2, offset=3)] == [3, 4]
    assert [r.index for r in load_counterfact_easyedit(path, offset=4)] == [4]
    assert load_counterfact_easyedit(path, limit=0) == []
    with pytest.raises(SettingError, match=r"^offset must be below 5, the number of records in .*cf\.json, got 10$"):
        load_counterfact_easyedit(path, offset=10)
    with pytest.raises(ValueError, match="offset"):
        load_counterfact_easyedit(path, offset=-1)
    with pytest.raises(ValueError, match="limit"):
        load_counterfact_easyedit(path, limit=-1)


def test_relative_path_resolves_against_data_dir(tmp_path: Path) -> None:
    (tmp_path / "kb").mkdir()
    write_json(tmp_path / "kb" / "wikibio.json", wikibio_records())
    recs = load_wikibio("kb/wikibio.json", data_dir=tmp_path)
    assert len(recs) == 2 and recs[0].source == str((tmp_path / "kb" / "wikibio.json").resolve())


# --------------------------------------------------------------------------------------------
# resolve_data_dir
# --------------------------------------------------------------------------------------------

def test_resolve_data_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arg_dir, env_dir, repo = tmp_path / "arg", tmp_path / "env", tmp_path / "work" / "repo"
    shared = tmp_path / "work" / "shared" / "data"
    for d in (arg_dir, env_dir, repo, shared):
        d.mkdir(parents=True)
    monkeypatch.setattr(loaders, "_REPO_ROOT", repo)
    monkeypatch.setenv("EDITLAB_DATA_DIR", str(env_dir))
    assert resolve_data_dir(arg_dir) == arg_dir.resolve()
    assert resolve_data_dir(str(arg_dir)) == arg_dir.resolve()
    assert resolve_data_dir() == env_dir.resolve()
    monkeypatch.delenv("EDITLAB_DATA_DIR")
    assert resolve_data_dir() == shared.resolve()
    shared.rmdir()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    assert resolve_data_dir() == (tmp_path / "data").resolve()


def test_resolve_data_dir_beside_editlab_root_or_cwd(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed wheel has no clone around it: ../shared/data beside $EDITLAB_ROOT, then the cwd."""
    site = tmp_path / "venv" / "site-packages"  # where a wheel puts editlab: no shared/ beside it
    project, other = tmp_path / "lab" / "project", tmp_path / "other" / "project"
    for d in (site, project / ".." / "shared" / "data", other / ".." / "shared" / "data"):
        d.mkdir(parents=True)
    monkeypatch.setattr(loaders, "_REPO_ROOT", site)
    monkeypatch.delenv("EDITLAB_DATA_DIR", raising=False)
    monkeypatch.delenv("EDITLAB_ROOT", raising=False)
    monkeypatch.chdir(project)
    assert resolve_data_dir() == (tmp_path / "lab" / "shared" / "data").resolve()
    monkeypatch.setenv("EDITLAB_ROOT", str(other))
    assert resolve_data_dir() == (tmp_path / "other" / "shared" / "data").resolve()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EDITLAB_ROOT")
    with pytest.raises(FileNotFoundError, match="none of"):
        resolve_data_dir()


def test_resolve_data_dir_missing_names_download_command(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "absent"
    with pytest.raises(FileNotFoundError) as info:
        resolve_data_dir(missing)
    assert str(missing) in str(info.value)
    assert "python -m editlab.data.download --data-dir" in str(info.value)
    monkeypatch.setenv("EDITLAB_DATA_DIR", str(missing))
    with pytest.raises(FileNotFoundError, match="EDITLAB_DATA_DIR"):
        resolve_data_dir()


# --------------------------------------------------------------------------------------------
# download: verification without the network (file:// URLs)
# --------------------------------------------------------------------------------------------

def _release(tmp_path: Path, payload: bytes, **overrides: Any) -> download.Release:
    src = tmp_path / "upstream.json"
    src.write_bytes(payload)
    fields = {"name": "demo", "url": src.as_uri(), "dest": "sub/demo.json", "size": len(payload),
              "sha256": hashlib.sha256(payload).hexdigest()}
    fields.update(overrides)
    return download.Release(**fields)


def test_download_verifies_and_renames(tmp_path: Path) -> None:
    release = _release(tmp_path, b'[{"a": 1}]')
    out = tmp_path / "out"
    dest = download.fetch(release, out)
    assert dest == out / "sub" / "demo.json" and dest.read_bytes() == b'[{"a": 1}]'
    assert sorted(p.name for p in dest.parent.iterdir()) == ["demo.json"]
    assert download.fetch(release, out) == dest  # present and verified: kept


@pytest.mark.parametrize("override", [{"sha256": "0" * 64}, {"size": 3}])
def test_download_mismatch_raises_and_leaves_nothing(tmp_path: Path, override: dict[str, Any]) -> None:
    release = _release(tmp_path, b"payload", **override)
    out = tmp_path / "out"
    with pytest.raises(download.DownloadError):
        download.fetch(release, out)
    assert list((out / "sub").iterdir()) == []


def test_download_cli(tmp_path: Path) -> None:
    good = _release(tmp_path, b"[]")
    bad = download.Release("broken", good.url, "broken.json", sha256="f" * 64)
    out = tmp_path / "out"
    assert download.main(["--data-dir", str(out), "--only", "demo"], releases=(good, bad)) == 0
    assert (out / "sub" / "demo.json").exists() and not (out / "broken.json").exists()
    assert download.main(["--data-dir", str(out)], releases=(good, bad)) == 1
    with pytest.raises(SystemExit):
        download.main(["--data-dir", str(out), "--only", "unknown"], releases=(good, bad))


def test_download_table_is_well_formed() -> None:
    names = [r.name for r in download.RELEASES]
    assert len(names) == len(set(names)) and "counterfact" in names
    counterfact = next(r for r in download.RELEASES if r.name == "counterfact")
    assert counterfact.size == 45_108_470 and counterfact.url.startswith("https://rome.baulab.info/")
    assert all(not Path(r.dest).is_absolute() for r in download.RELEASES)


# --------------------------------------------------------------------------------------------
# Real data share (skipped when absent)
# --------------------------------------------------------------------------------------------

# (file, loader, records in the README, records the loader keeps)
REAL_FILES = [
    ("counterfact/counterfact-train.json", load_counterfact_easyedit, 10_000, 10_000),
    ("counterfact/counterfact-val.json", load_counterfact_easyedit, 1_919, 1_919),
    ("counterfact/counterfact_portability_gpt4.json", load_counterfact_rome, 530, 530),
    ("counterfact/counterfact_subject_replace.json", load_counterfact_rome, 104, 104),
    ("counterfact/counterfact_distracting_neighbor.json", load_counterfact_rome, 422, 422),
    # two records have an empty 'alt' (no edit); they are skipped as EasyEdit does
    ("zsre/zsre_mend_train-1k.json", load_zsre_mend, 1_000, 998),
    ("zsre/zsre_mend_eval_portability_gpt4.json", load_zsre_mend, 489, 489),
    ("zsre/zsre_subject_replace.json", load_zsre_mend, 138, 138),
    ("zsre/zsre_inverse_relation.json", load_zsre_mend, 187, 187),
    ("knowedit/ZsRE-test-all.json", load_knowedit, 614, 614),
    ("knowedit/wiki_counterfact-train_cf.json", load_knowedit, 1_427, 1_427),
    ("knowedit/wiki_recent-recent_train.json", load_knowedit, 570, 570),
    ("knowedit/wikibio-train-all.json", load_wikibio, 464, 464),
    ("knowedit/wikibio-test-all.json", load_wikibio, 306, 306),
]


def _real_file(relative: str) -> Path:
    try:
        data_dir = resolve_data_dir()
    except FileNotFoundError:
        pytest.skip("data share not available")
    path = data_dir / relative
    if not path.is_file():
        pytest.skip(f"{relative} not in the data share")
    return path


@pytest.mark.data
@pytest.mark.parametrize("relative, loader, in_readme, kept", REAL_FILES, ids=[f[0] for f in REAL_FILES])
def test_real_file_loads_completely(relative: str, loader: Loader, in_readme: int, kept: int) -> None:
    path = _real_file(relative)
    with path.open(encoding="utf-8") as handle:
        assert len(json.load(handle)) == in_readme
    records = loader(relative)
    assert len(records) == kept
    assert all(r.source == str(path) for r in records)
    assert [r.index for r in records] == sorted({r.index for r in records})
    for r in records:
        assert r.prompt == r.prompt.strip() and r.target_new == r.target_new.strip()
        assert r.target_true is None or r.target_true == r.target_true.strip()


@pytest.mark.data
def test_real_data_quirks() -> None:
    inverse = load_zsre_mend(_real_file("zsre/zsre_inverse_relation.json"))
    assert sum(not r.extra["subject_in_prompt"] for r in inverse) == 1
    distracting = load_counterfact_rome(_real_file("counterfact/counterfact_distracting_neighbor.json"))
    assert all(sum(p.group == "distracting_neighborhood" for p in r.locality) == len(r.neighborhood_prompts)
               for r in distracting)
    recent = load_knowedit(_real_file("knowedit/wiki_recent-recent_train.json"))
    assert all(r.target_true is None for r in recent)
    assert any(p.aliases for r in recent for p in r.locality)


# ------------------------------------------------------------------ PIQA (general ability)
def _piqa(tmp_path, lines, labels):
    data = tmp_path / "piqa_valid.jsonl"
    data.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    (tmp_path / "piqa_valid-labels.lst").write_text("".join(f"{x}\n" for x in labels), encoding="utf-8")
    return data


def test_load_piqa_reads_items_and_labels(tmp_path):
    from editlab.data.loaders import ChoiceItem, load_piqa

    good = json.dumps({"goal": " Open a jar ", "sol1": "twist the lid ", "sol2": "hit it"})
    data = _piqa(tmp_path, [good, good, good], [1, 0, 1])
    assert load_piqa(data, limit=2, offset=1) == [
        ChoiceItem("Open a jar", ("twist the lid", "hit it"), 0, 1),
        ChoiceItem("Open a jar", ("twist the lid", "hit it"), 1, 2),
    ]
    assert len(load_piqa("piqa_valid.jsonl", data_dir=tmp_path)) == 3


@pytest.mark.parametrize("line,label,where,field", [
    ('{"goal": "g", "sol1": "a"}', "0", "piqa_valid.jsonl, record 1", "sol2"),
    ('{"goal": "g", "sol1": "  ", "sol2": "b"}', "0", "piqa_valid.jsonl, record 1", "sol1"),
    ('{"goal": 3, "sol1": "a", "sol2": "b"}', "0", "piqa_valid.jsonl, record 1", "goal"),
    ("not json", "0", "piqa_valid.jsonl, record 1", "<record>"),
    ('{"goal": "g", "sol1": "a", "sol2": "b"}', "2", "piqa_valid-labels.lst, record 1", "label"),
])
def test_load_piqa_names_file_index_and_field(tmp_path, line, label, where, field):
    from editlab.data.loaders import load_piqa

    good = json.dumps({"goal": "g", "sol1": "a", "sol2": "b"})
    data = _piqa(tmp_path, [good, line], ["0", label])
    with pytest.raises(RecordError) as err:
        load_piqa(data)
    assert where in str(err.value) and f"field '{field}'" in str(err.value)
    assert err.value.index == 1 and err.value.field == field


def test_load_piqa_label_count_and_missing_files(tmp_path):
    from editlab.data.loaders import load_piqa

    good = json.dumps({"goal": "g", "sol1": "a", "sol2": "b"})
    data = _piqa(tmp_path, [good, good], [0])
    with pytest.raises(RecordError, match="1 labels for the 2 items"):
        load_piqa(data)
    (tmp_path / "piqa_valid-labels.lst").unlink()
    with pytest.raises(FileNotFoundError, match="labels file"):
        load_piqa(data)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_piqa(tmp_path / "missing.jsonl")


@pytest.mark.data
def test_load_piqa_shared_release():
    from editlab.data.loaders import load_piqa, resolve_data_dir

    try:
        folder = resolve_data_dir()
    except FileNotFoundError:
        pytest.skip("no data directory")
    if not (folder / "locality" / "piqa_valid.jsonl").is_file():
        pytest.skip("PIQA not in the data directory")
    items = load_piqa("locality/piqa_valid.jsonl")
    assert len(items) == 1838 and {it.label for it in items} == {0, 1}


# --------------------------------------------------------------------------------------------
# MQuAKE
# --------------------------------------------------------------------------------------------

def _mquake_case(case_id: int = 7) -> dict[str, Any]:
    def rw(prompt: str, subject: str, new: str, true: str, question: str) -> dict[str, Any]:
        return {"prompt": prompt, "relation_id": "P1", "subject": subject, "question": question,
                "target_new": {"str": new, "id": "Q1"}, "target_true": {"str": true, "id": "Q2"}}
    return {
        "case_id": case_id,
        "requested_rewrite": [rw("{} was performed by", "Hey Jude", "Madonna", "The Beatles", "Who performed Hey Jude?"),
                              rw("{} is a citizen of", "Madonna", "Australia", "USA", "Madonna is a citizen of?")],
        "questions": ["Which country is the performer of Hey Jude a citizen of?", "Hey Jude's performer is from?"],
        "answer": "United Kingdom", "answer_alias": ["UK"],
        "new_answer": "Australia", "new_answer_alias": ["Commonwealth of Australia", "AU"],
        "single_hops": [], "new_single_hops": [],
    }


def test_mquake_case_becomes_ordered_records_with_multi_hop_on_the_last(tmp_path: Path) -> None:
    path = write_json(tmp_path / "mq.json", [_mquake_case(7), _mquake_case(8)])
    recs = loaders.load_mquake(path, limit=1)
    assert [r.record_id for r in recs] == ["7:0", "7:1"]
    first, last = recs
    assert first.prompt == "Hey Jude was performed by" and first.subject == "Hey Jude"
    assert first.target_new == "Madonna" and first.target_true == "The Beatles"
    assert first.rephrase_prompts == ("Who performed Hey Jude?",) and first.portability == ()
    assert [p.prompt for p in last.portability] == _mquake_case()["questions"]
    assert {(p.target, p.aliases, p.group) for p in last.portability} == {
        ("Australia", ("Commonwealth of Australia", "AU"), "multi_hop")}
    assert last.extra["case_id"] == 7 and last.extra["case_size"] == 2 and last.extra["case_position"] == 1
    assert [r.record_id for r in loaders.load_mquake(path, offset=1)] == ["8:0", "8:1"]


def test_mquake_bad_rewrite_names_the_field(tmp_path: Path) -> None:
    case = _mquake_case()
    case["requested_rewrite"][1]["prompt"] = "no placeholder"
    path = write_json(tmp_path / "mq.json", [case])
    with pytest.raises(RecordError, match=r"record 0, field 'requested_rewrite\[1\]\.prompt'"):
        loaders.load_mquake(path)


def test_split_case_is_refused() -> None:
    from editlab.data.records import check_complete_cases
    recs = [EditRecord(f"1:{j}", f"P{j} is", "P", "x", extra={"case_id": 1, "case_size": 2}) for j in range(2)]
    check_complete_cases(recs)
    with pytest.raises(RecordError, match="1 of case 1's 2 edits"):
        check_complete_cases(recs[:1])


@pytest.mark.data
def test_load_mquake_shared_release():
    try:
        folder = loaders.resolve_data_dir()
    except FileNotFoundError:
        pytest.skip("no data directory")
    if not (folder / "mquake" / "MQuAKE-hard.json").is_file():
        pytest.skip("MQuAKE not in the data directory")
    recs = loaders.load_mquake()
    assert len(recs) == 4 * 429
    assert all(len(r.portability) == 3 for r in recs[3::4]) and not any(r.portability for r in recs[0::4])


# ------------------------------------------------------------------ known_1000 (causal tracing)

def known_records() -> list[dict[str, Any]]:
    return [
        {"known_id": 7, "subject": "Victor Hugo", "attribute": "French",
         "template": "The mother tongue of {} was", "prediction": " French",
         "prompt": "The mother tongue of Victor Hugo was", "relation_id": "P103"},
        {"known_id": 9, "subject": " Toyota", "attribute": "Japan ", "template": "{} is a company from",
         "prediction": " Japan", "prompt": "Toyota is a company from", "relation_id": "P17"},
    ]


def test_load_known_reads_and_strips(tmp_path: Path) -> None:
    from editlab.data.loaders import KnownRecord, load_known

    write_json(tmp_path / "known.json", known_records())
    recs = load_known("known.json", data_dir=tmp_path)
    assert recs[1] == KnownRecord(
        known_id=9, subject="Toyota", attribute="Japan", template="{} is a company from", prediction=" Japan",
        prompt="Toyota is a company from", relation_id="P17", source=str(tmp_path / "known.json"), index=1)
    assert recs[0].prediction == " French"  # a raw continuation: not stripped
    assert [r.known_id for r in load_known("known.json", limit=1, offset=1, data_dir=tmp_path)] == [9]


@pytest.mark.parametrize("dotted, value, field, expect", [
    ("attribute", None, "attribute", "is null"),
    ("prompt", "   ", "prompt", "non-empty"),
    ("known_id", True, "known_id", "must be an integer"),
    ("known_id", "9", "known_id", "must be an integer"),
    ("prediction", 3, "prediction", "must be a string"),
    ("subject", "Honda", "subject", "does not occur in the prompt"),
])
def test_load_known_names_file_index_and_field(tmp_path: Path, dotted: str, value: Any, field: str,
                                               expect: str) -> None:
    from editlab.data.loaders import load_known

    records = known_records()
    records[1][dotted] = value
    with pytest.raises(RecordError, match=expect) as err:
        load_known(write_json(tmp_path / "bad.json", records))
    assert err.value.index == 1 and err.value.field == field and "bad.json" in str(err.value)
    del records[1][dotted]
    with pytest.raises(RecordError, match="missing") as err:
        load_known(write_json(tmp_path / "bad.json", records))
    assert err.value.field == field


@pytest.mark.data
def test_load_known_shared_release() -> None:
    from editlab.data.loaders import load_known

    records = load_known(_real_file("known_1000/known_1000.json"))
    assert len(records) == 1209 and len({r.known_id for r in records}) == len(records)
    assert all(r.subject in r.prompt for r in records)


# --------------------------------------------------------------------------------------------
# Hostile and suspicious input: each case is an error naming the record and field, or a warning
# naming the record (tests/data/test_loader_fuzz.py fuzzes the same loaders)
# --------------------------------------------------------------------------------------------

def _load_one_bad(tmp_path: Path, loader: Loader, good: dict[str, Any], dotted: str, value: Any) -> RecordError:
    """Load ``[good, good with the dotted field set to value]`` (given another ``case_id`` where
    the schema has one); return the RecordError, which must name the file and record 1."""
    bad = _set_path(good, dotted, value)
    if "case_id" in good and dotted != "case_id":
        good, bad = dict(good, case_id=1), dict(bad, case_id=2)
    path = write_json(tmp_path / "hostile.json", [good, bad])
    with pytest.raises(RecordError) as info:
        loader(path)
    assert info.value.source == str(path) and info.value.index == 1 and "hostile.json, record 1" in str(info.value)
    return info.value


# (loader, a good record, its target_new field, its target_true field)
SAME_TARGET = [
    (load_counterfact_rome, rome_record(), "requested_rewrite.target_new.str", "requested_rewrite.target_true.str"),
    (load_counterfact_easyedit, easyedit_record(1, "piano"), "target_new", "ground_truth"),
    (load_zsre_mend, zsre_record(answers=["Fornax"]), "alt", "answers.0"),
    (load_knowedit, knowedit_records()[1], "target_new", "ground_truth"),
]


@pytest.mark.parametrize("loader, good, new_field, true_field", SAME_TARGET, ids=[c[0].__name__ for c in SAME_TARGET])
def test_target_new_equal_to_target_true_is_kept_with_a_warning_naming_the_record(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, loader: Loader, good: dict[str, Any],
        new_field: str, true_field: str) -> None:
    same = _set_path(good, true_field, "Oslo")
    same = _set_path(same, new_field, " Oslo")  # equal once stripped
    if "case_id" in same:
        same["case_id"] = 99
    path = write_json(tmp_path / "same.json", [good, same])
    with caplog.at_level(logging.WARNING, logger="editlab.data.loaders"):
        records = loader(path)
    assert len(records) == 2 and records[1].target_new == records[1].target_true == "Oslo"
    warning, = [r.getMessage() for r in caplog.records if "target_true" in r.getMessage()]
    assert warning.startswith(f"{path}: 1 record(s) with target_new equal to target_true") and "(indices 1)" in warning


def test_mquake_rewrite_with_target_new_equal_to_target_true_warns_once_per_case(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    case = _mquake_case(8)
    for rewrite in case["requested_rewrite"]:
        rewrite["target_true"]["str"] = rewrite["target_new"]["str"]
    with caplog.at_level(logging.WARNING, logger="editlab.data.loaders"):
        assert len(loaders.load_mquake(write_json(tmp_path / "mq.json", [_mquake_case(7), case]))) == 4
    assert "1 record(s) with target_new equal to target_true" in caplog.text and "(indices 1)" in caplog.text


@pytest.mark.parametrize("loader, good, dotted, field", [
    (load_counterfact_rome, rome_record(), "requested_rewrite.target_new.str", "requested_rewrite.target_new.str"),
    (load_counterfact_easyedit, easyedit_record(1, "piano"), "ground_truth", "ground_truth"),
    (load_zsre_mend, zsre_record(), "alt", "alt"),
    (load_knowedit, knowedit_records()[2], "locality.Relation_Specificity.1.ground_truth",
     "locality.Relation_Specificity[1].ground_truth[0][0]"),
    (load_wikibio, wikibio_records()[0], "labels", "labels"),
], ids=["rome", "easyedit", "zsre", "knowedit-probe", "wikibio"])
def test_newline_in_a_target_is_an_error(tmp_path: Path, loader: Loader, good: dict[str, Any], dotted: str,
                                         field: str) -> None:
    value = [["Inan\nVey"]] if "locality" in dotted else "Lyon\nParis"
    err = _load_one_bad(tmp_path, loader, good, dotted, value)
    assert err.field == field and "holds a line break (U+000A) at character 4: it must be a single line" in str(err)


@pytest.mark.parametrize("char, expect", [
    ("\x00", "NUL character (U+0000) at character 3"),
    ("\x1b", "control character (U+001B) at character 3"),
    ("\x85", "control character (U+0085) at character 3"),
])
@pytest.mark.parametrize("loader, good, dotted, field", [
    (load_counterfact_rome, rome_record(), "requested_rewrite.prompt", "requested_rewrite.prompt"),
    (load_counterfact_easyedit, easyedit_record(1, "piano"), "prompt", "prompt"),
    (load_zsre_mend, zsre_record(), "src", "src"),
    (load_knowedit, knowedit_records()[0], "prompt", "prompt"),
], ids=["rome", "easyedit", "zsre", "knowedit"])
def test_nul_or_control_character_in_a_prompt_is_an_error(tmp_path: Path, loader: Loader, good: dict[str, Any],
                                                          dotted: str, field: str, char: str, expect: str) -> None:
    prompt = _get_path(good, dotted)
    err = _load_one_bad(tmp_path, loader, good, dotted, prompt[:3] + char + prompt[3:])
    assert err.field == field and expect in str(err)


def _get_path(record: dict[str, Any], dotted: str) -> Any:
    node: Any = record
    for key in dotted.split("."):
        node = node[int(key)] if isinstance(node, list) else node[key]
    return node


def test_tabs_and_line_breaks_in_prompts_are_kept(tmp_path: Path) -> None:
    """The releases' paraphrases hold them (counterfact-train: 258 rephrase prompts with a newline, 4 with a tab)."""
    record = easyedit_record(1, "piano")
    record["rephrase_prompt"] = "Regrets\nXI.\tAda Quill plays the"
    (rec,) = load_counterfact_easyedit(write_json(tmp_path / "cf.json", [record]))
    assert rec.rephrase_prompts == ("Regrets\nXI.\tAda Quill plays the",)


def test_control_characters_in_subjects_and_ids_are_errors(tmp_path: Path) -> None:
    err = _load_one_bad(tmp_path, load_counterfact_easyedit, easyedit_record(1, "piano"), "subject", "Ada\tQuill")
    assert err.field == "subject" and "control character (U+0009)" in str(err)
    err = _load_one_bad(tmp_path, load_counterfact_rome, rome_record(), "case_id", "7\u2028b")
    assert err.field == "case_id" and "line break (U+2028)" in str(err)


@pytest.mark.parametrize("loader, good, dotted, field", [
    (load_counterfact_rome, rome_record(), "requested_rewrite.subject", "requested_rewrite.subject"),
    (load_counterfact_rome, rome_record(alternative_subject="Free Land"), "alternative_subject", "alternative_subject"),
    (loaders.load_mquake, _mquake_case(), "requested_rewrite.1.subject", "requested_rewrite[1].subject"),
], ids=["rome", "rome-alternative", "mquake"])
def test_subject_containing_the_template_placeholder_is_an_error(tmp_path: Path, loader: Loader,
                                                                 good: dict[str, Any], dotted: str, field: str) -> None:
    err = _load_one_bad(tmp_path, loader, good, dotted, "Free{}donia")
    assert err.field == field and "must not contain '{}', the template's placeholder for the subject" in str(err)


def test_subject_with_braces_is_legal_where_no_template_is_filled(tmp_path: Path) -> None:
    record = easyedit_record(1, "piano")
    record["subject"], record["prompt"] = "Ada {} Quill", "Ada {} Quill plays the"
    (rec,) = load_counterfact_easyedit(write_json(tmp_path / "cf.json", [record]))
    assert rec.subject == "Ada {} Quill"


def test_known_subject_containing_the_template_placeholder_is_an_error(tmp_path: Path) -> None:
    from editlab.data.loaders import load_known

    records = known_records()
    records[1]["subject"], records[1]["prompt"] = "Toy{}ota", "Toy{}ota is a company from"
    with pytest.raises(RecordError, match=r"record 1, field 'subject': must not contain '\{\}'"):
        load_known(write_json(tmp_path / "known.json", records))


@pytest.mark.parametrize("loader, records, shown", [
    (load_counterfact_rome, [rome_record(7), rome_record(8), rome_record(7)], "7"),
    (load_counterfact_easyedit, [easyedit_record(3, "piano"), easyedit_record(3, "cello")], "3"),
    (loaders.load_mquake, [_mquake_case(7), _mquake_case(7)], "7"),
], ids=["rome", "easyedit", "mquake"])
def test_duplicate_case_ids_are_an_error_naming_both_records(tmp_path: Path, loader: Loader,
                                                             records: list[dict[str, Any]], shown: str) -> None:
    path = write_json(tmp_path / "dup.json", records)
    with pytest.raises(RecordError) as info:
        loader(path)
    last = len(records) - 1
    assert info.value.index == last and info.value.field == "case_id"
    assert str(info.value) == (f"{path}, record {last}, field 'case_id': {shown} repeats the case_id of record 0: "
                               "record ids must be unique")
    assert len(loader(path, limit=last)) >= 1  # only the records read must be unique


def test_duplicate_known_ids_are_an_error(tmp_path: Path) -> None:
    from editlab.data.loaders import load_known

    records = known_records()
    records[1]["known_id"] = 7
    with pytest.raises(RecordError, match="record 1, field 'known_id': 7 repeats the known_id of record 0"):
        load_known(write_json(tmp_path / "known.json", records))


ALL_JSON_LOADERS = [load_counterfact_rome, load_counterfact_easyedit, load_zsre_mend, load_knowedit, load_wikibio,
                    loaders.load_mquake, loaders.load_known]


@pytest.mark.parametrize("loader", ALL_JSON_LOADERS, ids=lambda f: f.__name__)
def test_empty_file_is_an_error(tmp_path: Path, loader: Loader) -> None:
    path = write_json(tmp_path / "empty.json", [])
    with pytest.raises(RecordError) as info:
        loader(path)
    assert str(info.value) == f"{path}, field '<file>': no records: the file holds an empty list"


def test_empty_piqa_file_is_an_error(tmp_path: Path) -> None:
    data = _piqa(tmp_path, [], [])
    with pytest.raises(RecordError, match=r"piqa_valid\.jsonl, field '<file>': no records: the file holds no lines"):
        loaders.load_piqa(data)


def test_a_selection_whose_records_are_all_skipped_is_an_error(tmp_path: Path) -> None:
    path = write_json(tmp_path / "zsre.json", [zsre_record(), zsre_record(alt=""), zsre_record(alt=" ")])
    with pytest.raises(RecordError, match=r"no records: all 2 selected \(offset 1, limit None\) were skipped"):
        load_zsre_mend(path, offset=1)
    assert len(load_zsre_mend(path)) == 1


@pytest.mark.parametrize("loader, records", [
    (load_counterfact_rome, [rome_record(1), rome_record(2)]),
    (load_zsre_mend, [zsre_record(), zsre_record()]),
    (loaders.load_mquake, [_mquake_case(1), _mquake_case(2)]),
], ids=["rome", "zsre", "mquake"])
def test_offset_past_the_end_is_an_error_naming_offset_and_record_count(tmp_path: Path, loader: Loader,
                                                                        records: list[dict[str, Any]]) -> None:
    path = write_json(tmp_path / "two.json", records)
    assert len(loader(path, offset=1)) >= 1
    for offset in (2, 5):
        with pytest.raises(SettingError) as info:
            loader(path, offset=offset, limit=3)
        assert str(info.value) == f"offset must be below 2, the number of records in {path}, got {offset}"
        assert info.value.key == "offset"
    assert loader(path, offset=2, limit=0) == []  # nothing asked for, nothing read


def test_piqa_offset_past_the_end_is_an_error(tmp_path: Path) -> None:
    good = json.dumps({"goal": "g", "sol1": "a", "sol2": "b"})
    with pytest.raises(SettingError, match="offset must be below 2, the number of records in .*piqa_valid.jsonl, "
                                           "got 2"):
        loaders.load_piqa(_piqa(tmp_path, [good, good], [0, 1]), offset=2)


@pytest.mark.parametrize("loader, good, dotted, field", [
    (load_counterfact_rome, rome_record(), "requested_rewrite.subject", "requested_rewrite.subject"),
    (load_zsre_mend, zsre_record(), "rephrase", "rephrase"),
    (load_knowedit, knowedit_records()[0], "portability.Reasoning.0.ground_truth",
     "portability.Reasoning[0].ground_truth"),
    (load_counterfact_rome, rome_record(), "unrelated_relation", "unrelated_relation.note"),  # an unmapped field
], ids=["rome-subject", "zsre-rephrase", "knowedit-probe", "unmapped-field"])
def test_lone_surrogate_is_an_error_naming_the_record_and_field(tmp_path: Path, loader: Loader,
                                                               good: dict[str, Any], dotted: str, field: str) -> None:
    value = {"note": "\ud800x"} if dotted == "unrelated_relation" else "\ud800x"
    err = _load_one_bad(tmp_path, loader, good, dotted, value)  # json.dumps writes it as the escape \ud800
    assert err.field == field
    assert "lone surrogate (U+D800) at character 0: not Unicode text (it cannot be encoded as UTF-8)" in str(err)
    str(err).encode("utf-8")  # the message itself can be printed


def test_lone_surrogate_in_a_key_is_an_error(tmp_path: Path) -> None:
    record = knowedit_records()[0]
    record["locality"]["\udc80"] = []
    with pytest.raises(RecordError, match=r"record 0, field 'locality': has a key that holds a lone surrogate"):
        load_knowedit(write_json(tmp_path / "k.json", [record]))


def test_edit_record_refuses_text_a_tokenizer_would_fail_on() -> None:
    """Records not read by a loader (facts given on the command line) are checked too."""
    with pytest.raises(RecordError, match=r"field 'target_new': holds a lone surrogate \(U\+D800\)"):
        EditRecord(0, "The capital of X is", "X", "\ud800x")
    with pytest.raises(RecordError, match=r"field 'locality\[0\].target': holds a line break"):
        EditRecord(0, "The capital of X is", "X", "Paris", locality=(Probe("Y is", "a\nb"),))
    with pytest.raises(RecordError, match=r"field 'prompt': holds a NUL"):
        EditRecord(0, "The capital\x00 of X is", "X", "Paris")


@pytest.mark.parametrize("payload, expect", [
    (b'[{"case_id": 1, "prompt": "Ada', "invalid JSON: Unterminated string"),  # truncated
    (b'[{"prompt": "Ada \xff Quill"}]', "not UTF-8 text"),
    (b'[{"prompt": "\xed\xa0\x80"}]', "not UTF-8 text"),  # a surrogate written as raw bytes
    (b'[{"case_id": ' + b"9" * 5000 + b"}]", "invalid JSON: Exceeds the limit (4300 digits)"),
    (b"[" * 100_000 + b"]" * 100_000, "invalid JSON: nested too deeply to read"),
], ids=["truncated", "bad-utf8", "surrogate-bytes", "huge-int", "deeply-nested"])
def test_unreadable_file_is_an_error_naming_the_file(tmp_path: Path, payload: bytes, expect: str) -> None:
    path = tmp_path / "unreadable.json"
    path.write_bytes(payload)
    for loader in (load_counterfact_easyedit, load_knowedit):
        with pytest.raises(RecordError) as info:
            loader(path)
        assert info.value.field == "<file>" and info.value.index is None and str(info.value).startswith(str(path))
        assert expect in str(info.value)


def test_record_nested_too_deeply_names_the_field(tmp_path: Path) -> None:
    record = knowedit_records()[0]
    record["portability"]["Reasoning"][0]["ground_truth"] = json.loads("[" * 40 + '"x"' + "]" * 40)
    with pytest.raises(RecordError, match=r"record 0, field 'portability\.Reasoning\[0\]\.ground_truth(\[0\])*': "
                                          r"is nested more than 32 levels deep"):
        load_knowedit(write_json(tmp_path / "k.json", [record]))


# wrong types: a number for a string, a list for an object, an object for a list
WRONG_TYPES = [
    (load_counterfact_rome, rome_record(), "requested_rewrite", ["The capital of {} is"], "requested_rewrite",
     "must be an object, got list"),
    (load_counterfact_rome, rome_record(), "requested_rewrite.target_new", "Lyon", "requested_rewrite.target_new",
     "must be an object, got str"),
    (load_counterfact_rome, rome_record(), "requested_rewrite.subject", 3.5, "requested_rewrite.subject",
     "must be a string, got float 3.5"),
    (load_counterfact_rome, rome_record(), "case_id", float("nan"), "case_id", "must be an integer or a string"),
    (load_zsre_mend, zsre_record(), "portability", ["q", "a"], "portability", "must be an object, got list"),
    (load_zsre_mend, zsre_record(), "answers", {"0": "Fornax"}, "answers", "must be a list of strings, got dict"),
    (load_knowedit, knowedit_records()[0], "locality", [], "locality", "must be an object, got list"),
    (load_knowedit, knowedit_records()[0], "locality.Relation_Specificity.0", ["p", "a"],
     "locality.Relation_Specificity[0]", "must be an object"),
    (loaders.load_mquake, _mquake_case(), "requested_rewrite.0", "edit", "requested_rewrite[0]",
     "must be an object, got str"),
    (loaders.load_mquake, _mquake_case(), "requested_rewrite", {"prompt": "{} is"}, "requested_rewrite",
     "must be a non-empty list of edits"),
    (loaders.load_mquake, _mquake_case(), "new_answer", 10**30, "new_answer", "must be a string, got int"),
]


@pytest.mark.parametrize("loader, good, dotted, value, field, expect", WRONG_TYPES,
                         ids=[f"{c[0].__name__}-{c[4]}" for c in WRONG_TYPES])
def test_wrong_type_is_a_record_error_naming_the_field(tmp_path: Path, loader: Loader, good: dict[str, Any],
                                                       dotted: str, value: Any, field: str, expect: str) -> None:
    err = _load_one_bad(tmp_path, loader, good, dotted, value)
    assert err.field == field and expect in str(err)


def test_piqa_unreadable_lines_are_record_errors(tmp_path: Path) -> None:
    good = json.dumps({"goal": "g", "sol1": "a", "sol2": "b"})
    data = _piqa(tmp_path, [good, "[" * 100_000], [0, 1])
    with pytest.raises(RecordError, match=r"piqa_valid\.jsonl, record 1, field '<record>': invalid JSON: "
                                          r"nested too deeply"):
        loaders.load_piqa(data)
    data.write_bytes(good.encode() + b"\n" + b'{"goal": "\xff"}\n')
    with pytest.raises(RecordError, match=r"piqa_valid\.jsonl, field '<file>': not UTF-8 text"):
        loaders.load_piqa(data)
    data = _piqa(tmp_path, [good, json.dumps({"goal": "g\x00", "sol1": "a", "sol2": "b"})], [0, 1])
    with pytest.raises(RecordError, match=r"record 1, field 'goal': holds a NUL"):
        loaders.load_piqa(data)


def test_piqa_line_separator_inside_a_string_does_not_split_the_line(tmp_path: Path) -> None:
    line = json.dumps({"goal": "Open\u2028a jar", "sol1": "twist", "sol2": "hit"}, ensure_ascii=False)
    items = loaders.load_piqa(_piqa(tmp_path, [line, line], [0, 1]))
    assert len(items) == 2 and items[0].context == "Open\u2028a jar"
