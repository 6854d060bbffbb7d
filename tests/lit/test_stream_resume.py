"""Stream checkpoints (editlab.lit.stream): a stream stopped after some batch and resumed from its
last checkpoint, on a freshly built model, ends with the records, summary and curves of a stream
that never stopped, for every kind of edit state: summed deltas (FT-L), patches (T-Patcher),
memory (IKE) and a stateful editor's stream state with a replacing patch (drawing from the global
random state, so the random states must come back too).  The kill of a real process is
tests/test_stream_kill.py."""

from __future__ import annotations

import csv
import dataclasses
import json

import lightning as L
import pytest
import torch

from editlab.data.datamodule import EditDataModule
from editlab.evaluation.scorer import ScoringSettings
from editlab.lit.callbacks import EditorCallback
from editlab.lit.checkpoint import CheckpointError
from editlab.lit.edit_eval import EditEvalModule
from editlab.lit.stream import (FORMAT, STREAM_DIR, latest_checkpoint, patch_classes, read_stream_checkpoint,
                                record_from_dict, record_to_dict, resolve_resume, write_stream_checkpoint)
from editlab.methods.base import Edit, EditError, Editor
from editlab.methods.ft import FTL
from editlab.methods.ike import IKE
from editlab.methods.patches import FFNPatch
from editlab.methods.t_patcher import TPatcher
from editlab.models.tiny import tiny_model

from conftest import make_records

N, EVAL_EVERY, CHECKPOINT_EVERY, KILL_AT = 6, 3, 2, 5  # checkpoints after batches 2 and 4; stop before batch 6


class Growing(Editor):
    """A stateful editor (GRACE-like): each edit replaces its one patch at ``host`` with one holding
    a slot more, drawn from the global torch RNG; the stream state is the keys so far and plain data.
    Records whose id is in ``fail`` are refused (skip_failed streams go on)."""

    stateful = True

    def __init__(self, host: str, fail: tuple = ()):
        self.host, self.fail = host, fail

    def compute_edit(self, model, tokenizer, records, state=None):
        if any(r.record_id in self.fail for r in records):
            raise EditError("refused on purpose")
        d = model.config.hidden_size
        keys = torch.cat([state["keys"] if state else torch.zeros(0, d), torch.randn(len(records), d)])
        values = 0.05 * torch.randn(len(keys), d)
        state = {"keys": keys, "ids": [*(state["ids"] if state else []), *(r.record_id for r in records)]}
        return Edit(patches={self.host: FFNPatch(keys, values)}, replace=True, state=state)


class Stopped(RuntimeError):
    pass


class Stop(L.Callback):
    """Stops the run (an exception) when batch ``at`` is about to be edited."""

    def __init__(self, at: int):
        self.at = at

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == self.at:
            raise Stopped("stopped on purpose")


def stream_records(n: int = N):
    base = make_records()
    return [dataclasses.replace(base[i % len(base)], record_id=i, index=i) for i in range(n)]


TEXT = ("The capital of France is Paris. The mother tongue of Danielle Darrieux is French. Toko Yasuda plays "
        "the guitar. The company that makes the iPhone is Apple. Lionel Messi plays football for Argentina. ") * 8


def _lifelong(kind: str, tmp):
    """The issue's lifelong editors, at small settings for the 2-block tiny llama."""
    from editlab.data.corpora import TextFile
    from editlab.methods.alphaedit import AlphaEdit
    from editlab.methods.emmet import EMMET
    from editlab.methods.grace import GRACE
    from editlab.methods.ultraedit import UltraEdit
    from editlab.methods.wise import WISE

    corpus = tmp / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    key_value = dict(layers=[0, 1], fact_token="last", v_num_grad_steps=10, v_lr=0.5, clamp_norm_factor=20.0,
                     context_template_length_params=((5, 2),), template_prompts=("The", "I"),
                     mom2_corpus=TextFile(corpus), stats_cache_dir=str(tmp / "stats"))
    if kind == "alphaedit":
        return AlphaEdit(**key_value, nullspace_threshold=0.4, L2=1.0)
    if kind == "emmet":
        return EMMET(**key_value, mom2_update_weight=1.0, emmet_lambda=0.1)
    if kind == "ultraedit":
        return UltraEdit(mlp_gate_layers=[], mlp_in_layers=[], mlp_out_layers=[0, 1], lr=0.1)
    if kind == "grace":
        return GRACE(layer=1, module="mlp_out", n_iter=10)
    return WISE(layer=1, context_template_length_params=[], irrelevant_corpus=[TEXT[:200]], edit_lr=0.5,
                n_iter=10, act_margin=[2.0, 10.0, 5.0], mask_ratio=0.5, save_freq=2, merge_freq=4)


LIFELONG = ["alphaedit", "emmet", "ultraedit", "grace", "wise"]


def _editor(kind: str, bundle, tmp=None):
    if kind in LIFELONG:
        return _lifelong(kind, tmp)
    if kind == "ft":
        return FTL(layers=[1], lr=0.05, num_steps=5, objective="teacher_forced")
    if kind == "t_patcher":
        return TPatcher(memory_corpus=["Apple is a company based in California.", "Lionel Messi plays football."],
                        memory_tokens=16, memory_seq_len=8, lr=0.05, max_steps=20, check_every=10)
    if kind == "ike":
        return IKE(k=0, fact_copy=False)
    host = next(n for n, _ in bundle.model.named_modules() if n.endswith("layers.0.mlp"))
    return Growing(host, fail=(1, 5))


def run_stream(kind: str, out, stop_at: int | None = None, resume_from=None, records=None):
    """One stream of ``kind``'s editor on a freshly built tiny llama; the module."""
    bundle = tiny_model("llama", seed=0, max_position_embeddings=512)  # room for IKE's growing context
    records = records or stream_records()
    torch.manual_seed(0)
    module = EditEvalModule(bundle, ScoringSettings(), output_dir=str(out), eval_every=EVAL_EVERY,
                            checkpoint_every=CHECKPOINT_EVERY, resume_from=resume_from)
    callbacks = [EditorCallback(_editor(kind, bundle, out.parent), sequential=True, skip_failed=True)]
    if stop_at is not None:
        callbacks.append(Stop(stop_at))
    trainer = L.Trainer(accelerator="cpu", devices=1, inference_mode=False, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.test(module, datamodule=EditDataModule(test=lambda: records, batch_size=1), verbose=False)
    return module


def outputs(out):
    """records.jsonl (without edit times), summary.json (without timings) and curves.csv of a run."""
    rows = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("edit_seconds")
    summary = {k: v for k, v in json.loads((out / "summary.json").read_text()).items() if not k.startswith("time/")}
    with open(out / "curves.csv", newline="") as fh:
        curves = list(csv.reader(fh))
    return rows, summary, curves


@pytest.mark.parametrize("kind", ["ft", "t_patcher", "ike", "stateful"])
def test_a_stopped_stream_resumes_to_the_results_of_an_uninterrupted_one(kind, tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    run_stream(kind, whole)
    with pytest.raises(Stopped):
        run_stream(kind, part, stop_at=KILL_AT)
    rows_left = (part / "records.jsonl").read_text().splitlines()
    assert len(rows_left) == KILL_AT  # every finished batch is on disk, one past the checkpoint
    checkpoint = latest_checkpoint(part / STREAM_DIR)
    assert checkpoint.name == "batch_000004.pt" and [p.name for p in (part / STREAM_DIR).iterdir()] == [checkpoint.name]
    saved = read_stream_checkpoint(checkpoint)
    assert saved["format"] == FORMAT and saved["batches"] == 4 and saved["rows"] == 4
    session = saved["session"]
    if kind == "ft":
        assert set(session["deltas"]) == set(session["weights"]) and session["deltas"]
    elif kind == "t_patcher":
        assert len(session["patches"]) >= 2 and session["patches"][0]["class"] == "editlab.methods.patches.FFNPatch"
        assert session["patches"][0]["args"]["anchors"].shape[0] > 0  # anchors are no state dict's
    elif kind == "ike":
        assert [r["record_id"] for r in session["memory"]] == [0, 1, 2, 3]
    else:
        assert session["state"]["ids"] == [0, 2, 3] and len(session["patches"]) == 1
        assert saved["loop"]["failed"] == {1: "refused on purpose"}
    module = run_stream(kind, part, resume_from=str(checkpoint))
    assert not module.session.edited  # restored at the end as ever
    assert outputs(part) == outputs(whole)
    if kind == "stateful":
        assert module.summary["edits/failed"] == 2.0


@pytest.mark.parametrize("kind", LIFELONG)
def test_a_stopped_lifelong_stream_resumes_to_the_results_of_an_uninterrupted_one(kind, tmp_path, monkeypatch):
    """The lifelong editors' state (AlphaEdit's kept keys, UltraEdit's statistics, GRACE's codebook
    and WISE's side memories, their adapters rebuilt at their hosts; EMMET's deltas) survives a stop:
    the resumed stream ends where the uninterrupted one does."""
    monkeypatch.setenv("EDITLAB_CACHE", str(tmp_path / "cache"))
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert run_stream(kind, whole).summary["edits/failed"] == 0  # every edit of the stream took place
    with pytest.raises(Stopped):
        run_stream(kind, part, stop_at=KILL_AT)
    checkpoint = latest_checkpoint(part / STREAM_DIR)
    session = read_stream_checkpoint(checkpoint)["session"]
    if kind in ("alphaedit", "ultraedit", "grace", "wise"):
        assert session["state"] is not None
    if kind in ("grace", "wise"):
        assert len(session["patches"]) == 1 and session["patches"][0]["class"].endswith("Adapter")
    run_stream(kind, part, resume_from=str(checkpoint))
    assert outputs(part) == outputs(whole)


def test_a_resume_from_another_folder_writes_the_checkpoints_rows_there(tmp_path):
    part, other, whole = tmp_path / "part", tmp_path / "other", tmp_path / "whole"
    with pytest.raises(Stopped):
        run_stream("ft", part, stop_at=3)
    run_stream("ft", other, resume_from=str(resolve_resume(str(part), tmp_path)))
    run_stream("ft", whole)
    assert outputs(other) == outputs(whole)


def test_a_checkpoint_of_other_records_or_batches_is_refused(tmp_path):
    part = tmp_path / "part"
    with pytest.raises(Stopped):
        run_stream("ft", part, stop_at=3)
    path = str(latest_checkpoint(part / STREAM_DIR))
    others = [dataclasses.replace(r, record_id=f"x{r.record_id}") for r in stream_records()]
    with pytest.raises(CheckpointError, match="row 0 .*resume a stream with its own records"):
        run_stream("ft", tmp_path / "again", resume_from=path, records=others)


def test_records_round_trip_and_patches_are_allowlisted(tmp_path):
    for record in make_records():
        back = record_from_dict(record_to_dict(record))
        assert back == record and back.locality == record.locality
    assert "editlab.methods.patches.FFNPatch" in patch_classes()
    saved = read_stream_checkpoint(write_stream_checkpoint(
        {"format": FORMAT, "batches": 1, "rows": 1, "session": {}, "loop": {}, "rng": {}}, tmp_path))
    saved["session"] = {"deltas": {}, "weights": {}, "memory": [], "state": None,
                        "patches": [{"host": "model.layers.0.mlp", "class": "builtins.print", "args": {}, "state": {}}]}
    torch.save(saved, tmp_path / "batch_000002.pt")
    from editlab.lit.stream import reinstall_session
    from editlab.methods.base import WeightEditSession

    bundle = tiny_model("llama", seed=0)
    with pytest.raises(CheckpointError, match="refused patch class 'builtins.print'"):
        reinstall_session(WeightEditSession(bundle.model), saved["session"], None, bundle.tokenizer, tmp_path)
    assert latest_checkpoint(tmp_path).name == "batch_000002.pt"
    with pytest.raises(FileNotFoundError, match="no stream checkpoint"):
        resolve_resume(True, tmp_path / "empty")


def test_reinstall_puts_back_the_streams_weights_bit_for_bit(tmp_path):
    """Two deltas of 4e-8 on a weight of 1.0 (float32): added one at a time each rounds away, added
    as their sum (8e-8) they do not.  A reinstalled session holds the stream's weights, its summed
    deltas, and restores the fresh model's originals."""
    from editlab.lit.stream import reinstall_session, session_snapshot
    from editlab.methods.base import WeightEditSession

    name = "model.layers.0.mlp.down_proj.weight"
    streamed, fresh = tiny_model("llama", seed=0), tiny_model("llama", seed=0)
    for bundle in (streamed, fresh):
        torch.nn.init.ones_(dict(bundle.model.named_parameters())[name])
    original = dict(fresh.model.named_parameters())[name].detach().clone()
    session = WeightEditSession(streamed.model)
    for _ in range(2):
        session.apply({name: torch.full_like(original, 4e-8)})
    weight = dict(streamed.model.named_parameters())[name].detach().clone()
    assert torch.equal(weight, original) and not torch.equal(original + session.deltas[name], weight)
    again = WeightEditSession(fresh.model)
    reinstall_session(again, session_snapshot(session), None, fresh.tokenizer, tmp_path)
    assert torch.equal(dict(fresh.model.named_parameters())[name], weight)
    assert torch.equal(again.deltas[name], session.deltas[name])
    again.restore()
    assert torch.equal(dict(fresh.model.named_parameters())[name], original)
