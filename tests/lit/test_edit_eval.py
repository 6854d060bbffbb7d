import json
import math

import lightning as L
import pytest
import torch

from editlab.data.datamodule import EditDataModule
from editlab.lit.callbacks import EditorCallback
from editlab.lit.edit_eval import EditEvalModule, format_summary
from editlab.methods.base import EditError, Editor
from editlab.methods.ft import FTL

from conftest import assert_state_equal, make_records, state_copy


def _trainer(callbacks):
    return L.Trainer(accelerator="cpu", devices=1, inference_mode=False, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=callbacks)


def _run(bundle, editor, tmp_path, sequential=False, skip_failed=False, batch_size=1, after_stream=False):
    module = EditEvalModule(bundle, output_dir=str(tmp_path), fluency=True, fluency_max_new_tokens=4,
                            score_after_stream=after_stream)
    cbs = [EditorCallback(editor, sequential=sequential, skip_failed=skip_failed)] if editor else []
    dm = EditDataModule(test=make_records, batch_size=batch_size)
    _trainer(cbs).test(module, datamodule=dm, verbose=False)
    rows = [json.loads(x) for x in (tmp_path / "records.jsonl").read_text().splitlines()]
    return module.summary, rows


def test_edit_loop_scores_edits_and_restores(tiny, tmp_path):
    bundle = tiny("gpt2")
    before = state_copy(bundle.model)
    summary, rows = _run(bundle, FTL(layers=[1], lr=0.05, num_steps=40, objective="teacher_forced"), tmp_path)
    assert_state_equal(bundle.model, before)
    assert len(rows) == 3 and all(r["edit_seconds"] > 0 for r in rows)
    assert summary["post/reliability"] == 1.0
    assert summary["post/reliability"] > summary["pre/reliability"]
    assert summary["post/efficacy_score"] >= summary["pre/efficacy_score"]
    for key in ("post/locality", "pre/locality_acc", "post/generalization", "post/portability",
                "post/neighborhood_score", "post/paraphrase_magnitude", "post/fluency", "post/cf_score",
                "time/edit_seconds_median"):
        assert key in summary, key
    assert "pre/locality" not in summary  # agreement with itself would be 1 by definition
    # per-record rows carry every metric per stage; a record without a true target has no efficacy
    assert rows[2]["post"].get("efficacy_score") is None
    assert rows[0]["post"]["reliability"] == 1.0
    csv_text = (tmp_path / "summary.csv").read_text()
    assert csv_text.startswith("metric,pre,post") and "reliability" in csv_text
    assert json.loads((tmp_path / "summary.json").read_text())["post/reliability"] == 1.0
    assert "reliability" in format_summary(summary)


def test_no_editor_means_post_equals_pre(tiny, tmp_path):
    summary, rows = _run(tiny("llama"), None, tmp_path)
    assert summary["post/reliability"] == summary["pre/reliability"]
    assert summary["post/locality"] == 1.0


def test_sequential_pre_scores_are_those_of_the_original_model(tiny, tmp_path):
    bundle = tiny("gpt2")
    before = state_copy(bundle.model)
    ed = FTL(layers=[1], lr=0.05, num_steps=20, objective="teacher_forced")
    _, rows_single = _run(bundle, ed, tmp_path / "a")
    _, rows_seq = _run(bundle, ed, tmp_path / "b", sequential=True)
    assert_state_equal(bundle.model, before)
    for a, b in zip(rows_single, rows_seq):
        assert a["pre"] == b["pre"]
    # later records in the stream are scored with earlier edits still applied: post scores differ
    assert any(a["post"] != b["post"] for a, b in zip(rows_single[1:], rows_seq[1:]))


def test_score_after_stream_rescores_every_record_on_the_final_model(tiny, tmp_path):
    bundle = tiny("gpt2")
    before = state_copy(bundle.model)
    ed = FTL(layers=[1], lr=0.05, num_steps=20, objective="teacher_forced")
    summary, rows = _run(bundle, ed, tmp_path, sequential=True, after_stream=True)
    assert_state_equal(bundle.model, before)
    assert all("final" in r for r in rows)
    given = lambda d: {k: v for k, v in d.items() if v is not None}  # noqa: E731
    # the last record's edit is the last of the stream: its final scores are its post scores
    assert given(rows[-1]["final"]) == pytest.approx(given(rows[-1]["post"]))
    # earlier records are rescored with later edits applied
    assert any(given(r["final"]) != given(r["post"]) for r in rows[:-1])
    for key in ("final/reliability", "final/locality", "final/efficacy_score", "final/fluency"):
        assert key in summary, key
    assert summary["final/reliability"] == pytest.approx(sum(r["final"]["reliability"] for r in rows) / len(rows))
    text = format_summary(summary)
    assert text.splitlines()[0].split() == ["metric", "pre", "post", "final"]
    assert (tmp_path / "summary.csv").read_text().startswith("metric,pre,post,final")


def test_score_after_stream_of_independent_edits_equals_pre(tiny, tmp_path):
    # non-sequential: every edit was undone, so the final model is the unedited one
    summary, rows = _run(tiny("llama"), FTL(layers=[1], lr=0.05, num_steps=5), tmp_path, after_stream=True)
    for r in rows:
        assert r["final"]["reliability"] == r["pre"]["reliability"]
        assert r["final"].get("efficacy_magnitude") == r["pre"].get("efficacy_magnitude")
    assert summary["final/locality"] == 1.0


class _Failing(Editor):
    def __init__(self):
        self.calls = 0

    def compute_deltas(self, model, tokenizer, records):
        self.calls += 1
        if self.calls == 2:
            raise EditError("synthetic failure")
        name = next(n for n, p in model.named_parameters() if p.dim() == 2)
        return {name: torch.ones_like(model.get_parameter(name))}


def test_failed_edit_is_skipped_or_raised_and_model_unchanged(tiny, tmp_path):
    bundle = tiny("gpt2")
    before = state_copy(bundle.model)
    summary, rows = _run(bundle, _Failing(), tmp_path, skip_failed=True)
    assert summary["edits/failed"] == 1.0
    assert rows[1]["edit_error"] == "synthetic failure" and "post" not in rows[1]
    assert_state_equal(bundle.model, before)
    with pytest.raises(EditError):
        _run(bundle, _Failing(), tmp_path / "x")
    assert_state_equal(bundle.model, before)


def test_batch_editing(tiny, tmp_path):
    bundle = tiny("llama")
    before = state_copy(bundle.model)
    summary, rows = _run(bundle, FTL(layers=[1], lr=0.05, num_steps=30, objective="teacher_forced"),
                         tmp_path, batch_size=3)
    assert {r["batch"] for r in rows} == {0}
    assert summary["post/reliability"] > summary["pre/reliability"]
    assert_state_equal(bundle.model, before)


def test_inference_mode_is_refused(tiny):
    module = EditEvalModule(tiny("gpt2"))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, inference_mode=True)
    with pytest.raises(RuntimeError, match="inference_mode"):
        trainer.test(module, datamodule=EditDataModule(test=make_records), verbose=False)


def test_stream_windows_report_reads_a_sequential_run(tiny, tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "experiments" / "stream_windows.py"
    spec = importlib.util.spec_from_file_location("stream_windows", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    ed = FTL(layers=[1], lr=0.05, num_steps=20, objective="teacher_forced")
    summary, rows = _run(tiny("gpt2"), ed, tmp_path, sequential=True, after_stream=True)
    table = script.window_table(script.load_rows(tmp_path), 2, ("reliability", "locality"))
    assert [e["records"] for e in table] == ["1-2", "3-3", "all"]
    assert table[-1]["final/reliability"] == pytest.approx(summary["final/reliability"])
    assert table[0]["post/reliability"] == pytest.approx((rows[0]["post"]["reliability"] + rows[1]["post"]["reliability"]) / 2)
    assert math.isnan(table[0]["pre/locality"])  # agreement with itself is not scored pre-edit
    script.main([str(tmp_path), "--window", "2", "--metrics", "reliability", "--markdown"])
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "| records | reliability pre | reliability post | reliability final |"
