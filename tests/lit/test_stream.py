"""Edit streams (lifelong editing): curves every K batches, scoring after the whole stream, pre-edit
scores of the unedited model, and no state shared between independent edits."""

import csv
import json
import logging
import sys
from dataclasses import fields
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger

from editlab.data.datamodule import EditDataModule
from editlab.errors import SettingError
from editlab.evaluation.scorer import ScoringSettings
from editlab.lit.callbacks import EditorCallback
from editlab.lit.curves import plot_curves
from editlab.lit.edit_eval import EditEvalModule
from editlab.methods.base import Editor
from editlab.methods.ft import FTL
from editlab.models.tiny import tiny_model

from conftest import assert_state_equal, make_records, state_copy

MODES = ["teacher_forced", "probability_comparison", "generation"]


class _Capture(Logger):
    """Keeps every ``log_metrics`` call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    @property
    def name(self):
        return "capture"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.calls.append((dict(metrics), step))


class _Recording(Editor):
    """Wraps an editor; keeps the deltas it computed and a copy of the weights it saw."""

    def __init__(self, inner):
        self.inner = inner
        self.deltas, self.seen = [], []

    def compute_deltas(self, model, tokenizer, records):
        self.seen.append(state_copy(model))
        deltas = self.inner.compute_deltas(model, tokenizer, records)
        self.deltas.append({k: v.detach().clone() for k, v in deltas.items()})
        return deltas


def _ft(steps=15):
    return FTL(layers=[1], lr=0.05, num_steps=steps, objective="teacher_forced")


SCORING_KEYS = {f.name for f in fields(ScoringSettings)}  # _run passes these to ScoringSettings


def _run(bundle, editor, tmp_path, sequential=True, eval_every=None, records=make_records, loggers=(), **kwargs):
    scoring = ScoringSettings(**{k: kwargs.pop(k) for k in SCORING_KEYS if k in kwargs})
    module = EditEvalModule(bundle, scoring, output_dir=str(tmp_path), eval_every=eval_every, **kwargs)
    cbs = [EditorCallback(editor, sequential=sequential)] if editor else []
    trainer = L.Trainer(accelerator="cpu", devices=1, inference_mode=False, logger=list(loggers) or False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=cbs)
    trainer.test(module, datamodule=EditDataModule(test=records, batch_size=kwargs.pop("batch_size", 1)),
                 verbose=False)
    rows = [json.loads(x) for x in (tmp_path / "records.jsonl").read_text().splitlines()]
    return module, rows


def _read_curves(path):
    with open(path / "curves.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_curves_at_every_k_batches_and_at_the_end(tiny, tmp_path):
    bundle = tiny("gpt2")
    before = state_copy(bundle.model)
    capture = _Capture()
    module, rows = _run(bundle, _ft(), tmp_path, eval_every=2, loggers=[capture])
    assert_state_equal(bundle.model, before)
    summary = module.summary
    # 3 batches, K=2: a point after batch 2 and one at the end (batch 3)
    assert [(p["edits"], p["batches"]) for p in module.curves] == [(2.0, 2.0), (3.0, 3.0)]
    last = module.curves[-1]
    final = {k.partition("/")[2]: v for k, v in summary.items() if k.startswith("final/")}
    assert final and {k: v for k, v in last.items() if k not in ("edits", "batches")} == final
    # the scores a curve carries: every stage metric, labelled as in the summary (efficacy: probability comparison)
    for name in ("reliability", "generalization", "locality", "locality_acc", "efficacy_score", "cf_score"):
        assert name in last, name
    assert not any(k.startswith("step/") for k in summary)  # curve points stay out of the summary
    table = _read_curves(tmp_path)
    assert len(table) == 2 and list(table[0])[:2] == ["edits", "batches"]
    assert table[-1]["edits"] == "3" and float(table[-1]["reliability"]) == summary["final/reliability"]
    assert (tmp_path / "curves.png").stat().st_size > 0
    # loggers: stream/{metric} with step = edits so far
    stream = [(m, s) for m, s in capture.calls if any(k.startswith("stream/") for k in m)]
    assert [s for _, s in stream] == [2, 3]
    assert stream[-1][0]["stream/reliability"] == summary["final/reliability"]


def test_first_checkpoint_of_single_edits_is_the_first_records_post_score(tiny, tmp_path):
    """eval_every=1: after batch 1 only record 0 is edited, and it is scored on the same model as its
    post-edit score; every batch gives a point."""
    module, rows = _run(tiny("gpt2"), _ft(), tmp_path, eval_every=1, scoring_modes=MODES)
    assert [p["edits"] for p in module.curves] == [1.0, 2.0, 3.0]
    first = module.curves[0]
    for name, value in rows[0]["post"].items():
        if value is not None:
            assert first[name] == pytest.approx(value), name
    assert "reliability@generation_em" in first
    assert len(_read_curves(tmp_path)) == 3


def test_general_ability_is_measured_at_every_checkpoint(tiny, tmp_path):
    bundle = tiny("gpt2")
    weight = bundle.model.transformer.h[1].mlp.c_proj.weight  # the weight FT-L tunes
    calls = []

    def general(model, tokenizer):
        calls.append(1)
        return {"checksum": float(weight.double().sum())}

    module, _ = _run(bundle, _ft(), tmp_path, eval_every=1, general_ability=general)
    sums = [p["general_checksum"] for p in module.curves]
    # pre, the two mid-stream points and post; final is post's model, not measured twice
    assert len(calls) == 1 + (len(sums) - 1) + 1
    assert len(set(sums)) == 3  # the model changes with every edit of the stream
    assert sums[-1] == module.summary["final/general_checksum"] == module.summary["post/general_checksum"]
    assert module.summary["pre/general_checksum"] not in sums
    assert "general_checksum" in _read_curves(tmp_path)[0]


def test_eval_every_implies_scoring_after_the_stream_and_needs_sequential_edits(tiny, tmp_path):
    module = EditEvalModule(tiny("gpt2"), eval_every=5)
    assert module.score_after_stream
    with pytest.raises(ValueError, match="positive"):
        EditEvalModule(tiny("gpt2"), eval_every=0)
    with pytest.raises(ValueError, match="sequential"):
        _run(tiny("gpt2"), _ft(2), tmp_path, sequential=False, eval_every=1)


def test_a_sequential_stream_is_refused_on_more_than_one_process(tiny):
    """Under DDP each rank would edit every N-th batch on its own model copy (N streams, not one):
    the callback refuses a sequential run when the trainer has several processes, in setup (every
    rank runs it, before the test loop edits anything); independent edits split fine."""
    bundle = tiny("gpt2")
    module = EditEvalModule(bundle)
    editor = _Recording(_ft(2))
    before = state_copy(bundle.model)
    with pytest.raises(SettingError, match="one model's history") as err:
        EditorCallback(editor, sequential=True).setup(SimpleNamespace(world_size=2), module, "test")
    assert err.value.key == "edit.sequential"
    assert "2 interleaved streams" in str(err.value) and "trainer.devices=1" in str(err.value)
    assert editor.seen == [] and editor.deltas == []
    assert_state_equal(bundle.model, before)
    EditorCallback(editor, sequential=True).setup(SimpleNamespace(world_size=1), module, "test")
    EditorCallback(editor, sequential=False).setup(SimpleNamespace(world_size=2), module, "test")


def test_no_curves_without_eval_every(tiny, tmp_path):
    module, rows = _run(tiny("gpt2"), _ft(5), tmp_path, score_after_stream=True)
    assert module.curves == [] and not (tmp_path / "curves.csv").exists()
    assert all("final" in r for r in rows)


def test_missing_matplotlib_skips_the_plot_with_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails
    with caplog.at_level(logging.WARNING, logger="editlab.lit.curves"):
        assert plot_curves([{"edits": 1.0, "batches": 1.0, "reliability": 1.0}], tmp_path / "c.png") is False
    assert "matplotlib is not installed" in caplog.text and not (tmp_path / "c.png").exists()


# ------------------------------------------------------------------ correctness guards
def test_independent_edits_share_no_state(tiny, tmp_path):
    """FT-L tunes the weights it is given: an edit computed on a model that kept an earlier edit (or
    any state left over from it) would differ.  Independent edits of records 0, 1, 2 in a row give
    bit-identical deltas and scores to each record edited alone; in a sequential stream they do not.
    (``precompute_pre=False``: pre-edit scores per batch, so that both runs pad the same sequences
    together; batched scoring of all records at once differs in the last bits.)"""
    bundle = tiny("gpt2")
    before = state_copy(bundle.model)
    in_a_row = _Recording(_ft())
    _, rows = _run(bundle, in_a_row, tmp_path / "row", sequential=False, precompute_pre=False)
    for seen in in_a_row.seen:
        for k, v in before.items():
            assert torch.equal(seen[k], v), k  # every edit starts from the unedited model
    for i in range(3):
        alone = _Recording(_ft())
        _, rows_alone = _run(bundle, alone, tmp_path / f"alone{i}", sequential=False, precompute_pre=False,
                             records=lambda i=i: [make_records()[i]])
        assert alone.deltas[0].keys() == in_a_row.deltas[i].keys()
        assert all(torch.equal(alone.deltas[0][k], in_a_row.deltas[i][k]) for k in alone.deltas[0])
        assert rows_alone[0]["post"] == rows[i]["post"] and rows_alone[0]["pre"] == rows[i]["pre"]
    assert_state_equal(bundle.model, before)
    stream = _Recording(_ft())
    _run(bundle, stream, tmp_path / "stream", sequential=True)
    assert not all(torch.equal(stream.deltas[1][k], in_a_row.deltas[1][k]) for k in stream.deltas[1])


@pytest.mark.parametrize("precompute_pre", [True, False])
def test_pre_edit_metrics_inside_a_stream_equal_those_of_a_fresh_unedited_model(tiny, tmp_path, precompute_pre):
    """Every pre-edit score of a sequential stream with checkpoints (teacher forced, probability
    comparison, generation, fluency; per record and in the summary) equals, exactly, the score of a
    freshly built unedited model."""
    module, rows = _run(tiny("gpt2"), _ft(), tmp_path / "stream", eval_every=1, scoring_modes=MODES,
                        precompute_pre=precompute_pre)
    fresh, fresh_rows = _run(tiny_model("gpt2", seed=0), None, tmp_path / "fresh", scoring_modes=MODES,
                             precompute_pre=precompute_pre)
    assert [r["pre"] for r in rows] == [r["pre"] for r in fresh_rows]
    pre = {k: v for k, v in module.summary.items() if k.startswith("pre/")}
    assert pre and pre == {k: v for k, v in fresh.summary.items() if k.startswith("pre/")}
    assert any(r["post"] != r["pre"] for r in rows)  # the stream did edit


def test_eval_sample_scores_a_fixed_sample_at_each_point_and_every_record_at_the_end(tiny, tmp_path, caplog):
    """eval_sample=2: every curve point scores the stream's first two edited records only (the same
    two once edited); final/ still scores all four, as without a sample."""
    import dataclasses
    import logging

    def four():
        base = make_records()
        return [*base, dataclasses.replace(base[0], record_id=3, prompt="The capital of Spain is", subject="Spain")]

    bundle = tiny("gpt2")
    whole, _ = _run(bundle, _ft(), tmp_path / "all", eval_every=1, records=four)
    with caplog.at_level(logging.INFO, logger="editlab.lit.edit_eval"):
        sampled, _ = _run(bundle, _ft(), tmp_path / "sample", eval_every=1, eval_sample=2, records=four)
    scored = [r.getMessage().split(": scored ")[1].split(" ")[0] for r in caplog.records
              if ": scored " in r.getMessage()]
    assert scored == ["1", "2", "2", "4"]  # points after batches 1-3 (batch 4's point is final), then final
    assert sampled.curves[:2] == whole.curves[:2]  # the sample is every record so far until it is full
    assert sampled.curves[2] != whole.curves[2]  # after batch 3: records 0-1 only, not 0-2
    assert sampled.curves[-1] == whole.curves[-1]
    assert {k: v for k, v in sampled.summary.items() if k.startswith("final/")} == {
        k: v for k, v in whole.summary.items() if k.startswith("final/")}
    with pytest.raises(ValueError, match="eval_sample"):
        EditEvalModule(bundle, eval_every=1, eval_sample=0)


def test_sample_only_scores_the_sample_and_nothing_else(tiny, tmp_path, caplog):
    """sample_only (scale streams): the first two edited records are scored before, after their edit,
    at every point and after the stream, exactly as in a run scoring every record; the other records
    are edited (the weights are those of the full run) but never scored, and their rows say so."""
    import dataclasses

    def five():
        base = make_records()
        extra = [dataclasses.replace(base[0], record_id=3 + i, prompt=p, subject=sub)
                 for i, (p, sub) in enumerate([("The capital of Spain is", "Spain"), ("The capital of Peru is", "Peru")])]
        return [*base, *extra]

    bundle = tiny("gpt2")
    whole_editor, sample_editor = _Recording(_ft()), _Recording(_ft())
    whole, whole_rows = _run(bundle, whole_editor, tmp_path / "all", eval_every=2, eval_sample=2, records=five)
    with caplog.at_level(logging.INFO, logger="editlab.lit.edit_eval"):
        sampled, rows = _run(bundle, sample_editor, tmp_path / "sample", eval_every=2, eval_sample=2,
                             sample_only=True, records=five)
    assert "scoring the unedited model on 2 records" in caplog.text  # pre-edit scores of the sample only
    scored = [r.getMessage().split(": scored ")[1].split(" ")[0] for r in caplog.records if ": scored " in r.getMessage()]
    assert scored == ["2", "2", "2"]  # points after batches 2 and 4, then final: the sample each time
    # the same edits were made: scoring the other records changes nothing in the stream
    assert len(sample_editor.deltas) == len(whole_editor.deltas) == 5
    for a, b in zip(sample_editor.deltas, whole_editor.deltas):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["record_id"] for r in rows] == [0, 1, 2, 3, 4] and all(r["edit_seconds"] is not None for r in rows)
    for row, full in zip(rows[:2], whole_rows[:2]):
        assert {s: row[s] for s in ("pre", "post")} == {s: full[s] for s in ("pre", "post")}
    assert all(not {"pre", "post", "final"} & set(r) for r in rows[2:])  # edited, not scored
    assert [r["final"] for r in rows[:2]] == [r["final"] for r in whole_rows[:2]]
    assert sampled.curves[:-1] == whole.curves[:-1]  # the points before final score the sample either way
    assert sampled.curves[-1]["edits"] == 5.0
    assert sampled.curves[-1]["reliability"] == sampled.summary["final/reliability"]
    assert sampled.summary["final/reliability"] != whole.summary["final/reliability"]  # 2 records, not 5
    with pytest.raises(ValueError, match="eval_sample"):
        EditEvalModule(bundle, eval_every=1, sample_only=True)


def test_lifelong_table_reads_a_stream_run(tiny, tmp_path, capsys):
    """experiments/lifelong_table.py: one row per run, the final/ scores and general ability of the
    run's summary.json, s/edit from the median batch time."""
    import importlib.util
    from pathlib import Path

    import yaml

    path = Path(__file__).resolve().parents[2] / "experiments" / "lifelong_table.py"
    spec = importlib.util.spec_from_file_location("lifelong_table", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    calls = []

    def general(model, tokenizer):  # the unedited model first, then the edited one
        calls.append(1)
        return {"perplexity": 30.0 if len(calls) == 1 else 33.0, "piqa_acc": 0.5}

    _run(tiny("gpt2"), _ft(), tmp_path, eval_every=1, general_ability=general)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(
        {"method": {"_target_": "editlab.methods.ft.FTL"}, "data": {"batch_size": 1}}))
    summary = json.loads((tmp_path / "summary.json").read_text())
    cells = script.row(tmp_path, "tf")
    n = sum(1 for line in (tmp_path / "records.jsonl").read_text().splitlines() if line.strip())
    assert cells[0] == "FTL" and cells[1] == f"{n} ({n} × 1)"
    assert cells[2] == f"{summary['final/reliability']:.3f}"
    assert cells[6] == "33.00 (1.100×)"
    assert cells[8] == f"{summary['time/edit_seconds_median']:.3f}"
    script.main([str(tmp_path), "--mode", "pc"])
    assert capsys.readouterr().out.splitlines()[0].startswith("| method | edits (batches × size) | final efficacy (PC)")
    # generation columns follow the framing the run scored (chat-framed zsRE streams)
    assert script.row(tmp_path, "generation")[2:6] == ["–"] * 4
    chat = {"final/reliability@generation_chat_em": 0.25, "final/generalization@generation_chat_em": 0.5,
            "final/locality@generation_chat_em": 0.75, "pre/locality@generation_chat_em": 1.0}
    (tmp_path / "summary.json").write_text(json.dumps({**summary, **chat}))
    assert script.row(tmp_path, "generation")[2:6] == ["0.250", "0.500", "0.750", "1.000"]
