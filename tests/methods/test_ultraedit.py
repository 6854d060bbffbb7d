"""UltraEdit on tiny random models: the edit takes and restores, the lifelong normalisation is
exact and carried by the session, the state stays the same size, and the edit loop runs it."""

import io
import json

import lightning as L
import pytest
import torch

from editlab.data.datamodule import EditDataModule
from editlab.evaluation.teacher_forced import score_pairs
from editlab.lit.callbacks import EditorCallback
from editlab.lit.edit_eval import EditEvalModule
from editlab.methods.base import EditError, WeightEditSession
from editlab.methods.ultraedit import UltraEdit, merge_moments, normalise, ridge_update

from conftest import CAUSAL_TYPES, assert_state_equal, state_copy

FAST = dict(mlp_gate_layers=[], mlp_in_layers=[], mlp_out_layers=[2, 3], lr=0.1)


def _nll(bundle, recs):
    return score_pairs(bundle.model, bundle.tokenizer, [r.prompt for r in recs], [r.target_new for r in recs]).nll


def _no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())


def _clone(state):
    return {"stats": {k: {"count": v["count"], "mean": v["mean"].clone(), "m2": v["m2"].clone()}
                      for k, v in state["stats"].items()}}


def _same_state(a, b):
    assert a["stats"].keys() == b["stats"].keys()
    for k in a["stats"]:
        assert a["stats"][k]["count"] == b["stats"][k]["count"]
        assert torch.equal(a["stats"][k]["mean"], b["stats"][k]["mean"])
        assert torch.equal(a["stats"][k]["m2"], b["stats"][k]["m2"])


# ------------------------------------------------------------------ the pieces
def test_merge_moments_pools_exactly_whatever_the_batches():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(23, 5, generator=g, dtype=torch.float64) * 3 + 1
    stats = None
    for lo, hi in [(0, 1), (1, 8), (8, 9), (9, 23)]:  # single rows included (NaN in nets.py's update)
        before = None if stats is None else {k: (v.clone() if torch.is_tensor(v) else v) for k, v in stats.items()}
        new = merge_moments(stats, x[lo:hi])
        if before is not None:  # the old statistics are not changed in place
            assert torch.equal(stats["mean"], before["mean"]) and torch.equal(stats["m2"], before["m2"])
        stats = new
    assert stats["count"] == 23
    torch.testing.assert_close(stats["mean"], x.mean(0))
    torch.testing.assert_close(stats["m2"], (x - x.mean(0)).pow(2).sum(0))
    z = normalise(stats, x)
    torch.testing.assert_close(z.mean(0), torch.zeros(5, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(z.std(0), torch.ones(5, dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("n", [4, 30])  # fewer rows than inputs (the n x n form) and more
def test_ridge_update_is_the_regularised_least_squares_solution(n):
    g = torch.Generator().manual_seed(1)
    k = torch.randn(n, 9, generator=g, dtype=torch.float64)
    v = torch.randn(n, 6, generator=g, dtype=torch.float64)
    w = ridge_update(k, v, 0.5)
    assert w.shape == (9, 6)
    grad = k.T @ (k @ w - v) + 0.5 * w  # of ½‖KW − V‖² + ½λ‖W‖²
    assert grad.abs().max() < 1e-10
    torch.testing.assert_close(w, torch.linalg.solve(k.T @ k + 0.5 * torch.eye(9, dtype=torch.float64), k.T @ v))


@pytest.mark.parametrize("micro_batch", [1, 3, 64])
def test_the_features_are_those_of_one_forward_and_backward_per_chunk(tiny_deep, records, micro_batch):
    """The reference runs one forward and backward per chunk of chunk_size records, its loss the
    chunk's mean target cross-entropy.  Length-sorted micro-batches of any size give those features,
    in record order."""
    import dataclasses

    bundle = tiny_deep("llama")
    words = ["Paris", "the river Seine in spring", "Rome", "a very long answer of many many tokens", "Oslo",
             "blue", "an island of the north Atlantic"]
    recs = [dataclasses.replace(records[i % len(records)], record_id=i, target_new=w) for i, w in enumerate(words)]
    chunk = 3
    reference: dict = {}
    for lo in range(0, len(recs), chunk):  # one pass per chunk, its loss the chunk's own mean
        part = UltraEdit(**{**FAST, "chunk_size": chunk, "micro_batch": 100}).features(
            bundle.model, bundle.tokenizer, recs[lo:lo + chunk])
        for path, (k, g) in part.items():
            reference.setdefault(path, []).append((k, g))
    got = UltraEdit(**{**FAST, "chunk_size": chunk, "micro_batch": micro_batch}).features(
        bundle.model, bundle.tokenizer, recs)
    assert got.keys() == reference.keys()
    for path, parts in reference.items():
        torch.testing.assert_close(got[path][0], torch.cat([k for k, _ in parts]), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[path][1], torch.cat([g for _, g in parts]), rtol=1e-4, atol=1e-6)
    assert _no_hooks(bundle.model)


# ------------------------------------------------------------------ one edit
@pytest.mark.parametrize("model_type", CAUSAL_TYPES)
def test_the_edit_takes_and_restore_is_bit_exact(tiny_deep, records, model_type):
    bundle = tiny_deep(model_type)
    before = state_copy(bundle.model)
    nll0 = _nll(bundle, records)
    editor = UltraEdit(**FAST)
    with editor.apply(bundle.model, bundle.tokenizer, records) as session:
        nll1 = _nll(bundle, records)
        assert sorted(session.touched) == sorted(f"{p}.weight" for p in editor.module_paths(bundle.model))
        assert session.stream_state["stats"]
    assert (nll1 < nll0 - 1.0).all(), (nll0, nll1)
    assert_state_equal(bundle.model, before)
    assert _no_hooks(bundle.model)


def test_gate_up_and_down_projections_with_frozen_weights(tiny_deep, records):
    """Gate and up projections of a Llama have one shape and share one normaliser (as in the
    reference); weights that do not require grad are edited all the same, and left frozen."""
    bundle = tiny_deep("llama")
    model = bundle.model
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = state_copy(model)
    editor = UltraEdit(mlp_gate_layers=[2], mlp_in_layers=[3], mlp_out_layers=[3], lr=0.1)
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        nll0 = _nll(bundle, records)
        with editor.apply(model, bundle.tokenizer, records) as session:
            nll1 = _nll(bundle, records)
            stats = session.stream_state["stats"]
            assert len(session.touched) == 3 and len(stats) == 2  # (d, ffn) for gate + up, (ffn, d) for down
            n_targets = sum(len(bundle.tokenizer(" " + r.target_new, add_special_tokens=False)["input_ids"])
                            for r in records)
            counts = sorted(s["count"] for s in stats.values())
            assert counts == [n_targets, 2 * n_targets]
        assert all(not p.requires_grad for p in model.parameters())
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    assert (nll1 < nll0).all()
    assert_state_equal(model, before)


# ------------------------------------------------------------------ the stream
def test_the_running_statistics_of_two_batches_are_those_of_their_features_pooled(tiny_deep, records):
    bundle = tiny_deep("llama")
    model, tok = bundle.model, bundle.tokenizer
    before = state_copy(model)
    editor = UltraEdit(**FAST)
    session = WeightEditSession(model)
    try:
        feats_a = editor.features(model, tok, records[:2])
        session.apply(editor.edit_in(session, tok, records[:2]))
        feats_b = editor.features(model, tok, records[2:])  # on the model as the first edit left it
        session.apply(editor.edit_in(session, tok, records[2:]))
        (key, stats), = session.stream_state["stats"].items()  # both down projections: one shape
        pooled = torch.cat([torch.cat(f[p], -1) for f in (feats_a, feats_b) for p in f]).double()
        assert stats["count"] == pooled.shape[0]
        torch.testing.assert_close(stats["mean"], pooled.mean(0), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(stats["m2"] / (stats["count"] - 1), pooled.var(0), rtol=1e-6, atol=1e-9)
    finally:
        session.restore()
    assert_state_equal(model, before)


def test_the_second_edit_uses_the_first_edits_statistics(tiny_deep, records):
    bundle = tiny_deep("llama")
    model, tok = bundle.model, bundle.tokenizer
    editor = UltraEdit(**FAST)
    session = WeightEditSession(model)
    try:
        session.apply(editor.edit_in(session, tok, records[:2]))
        carried = editor.edit_in(session, tok, records[2:])
        fresh = editor.compute_edit(model, tok, records[2:], state=None)
        assert carried.deltas.keys() == fresh.deltas.keys()
        assert all(not torch.allclose(carried.deltas[n], fresh.deltas[n]) for n in fresh.deltas)
        assert next(iter(carried.state["stats"].values()))["count"] > next(iter(fresh.state["stats"].values()))["count"]
        # the same state gives the same edit: nothing is kept on the editor
        again = editor.edit_in(session, tok, records[2:])
        assert all(torch.equal(again.deltas[n], carried.deltas[n]) for n in carried.deltas)
        assert not any(torch.is_tensor(v) for v in vars(editor).values())
    finally:
        session.restore()


def test_a_failed_edit_keeps_the_old_state_and_weights(tiny_deep, records):
    bundle = tiny_deep("llama")
    model, tok = bundle.model, bundle.tokenizer
    before = state_copy(model)
    editor = UltraEdit(**FAST)
    session = WeightEditSession(model)
    try:
        session.apply(editor.edit_in(session, tok, records[:2]))
        state, after_first = session.stream_state, state_copy(model)
        snapshot = _clone(state)

        def refuse(_):
            raise EditError("refused")

        with pytest.raises(EditError, match="refused"):  # undone by the session after it was installed
            session.apply(editor.edit_in(session, tok, records[2:]), verify=refuse)
        assert session.stream_state is state
        _same_state(session.stream_state, snapshot)  # not changed in place by the failed edit
        assert_state_equal(model, after_first)
        with pytest.raises(EditError, match="another editor"):  # the editor refuses: a state of other shapes
            UltraEdit(mlp_gate_layers=[], mlp_in_layers=[3], mlp_out_layers=[], lr=0.1).edit_in(session, tok, records)
        _same_state(session.stream_state, snapshot)
        session.apply(editor.edit_in(session, tok, records[2:]))  # the stream goes on from the old state
        assert next(iter(session.stream_state["stats"].values()))["count"] > next(iter(snapshot["stats"].values()))["count"]
    finally:
        session.restore()
    assert session.stream_state is None
    assert_state_equal(model, before)
    assert _no_hooks(model)


def test_the_state_does_not_grow_with_the_number_of_edits_and_loads_as_plain_data(tiny_deep, records):
    bundle = tiny_deep("gpt2")
    model, tok = bundle.model, bundle.tokenizer
    editor = UltraEdit(**FAST)
    session = WeightEditSession(model)
    sizes, counts = [], []
    try:
        for i in range(5):
            session.apply(editor.edit_in(session, tok, [records[i % 3]]))
            stats = session.stream_state["stats"]
            sizes.append((sorted(stats), sum(s["mean"].numel() + s["m2"].numel() for s in stats.values())))
            counts.append(sum(s["count"] for s in stats.values()))
        buffer = io.BytesIO()
        torch.save(session.stream_state, buffer)
        buffer.seek(0)
        _same_state(torch.load(buffer, weights_only=True), session.stream_state)
    finally:
        session.restore()
    assert all(s == sizes[0] for s in sizes)
    assert counts == sorted(counts) and counts[0] < counts[-1]


def test_a_sequential_run_through_the_edit_loop(tiny_deep, records, tmp_path):
    bundle = tiny_deep("llama")
    before = state_copy(bundle.model)
    module = EditEvalModule(bundle, output_dir=str(tmp_path), score_after_stream=True)
    trainer = L.Trainer(accelerator="cpu", devices=1, inference_mode=False, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[EditorCallback(UltraEdit(**FAST), sequential=True)])
    trainer.test(module, datamodule=EditDataModule(test=lambda: records, batch_size=1), verbose=False)
    rows = [json.loads(x) for x in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all("final" in r for r in rows)
    summary = module.summary
    assert summary["post/efficacy_score"] >= summary["pre/efficacy_score"]
    assert "final/reliability" in summary and "post/locality" in summary
    assert_state_equal(bundle.model, before)
    assert _no_hooks(bundle.model)
