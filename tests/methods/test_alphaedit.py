"""AlphaEdit on tiny models: the update formula, the null-space constraint, the stream state."""

import dataclasses
import json

import lightning as L
import pytest
import torch

import editlab.methods.alphaedit as alphaedit_module
from editlab.data.datamodule import EditDataModule
from editlab.evaluation.teacher_forced import score_pairs
from editlab.lit.callbacks import EditorCallback
from editlab.lit.edit_eval import EditEvalModule
from editlab.methods.alphaedit import AlphaEdit, alphaedit_update, null_space_projection
from editlab.methods.base import EditError, WeightEditSession
from editlab.methods.keyvalue import mean_keys
from editlab.methods.memit import MEMIT
from editlab.models.arch import arch_for, get_module
from editlab.stats import layer_stats

from conftest import assert_state_equal, make_records, state_copy

LAYERS = [1, 2]  # inner blocks of the 4-block tiny models: the model identity (stats cache key) stays



pytestmark = pytest.mark.usefixtures("template_cache")


# tiny Llama keys: second-moment eigenvalues 0.06 ... 3.9, median 0.38: the threshold 0.4 keeps about half
FAST = dict(layers=LAYERS, fact_token="last", v_num_grad_steps=30, v_lr=0.5, v_weight_decay=1e-3,
            clamp_norm_factor=20.0, nullspace_threshold=0.4, L2=1.0, context_template_length_params=((5, 2),),
            template_prompts=("The", "I"))


def _alpha(corpus, tmp_path, **kw):
    return AlphaEdit(**{**FAST, "mom2_corpus": corpus, "stats_cache_dir": str(tmp_path / "stats"), **kw})


def _nll(bundle, recs):
    return score_pairs(bundle.model, bundle.tokenizer, [r.prompt for r in recs], [r.target_new for r in recs]).nll


def _layer_deltas(model, deltas):
    """``{layer: ΔW [d_out, d_in]}`` from deltas in the parameters' layout."""
    spec = arch_for(model)
    out = {}
    for layer in LAYERS:
        path = spec.module_path(model, "mlp_out", layer)
        delta = deltas[f"{path}.weight"].double()
        out[layer] = delta.T if spec.transposed else delta
    return out


# ------------------------------------------------------------------------------ the algebra
def test_projection_is_onto_the_small_eigenvalues():
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64))
    values = torch.tensor([5.0, 3.0, 1.0, 0.5, 0.2, 0.05, 0.01, 0.005, 0.001, 1e-4], dtype=torch.float64)
    mom2 = basis @ torch.diag(values) @ basis.T
    proj = null_space_projection(mom2, 0.02)
    kept = basis[:, values < 0.02]
    torch.testing.assert_close(proj, kept @ kept.T)
    torch.testing.assert_close(proj @ proj, proj)
    assert round(float(torch.trace(proj))) == 4
    assert (proj @ basis[:, :6]).abs().max() < 1e-12  # the dominant directions are projected out


def test_update_solves_the_reference_system_and_stays_in_the_null_space():
    """Δ = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + L2 I)⁻¹: ΔP = Δ, Δ(I − P) = 0, and ΔP is the minimiser of
    ‖ΔP K − R‖² + ‖ΔP K_p‖² + L2 ‖ΔP‖² (its gradient, projected, vanishes)."""
    g = torch.Generator().manual_seed(1)
    d_in, d_out, n, n_p, l2 = 12, 7, 3, 5, 2.0
    basis, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64))
    proj = basis[:, :7] @ basis[:, :7].T
    keys = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    earlier = torch.randn(d_in, n_p, generator=g, dtype=torch.float64)
    resid = torch.randn(d_out, n, generator=g, dtype=torch.float64)
    upd = alphaedit_update(keys, resid, proj, earlier @ earlier.T, l2)
    # the reference: X = solve(P (K Kᵀ + K_p K_pᵀ) + L2 I, P K Rᵀ), Δ = Xᵀ
    system = proj @ (keys @ keys.T + earlier @ earlier.T) + l2 * torch.eye(d_in, dtype=torch.float64)
    ref = torch.linalg.solve(system, proj @ keys @ resid.T).T
    torch.testing.assert_close(upd, ref)
    torch.testing.assert_close(upd @ proj, upd)
    assert (upd @ basis[:, 7:]).abs().max() < 1e-12
    grad = ((upd @ keys - resid) @ keys.T + upd @ earlier @ earlier.T + l2 * upd) @ proj
    assert grad.abs().max() < 1e-10
    # the earlier keys pull the update towards leaving them alone
    fresh = alphaedit_update(keys, resid, proj, None, l2)
    assert (upd @ earlier).norm() < (fresh @ earlier).norm()


# ------------------------------------------------------------------------------ on a model
@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_edit_takes_and_restores(tiny_deep, corpus, tmp_path, model_type):
    bundle = tiny_deep(model_type)
    recs = make_records()[:2]
    before = state_copy(bundle.model)
    s0 = _nll(bundle, recs)
    threshold = 0.4 if model_type == "llama" else 0.05  # about half the key dimensions of each model
    with _alpha(corpus, tmp_path, nullspace_threshold=threshold).apply(bundle.model, bundle.tokenizer, recs) as s:
        s1 = _nll(bundle, recs)
        assert len(s.deltas) == 2
        assert s.stream_state["edits"] == 2
    assert (s1 < s0).all(), (s0, s1)
    assert_state_equal(bundle.model, before)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in bundle.model.modules())


def test_update_lies_in_the_null_space_of_the_preserved_keys(tiny_deep, corpus, tmp_path):
    """ΔW vanishes on the dominant eigenvectors of the keys' second moment C₀ (those outside the
    null space), so on the corpus keys ‖ΔW k₀‖² averages at most threshold · ‖ΔW‖²; MEMIT's
    update on the same records has a large part there."""
    bundle = tiny_deep("llama")
    recs = make_records()[:2]
    editor = _alpha(corpus, tmp_path)
    deltas = _layer_deltas(bundle.model, editor.compute_edit(bundle.model, bundle.tokenizer, recs).deltas)
    shared = {k: v for k, v in FAST.items() if k not in ("nullspace_threshold", "L2")}
    memit = MEMIT(**shared, mom2_update_weight=1.0, mom2_corpus=corpus, stats_cache_dir=str(tmp_path / "stats"))
    free = _layer_deltas(bundle.model, memit.compute_deltas(bundle.model, bundle.tokenizer, recs))
    moments = layer_stats(bundle.model, bundle.tokenizer, LAYERS, corpus, cache_dir=tmp_path / "stats",
                          dtype=torch.float32, progress=False)
    for layer in LAYERS:
        c0 = moments[layer].mom2.double()
        values, vectors = torch.linalg.eigh(c0)
        preserved = vectors[:, values >= FAST["nullspace_threshold"]]
        assert 0 < preserved.shape[1] < c0.shape[0]
        delta = deltas[layer]
        assert delta.norm() > 0
        assert (delta @ preserved).norm() < 1e-5 * delta.norm()
        energy = torch.trace(delta @ c0 @ delta.T) / delta.norm() ** 2  # E‖Δ k₀‖² / ‖Δ‖²
        assert energy <= FAST["nullspace_threshold"]
        assert (free[layer] @ preserved).norm() > 0.1 * free[layer].norm()


def test_projection_is_cached_per_process(tiny_deep, corpus, tmp_path):
    bundle = tiny_deep("llama")
    a = _alpha(corpus, tmp_path).projections(bundle.model, bundle.tokenizer)
    b = _alpha(corpus, tmp_path).projections(bundle.model, bundle.tokenizer)  # another editor object
    assert all(a[layer] is b[layer] for layer in LAYERS)
    c = _alpha(corpus, tmp_path, nullspace_threshold=0.2).projections(bundle.model, bundle.tokenizer)
    assert all(torch.trace(c[layer]) < torch.trace(a[layer]) for layer in LAYERS)


def test_the_state_accumulates_the_keys_and_the_next_edit_uses_it(tiny_deep, corpus, tmp_path, monkeypatch):
    bundle = tiny_deep("llama")
    model, tok = bundle.model, bundle.tokenizer
    recs = make_records()
    before = state_copy(model)
    calls: list[torch.Tensor] = []  # the keys of every layer solve, in order
    solve = alphaedit_module.alphaedit_update

    def spy(keys, resid, proj, earlier, l2):
        calls.append(keys.clone())
        return solve(keys, resid, proj, earlier, l2)

    monkeypatch.setattr(alphaedit_module, "alphaedit_update", spy)
    editor = _alpha(corpus, tmp_path)
    templates = editor.templates(model, tok)
    session = WeightEditSession(model)
    try:
        first = editor.edit_in(session, tok, recs[:1])
        seen = calls[-len(LAYERS):]
        state1 = first.state
        assert state1["layers"] == LAYERS and state1["edits"] == 1
        for i, gram in enumerate(state1["grams"]):
            torch.testing.assert_close(gram.double(), seen[i] @ seen[i].T, atol=1e-5, rtol=1e-5)
        # the lowest edited layer's keys do not depend on any edit: recompute them on the bare model
        keys, _, _ = mean_keys(model, tok, recs[:1], templates, [LAYERS[0]], fact_token="last")
        torch.testing.assert_close(state1["grams"][0].double(), keys[LAYERS[0]].T.cpu() @ keys[LAYERS[0]].cpu(),
                                   atol=1e-5, rtol=1e-5)
        session.apply(first)
        assert session.stream_state is state1
        fresh = editor.compute_edit(model, tok, recs[1:2])  # the same edit as a stream's first
        second = editor.edit_in(session, tok, recs[1:2])
        seen = calls[-len(LAYERS):]
        assert second.state["edits"] == 2
        for i, (old, new) in enumerate(zip(state1["grams"], second.state["grams"])):
            torch.testing.assert_close(new.double() - old.double(), seen[i] @ seen[i].T, atol=1e-5, rtol=1e-5)
        assert all(not torch.allclose(second.deltas[name], fresh.deltas[name]) for name in fresh.deltas)
        # a failed edit (the verifier refuses it) leaves the weights and the state of the first
        edited = state_copy(model)
        with pytest.raises(EditError, match="refused"):
            session.apply(second, verify=lambda s: (_ for _ in ()).throw(EditError("refused")))
        assert session.stream_state is state1
        assert_state_equal(model, edited)
        # so does an edit the editor cannot compute
        broken = dataclasses.replace(recs[1], subject="nowhere in the prompt")
        with pytest.raises(EditError, match="subject"):
            session.apply(editor.edit_in(session, tok, [broken]))
        assert session.stream_state is state1
        assert_state_equal(model, edited)
        session.apply(second)
        assert session.stream_state["edits"] == 2
        path = tmp_path / "state.pt"  # what a stream checkpoint holds
        torch.save(session.stream_state, path)
        loaded = torch.load(path, weights_only=True)
        assert loaded["layers"] == LAYERS
        assert all(torch.equal(a, b) for a, b in zip(loaded["grams"], second.state["grams"]))
        assert not any(isinstance(v, torch.Tensor) for v in vars(editor).values())  # no state on the editor
    finally:
        session.restore()
    assert session.stream_state is None
    assert_state_equal(model, before)


def test_a_state_of_other_layers_is_refused(tiny_deep, corpus, tmp_path, records):
    bundle = tiny_deep("llama")
    state = {"layers": [1], "grams": [torch.zeros(64, 64)], "edits": 1}
    with pytest.raises(EditError, match="layers"):
        _alpha(corpus, tmp_path).compute_edit(bundle.model, bundle.tokenizer, records[:1], state=state)
    d_in = arch_for(bundle.model).weight_out_in(
        get_module(bundle.model, arch_for(bundle.model).module_path(bundle.model, "mlp_out", 1))).shape[1]
    state = {"layers": LAYERS, "grams": [torch.zeros(d_in, d_in), torch.zeros(3, 3)], "edits": 1}
    with pytest.raises(EditError, match="Gram"):
        _alpha(corpus, tmp_path).compute_edit(bundle.model, bundle.tokenizer, records[:1], state=state)


def test_sequential_stream_through_the_edit_loop(tiny_deep, corpus, tmp_path):
    bundle = tiny_deep("llama")
    before = state_copy(bundle.model)
    recs = make_records()
    editor = _alpha(corpus, tmp_path)
    received = []  # the stream state each edit of the loop is given
    compute = editor.compute_edit

    def spy(model, tokenizer, records, state=None):
        received.append(None if state is None else state["edits"])
        return compute(model, tokenizer, records, state=state)

    editor.compute_edit = spy
    module = EditEvalModule(bundle, output_dir=str(tmp_path / "out"), score_after_stream=True)
    trainer = L.Trainer(accelerator="cpu", devices=1, inference_mode=False, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[EditorCallback(editor, sequential=True)])
    trainer.test(module, datamodule=EditDataModule(test=lambda: recs, batch_size=1), verbose=False)
    rows = [json.loads(x) for x in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    assert_state_equal(bundle.model, before)
    assert received == [None, 1, 2]  # each edit builds on the keys of the ones before
    assert len(rows) == 3 and all(r["edit_seconds"] > 0 for r in rows)
    summary = module.summary
    assert summary["post/reliability"] > summary["pre/reliability"]
    assert "final/reliability" in summary
