import json
import math
from dataclasses import fields

import lightning as L
import pytest
import torch

from editlab.data.datamodule import EditDataModule
from editlab.evaluation.scorer import ScoringSettings
from editlab.lit.callbacks import EditorCallback
from editlab.lit.edit_eval import EditEvalModule
from editlab.lit.results import format_summary
from editlab.methods.base import EditError, Editor
from editlab.methods.ft import FTL

from editlab.data.records import EditRecord
from editlab.metrics.edit import generation_metric_names

from conftest import assert_state_equal, make_records, scripted_next_tokens, state_copy

MODES = ["teacher_forced", "probability_comparison", "generation"]
SCORING_KEYS = {f.name for f in fields(ScoringSettings)}  # _run passes these to ScoringSettings


def _trainer(callbacks):
    return L.Trainer(accelerator="cpu", devices=1, inference_mode=False, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=callbacks)


def _run(bundle, editor, tmp_path, sequential=False, skip_failed=False, batch_size=1, after_stream=False,
         records=make_records, fluency=True, **kwargs):
    scoring = ScoringSettings(fluency=fluency, fluency_max_new_tokens=4,
                              **{k: kwargs.pop(k) for k in SCORING_KEYS if k in kwargs})
    module = EditEvalModule(bundle, scoring, output_dir=str(tmp_path), score_after_stream=after_stream, **kwargs)
    cbs = [EditorCallback(editor, sequential=sequential, skip_failed=skip_failed)] if editor else []
    dm = EditDataModule(test=records, batch_size=batch_size)
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


class _Overflowing(Editor):
    """Finite deltas; the second call's make the forward overflow (the issue's KN new_scale=1e38)."""

    def __init__(self):
        self.calls = 0

    def compute_deltas(self, model, tokenizer, records):
        self.calls += 1
        name = next(n for n, p in model.named_parameters() if p.dim() == 2 and "mlp" in n)
        return {name: torch.full_like(model.get_parameter(name), 1e30 if self.calls == 2 else 1e-3)}


@pytest.mark.parametrize("sequential", [False, True])
def test_an_edit_that_breaks_the_forward_is_a_failed_edit(tiny, tmp_path, sequential):
    """A finite edit whose edited model overflows is undone and counted as a failed edit (skipped
    with skip_failed, raised without); in a stream the earlier edits stay, and the model is restored."""
    bundle = tiny("llama")
    before = state_copy(bundle.model)
    summary, rows = _run(bundle, _Overflowing(), tmp_path, skip_failed=True, sequential=sequential,
                         after_stream=sequential, fluency=False)
    assert summary["edits/failed"] == 1.0
    assert "numerically broken" in rows[1]["edit_error"] and "post" not in rows[1]
    assert "post" in rows[0] and "post" in rows[2]
    if sequential:  # the third edit was made on top of the first, not of the broken second
        assert all(r.get("final") is not None for r in (rows[0], rows[2]))
    assert_state_equal(bundle.model, before)
    with pytest.raises(EditError, match="numerically broken"):
        _run(bundle, _Overflowing(), tmp_path / "x", sequential=sequential, fluency=False)
    assert_state_equal(bundle.model, before)


def test_kn_with_a_huge_scale_is_skipped_and_counted(tiny, tmp_path):
    """The issue's reproducer in the loop: KN(new_scale=1e38) fails as an EditError (not a
    ValueError from the metrics), so skip_failed skips and counts it."""
    from editlab.methods.kn import KN

    bundle = tiny("llama")
    before = state_copy(bundle.model)
    summary, rows = _run(bundle, KN(new_scale=1e38, steps=2, batch_size=2), tmp_path, skip_failed=True,
                         fluency=False, records=lambda: make_records()[:2])
    assert summary["edits/failed"] == 2.0 and all("edit_error" in r for r in rows)
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


# ------------------------------------------------------------------ generation mode
def _gen(d):
    return {k: v for k, v in d.items() if "@generation" in k}


@pytest.mark.parametrize("case", ["teacher_forced_only", "generation_only"])
def test_teacher_forcing_and_generation_each_score_a_constructed_case_correctly(tiny, tmp_path, case):
    """Scripted next tokens: in the first case the model predicts " Paris" after the prompt but
    never stops (" Paris Rome Rome …"): teacher forcing scores 1.0, generation exact match 0
    (containment still 1).  In the second it answers " The Paris." : the first token is not the
    target's, so teacher forcing scores 0, while the generated answer normalises to "paris"."""
    bundle = tiny("llama")
    tid = lambda text: bundle.tokenizer(text, add_special_tokens=False)["input_ids"][0]  # noqa: E731
    if case == "teacher_forced_only":
        table = {tid(" is"): tid(" Paris"), tid(" Paris"): tid(" Rome")}
    else:
        table = {tid(" is"): tid(" The"), tid(" The"): tid(" Paris"), tid(" Paris"): tid(".")}
    records = lambda: [EditRecord(record_id=0, prompt="The capital of France is", subject="France",  # noqa: E731
                                  target_new="Paris", target_true=None)]
    with scripted_next_tokens(bundle.model, table, default=tid(" Rome")):
        summary, rows = _run(bundle, None, tmp_path, records=records, fluency=False, scoring_modes=MODES)
    scores = {k: summary[f"pre/reliability{k}"] for k in ("", "@generation_em", "@generation_f1", "@generation_contains")}
    if case == "teacher_forced_only":
        # the answer runs to the cap: 1 target token + margin 5 = 6 tokens, " Paris" + 5 x " Rome"
        assert scores == {"": 1.0, "@generation_em": 0.0, "@generation_f1": pytest.approx(2 / 7),
                          "@generation_contains": 1.0}
    else:
        assert scores == {"": 0.0, "@generation_em": 1.0, "@generation_f1": 1.0, "@generation_contains": 1.0}
    assert rows[0]["pre"]["reliability@generation_em"] == scores["@generation_em"]


def test_generation_mode_keys_and_pre_edit_scores_of_the_unedited_model(tiny, tmp_path):
    bundle = tiny("gpt2")
    before = state_copy(bundle.model)
    ed = FTL(layers=[1], lr=0.05, num_steps=20, objective="teacher_forced")
    judge = lambda prompt, target, generation: float(target.lower() in generation.lower())  # noqa: E731
    summary, rows = _run(bundle, ed, tmp_path / "edit", sequential=True, fluency=False, scoring_modes=MODES,
                         judge=judge)
    assert_state_equal(bundle.model, before)
    for key in ("post/reliability@generation_em", "post/reliability@generation_f1",
                "post/reliability@generation_contains", "post/reliability@generation_judge",
                "post/generalization@generation_em", "post/portability@generation_f1",
                "post/locality@generation_em", "post/locality_acc@generation_contains",
                "pre/reliability@generation_em", "post/reliability", "post/efficacy_score"):
        assert key in summary, key
    assert "pre/locality@generation_em" not in summary  # agreement with itself
    # pre-edit generation scores inside a sequential edit run = those of a fresh unedited model
    _, fresh = _run(tiny("gpt2"), None, tmp_path / "fresh", fluency=False, scoring_modes=MODES, judge=judge,
                    precompute_pre=False)
    for edited, unedited in zip(rows, fresh):
        assert _gen(edited["pre"]) and _gen(edited["pre"]) == _gen(unedited["pre"])
        assert {k: v for k, v in _gen(unedited["post"]).items() if not k.startswith("locality@")} == _gen(unedited["pre"])
        assert all(v == 1.0 for k, v in unedited["post"].items() if k.startswith("locality@"))
    assert (tmp_path / "edit" / "summary.csv").read_text().count("@generation_") == len(
        [k for k in summary if k.startswith("post/") and "@generation_" in k])
    assert "reliability@generation_contains" in format_summary(summary)


def test_generation_mode_question_answer_framing_and_after_stream(tiny, tmp_path):
    bundle = tiny("gpt2")
    ed = FTL(layers=[1], lr=0.05, num_steps=20, objective="teacher_forced")
    summary, rows = _run(bundle, ed, tmp_path, sequential=True, after_stream=True, fluency=False,
                         scoring_modes=MODES, generation_framing="question_answer", qa_template="Q: {prompt}\nA:")
    names = {k.partition("/")[2] for k in summary if "@" in k}
    assert names == set(generation_metric_names("generation_qa"))
    given = lambda d: {k: v for k, v in _gen(d).items() if v is not None}  # noqa: E731
    assert given(rows[-1]["final"]) == given(rows[-1]["post"])  # the last edit's final state is its post state
    # records.jsonl keeps every generated answer, and the scores are those of the kept answers
    from editlab.metrics import functional as F
    for row, rec in zip(rows, make_records()):
        gens = row["generations"]
        assert set(gens) == {"pre", "post", "final"}
        answers = gens["post"]["reliability"]
        assert len(answers) == 1 and len(gens["post"].get("generalization", [])) == len(rec.rephrase_prompts)
        assert row["post"]["reliability@generation_qa_em"] == float(F.generation_scores(answers, [rec.target_new], "em")[0])
    assert rows[-1]["generations"]["final"] == rows[-1]["generations"]["post"]
    assert summary["final/reliability@generation_qa_f1"] == pytest.approx(
        sum(r["final"]["reliability@generation_qa_f1"] for r in rows) / len(rows))


def test_scoring_modes_are_checked(tiny):
    with pytest.raises(ValueError, match="unknown scoring modes"):
        EditEvalModule(tiny("gpt2"), ScoringSettings(scoring_modes=["teacher_forced", "wild"]))
    with pytest.raises(ValueError, match="teacher_forced"):
        EditEvalModule(tiny("gpt2"), ScoringSettings(scoring_modes=["generation"]))
    with pytest.raises(ValueError, match="generation_framing"):
        EditEvalModule(tiny("gpt2"), ScoringSettings(generation_framing="wild"))
    bundle = tiny("gpt2")
    chat_settings = ScoringSettings(scoring_modes=MODES, generation_framing="chat")
    with pytest.raises(ValueError, match="chat template"):
        EditEvalModule(bundle, chat_settings)
    bundle.tokenizer.chat_template = "{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}<a>"
    chat = EditEvalModule(bundle, chat_settings)
    assert chat.scorer.generation.frame("The capital of X is") == "<u>The capital of X is</u><a>"
    assert "reliability@generation_chat_em" in chat.stage_metrics["post"]
    plain = EditEvalModule(tiny("gpt2"), ScoringSettings(scoring_modes=["teacher_forced"]))
    assert plain.scorer.generation is None and not plain.scorer.probability_comparison
    assert "reliability@generation_em" not in plain.stage_metrics["post"]


# ------------------------------------------------------------------ general ability
GENERAL_KEYS = ("general_perplexity", "general_nll", "general_tokens", "general_piqa_acc", "general_piqa_acc_norm",
                "general_piqa_examples")


def _general(tmp_path):
    from editlab.evaluation.general import GeneralAbility
    from editlab.data.corpora import TextFile

    tmp_path.mkdir(parents=True, exist_ok=True)
    text = tmp_path / "heldout.txt"
    text.write_text("The Eiffel Tower is a wrought-iron lattice tower in Paris, named after Gustave Eiffel.\n\n"
                    "The tower is 330 metres tall and was the centrepiece of the 1889 World's Fair.\n", encoding="utf-8")
    (tmp_path / "locality").mkdir()
    items = [{"goal": f"How do I open jar {i}?", "sol1": "Twist the lid.", "sol2": "Hit it with a hammer."}
             for i in range(4)]
    (tmp_path / "locality" / "piqa_valid.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
    (tmp_path / "locality" / "piqa_valid-labels.lst").write_text("0\n1\n0\n1\n")
    return GeneralAbility(TextFile(text), n_tokens=40, seq_len=16, data_dir=tmp_path)


def _stage(summary, stage):
    return {k.partition("/")[2]: v for k, v in summary.items() if k.startswith(f"{stage}/general_")}


class _Destroy(Editor):
    """Adds large noise to the token embedding (tied to the LM head in GPT-2)."""

    def compute_deltas(self, model, tokenizer, records):
        weight = model.get_input_embeddings().weight
        name = next(n for n, p in model.named_parameters() if p is weight)
        return {name: 5.0 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))}


def test_general_ability_pre_post_final_in_a_sequential_stream(tiny, tmp_path):
    bundle = tiny("gpt2")
    before = state_copy(bundle.model)
    ev = _general(tmp_path)
    ed = FTL(layers=[1], lr=0.05, num_steps=20, objective="teacher_forced")
    summary, rows = _run(bundle, ed, tmp_path / "run", sequential=True, after_stream=True, fluency=False,
                         general_ability=ev)
    assert_state_equal(bundle.model, before)
    pre, post, final = (_stage(summary, s) for s in ("pre", "post", "final"))
    assert set(pre) == set(post) == set(final) == set(GENERAL_KEYS)
    # pre: exactly the values of a fresh unedited model
    assert pre == {f"general_{k}": v for k, v in _general(tmp_path / "fresh")(bundle.model, bundle.tokenizer).items()}
    # post is measured after the last edit of the stream, final at the end: the same model state
    assert post == final and post["general_perplexity"] != pre["general_perplexity"]
    assert pre["general_tokens"] == 40 - 3 and pre["general_piqa_examples"] == 4
    assert "time/general_seconds_median" in summary
    assert all("general_perplexity" not in r["pre"] for r in rows)  # run-level, not per record
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["pre/general_piqa_acc"] == pre["general_piqa_acc"]
    assert "general_perplexity," in (tmp_path / "run" / "summary.csv").read_text()
    assert "general_perplexity" in format_summary(summary)


def test_general_ability_sees_a_destructive_edit_and_its_undoing(tiny, tmp_path):
    bundle = tiny("gpt2")
    before = state_copy(bundle.model)
    summary, _ = _run(bundle, _Destroy(), tmp_path / "run", after_stream=True, fluency=False,
                      general_ability=_general(tmp_path))
    assert_state_equal(bundle.model, before)
    pre, post, final = (_stage(summary, s) for s in ("pre", "post", "final"))
    assert post["general_perplexity"] > 10 * pre["general_perplexity"]
    assert final == pre  # independent edits: every edit is undone by the end of the run


def test_general_ability_is_off_by_default(tiny, tmp_path):
    summary, _ = _run(tiny("llama"), None, tmp_path, fluency=False)
    assert not any("general_" in k for k in summary)
