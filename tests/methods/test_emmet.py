import json

import lightning as L
import pytest
import torch

from editlab.data.datamodule import EditDataModule
from editlab.data.records import EditRecord
from editlab.evaluation.teacher_forced import score_pairs
from editlab.lit.callbacks import EditorCallback
from editlab.lit.edit_eval import EditEvalModule
from editlab.methods import emmet as emmet_module
from editlab.methods.base import EditError, WeightEditSession
from editlab.methods.emmet import EMMET, emmet_update
from editlab.methods.keyvalue import mean_keys
from editlab.methods.memit import memit_update
from editlab.models.arch import arch_for

from conftest import assert_state_equal, make_records, state_copy



pytestmark = pytest.mark.usefixtures("template_cache")


def _problem(d_in=12, d_out=7, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d_in, 4 * d_in, generator=g, dtype=torch.float64)
    cov = a @ a.T / a.shape[1]
    keys = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    resid = torch.randn(d_out, n, generator=g, dtype=torch.float64)
    return cov, keys, resid, g


# ----------------------------------------------------------------------------- the solve
def test_update_is_the_constrained_minimiser():
    """Without the regulariser ΔW K = R exactly, and ΔW has the least preservation cost
    tr(ΔW C ΔWᵀ) of all updates that meet the constraints."""
    cov, keys, resid, g = _problem()
    upd = emmet_update(keys, resid, cov, weight=1.0, emmet_lambda=0.0)
    torch.testing.assert_close(upd @ keys, resid, atol=1e-10, rtol=1e-10)
    null = torch.eye(keys.shape[0], dtype=torch.float64) - keys @ torch.linalg.pinv(keys)  # P K = 0

    def cost(w):
        return torch.trace(w @ cov @ w.T)

    for _ in range(5):
        other = upd + 1e-2 * torch.randn(upd.shape, generator=g, dtype=torch.float64) @ null
        torch.testing.assert_close(other @ keys, resid, atol=1e-10, rtol=1e-10)  # feasible too
        assert cost(other) > cost(upd)
    # the closed form of the reference: R (Kᵀ C⁻¹ K)⁻¹ Kᵀ C⁻¹
    c_inv = torch.linalg.inv(cov)
    torch.testing.assert_close(upd, resid @ torch.linalg.inv(keys.T @ c_inv @ keys) @ keys.T @ c_inv)


def test_regulariser_and_covariance_scale_as_in_the_reference():
    cov, keys, resid, _ = _problem()
    w, lam = 1000.0, 0.1
    upd = emmet_update(keys, resid, cov, weight=w, emmet_lambda=lam)
    d = keys.T @ torch.linalg.inv(w * cov) @ keys
    # the constraints hold up to the regulariser: ΔW K = R (D + λI)⁻¹ D
    eye = torch.eye(5, dtype=d.dtype)
    torch.testing.assert_close(upd @ keys, resid @ torch.linalg.inv(d + lam * eye) @ d)
    assert (upd @ keys - resid).norm() > 1e-6 * resid.norm()
    # without the regulariser the scale of C cancels
    torch.testing.assert_close(emmet_update(keys, resid, cov, weight=w, emmet_lambda=0.0),
                               emmet_update(keys, resid, cov, weight=1.0, emmet_lambda=0.0))
    # a single edit is never regularised (the reference adds λ only when n > 1)
    one = emmet_update(keys[:, :1], resid[:, :1], cov, weight=w, emmet_lambda=10.0)
    torch.testing.assert_close(one @ keys[:, :1], resid[:, :1])
    # update_norm_lambda adds ν I to the scaled C
    nu = emmet_update(keys, resid, cov, weight=2.0, emmet_lambda=0.0, update_norm_lambda=0.5)
    c_nu = torch.linalg.inv(2.0 * cov + 0.5 * torch.eye(12, dtype=cov.dtype))
    torch.testing.assert_close(nu, resid @ torch.linalg.inv(keys.T @ c_nu @ keys) @ keys.T @ c_nu)


def test_tighter_than_memit_least_squares():
    cov, keys, resid, _ = _problem()
    e = emmet_update(keys, resid, cov, weight=1.0, emmet_lambda=1e-8)
    m = memit_update(keys, resid, cov, 1.0)
    assert (e @ keys - resid).norm() < 1e-6 * resid.norm() < (m @ keys - resid).norm()


def test_batch_larger_than_the_key_dimension():
    """n > d_in: Kᵀ C⁻¹ K is singular.  The regulariser keeps it invertible (the paper's batches of
    10,000 in 6,400 key dimensions); without it the reference's pseudo-inverse is used, and ΔW K is
    then the best fit of R that the keys allow (its error is orthogonal to the range of D)."""
    cov, keys, resid, _ = _problem(d_in=8, n=20)
    reg = emmet_update(keys, resid, cov, emmet_lambda=0.1)
    assert torch.isfinite(reg).all()
    d = keys.T @ torch.linalg.inv(cov) @ keys
    eye = torch.eye(20, dtype=d.dtype)
    torch.testing.assert_close(reg @ keys, resid @ torch.linalg.inv(d + 0.1 * eye) @ d)
    pinv = emmet_update(keys, resid, cov, emmet_lambda=0.0)
    assert torch.isfinite(pinv).all()
    err = pinv @ keys - resid
    assert (err @ d).norm() < 1e-8 * resid.norm() * d.norm()
    assert err.norm() < resid.norm()  # some of R is met, not all (20 constraints, 8 dimensions)


# --------------------------------------------------------------------------- the editor
def _emmet(corpus, tmp_path, **kw):
    base = dict(layers=[0, 1], fact_token="last", v_num_grad_steps=30, v_lr=0.5, v_weight_decay=1e-3,
                clamp_norm_factor=20.0, mom2_update_weight=1.0, emmet_lambda=0.1,
                context_template_length_params=((5, 2),), template_prompts=("The", "I"), mom2_corpus=corpus,
                stats_cache_dir=str(tmp_path / "stats"))
    base.update(kw)
    return EMMET(**base)


def _nll(bundle, recs):
    prompts, targets = [r.prompt for r in recs], [r.target_new for r in recs]
    return score_pairs(bundle.model, bundle.tokenizer, prompts, targets).nll


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gptj"])  # gpt2: transposed (Conv1D) weights
def test_edit_takes_and_restores(tiny_deep, corpus, tmp_path, model_type):
    bundle = tiny_deep(model_type)
    recs = make_records()[:2]
    before = state_copy(bundle.model)
    s0 = _nll(bundle, recs)
    with _emmet(corpus, tmp_path).apply(bundle.model, bundle.tokenizer, recs) as session:
        s1 = _nll(bundle, recs)
        assert len(session.deltas) == 2
    assert (s1 < s0).all(), "every edited target's probability goes up"
    assert_state_equal(bundle.model, before)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in bundle.model.modules())


def test_constraints_hold_at_the_edited_layer(tiny_deep, corpus, tmp_path, monkeypatch):
    """One layer, a tiny regulariser: the edited projection maps the edited keys to the targets,
    W_new K₁ = W₀ K₁ + R = V₁, read off the model itself; MEMIT's least squares on the same keys,
    residuals and statistics misses them by far more."""
    bundle = tiny_deep("llama")
    recs = make_records()[:2]
    editor = _emmet(corpus, tmp_path, layers=[1], emmet_lambda=1e-10)
    seen = {}
    solve = editor.layer_update

    def spy(keys, residuals, cov):
        seen.update(keys=keys, residuals=residuals, cov=cov)
        return solve(keys, residuals, cov)

    monkeypatch.setattr(editor, "layer_update", spy)
    templates = editor.templates(bundle.model, bundle.tokenizer)
    keys0, outs0, _ = mean_keys(bundle.model, bundle.tokenizer, recs, templates, [1], fact_token="last")
    with editor.apply(bundle.model, bundle.tokenizer, recs):
        keys1, outs1, _ = mean_keys(bundle.model, bundle.tokenizer, recs, templates, [1], fact_token="last")
    torch.testing.assert_close(keys1[1], keys0[1])  # the layer's own keys do not move
    torch.testing.assert_close(seen["keys"], keys0[1].T.cpu())
    r = seen["residuals"]  # [d, n]
    reached = (outs1[1] - outs0[1]).T.cpu()  # W_new K₁ − W₀ K₁ (the outputs are linear in the keys)
    miss = (reached - r).norm() / r.norm()
    assert miss < 1e-4, miss  # float32 weights
    lsq = memit_update(seen["keys"], r, seen["cov"], editor.mom2_update_weight)
    memit_miss = (lsq @ seen["keys"] - r).norm() / r.norm()
    assert memit_miss > 100 * miss, (memit_miss, miss)


def test_batch_larger_than_the_key_dimension_through_the_editor(tiny_deep, corpus, tmp_path, monkeypatch):
    """More edits than the layer's key dimension (64): the regularised solve still gives a finite
    edit that moves the targets (the value optimisation is replaced by fixed residuals here)."""
    bundle = tiny_deep("llama")
    d_in = bundle.model.config.intermediate_size
    recs = [EditRecord(record_id=i, prompt=f"The word number {i} is", subject=f"number {i}", target_new="x")
            for i in range(d_in + 16)]
    editor = _emmet(corpus, tmp_path, layers=[1], fact_token="subject_last")
    site = arch_for(bundle.model).module_path(bundle.model, "residual", 1)
    g = torch.Generator().manual_seed(0)

    def fixed(model, tokenizer, records, templates):
        _, _, extras = mean_keys(model, tokenizer, records, templates, [1], extra_paths=[site])
        cur = extras[site].double().cpu()
        return cur + 0.5 * torch.randn(cur.shape, generator=g, dtype=torch.float64)

    monkeypatch.setattr(editor, "target_residuals", fixed)
    seen = {}
    solve = editor.layer_update

    def spy(k, r, c):
        seen["upd"] = (k, r, solve(k, r, c))
        return seen["upd"][2]

    monkeypatch.setattr(editor, "layer_update", spy)
    deltas = editor.compute_deltas(bundle.model, bundle.tokenizer, recs)
    ((name, delta),) = deltas.items()
    assert torch.isfinite(delta).all() and delta.abs().max() > 0
    k, r, upd = seen["upd"]
    assert k.shape[1] > k.shape[0]
    assert (upd @ k - r).norm() < r.norm()


def test_failed_edit_leaves_the_model_as_it_was(tiny_deep, corpus, tmp_path, monkeypatch):
    bundle = tiny_deep("llama")
    recs = make_records()[:2]
    before = state_copy(bundle.model)
    real = emmet_module.emmet_update
    calls = []

    def breaks_at_the_second_layer(*args, **kwargs):
        calls.append(1)
        upd = real(*args, **kwargs)
        return upd if len(calls) == 1 else upd * float("inf")

    monkeypatch.setattr(emmet_module, "emmet_update", breaks_at_the_second_layer)
    with pytest.raises(EditError):
        with _emmet(corpus, tmp_path, v_num_grad_steps=3).apply(bundle.model, bundle.tokenizer, recs):
            pass
    assert len(calls) == 2  # the first layer had been written (on the temporary model)
    assert_state_equal(bundle.model, before)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in bundle.model.modules())


def test_a_stream_edits_the_weights_the_earlier_batches_left(tiny_deep, corpus, tmp_path):
    """Not stateful: the second batch's keys and residuals are read on the model as the first batch
    left it, so its edit differs from the same batch on the bare model; both edits take, and the
    session restores bit-exactly."""
    bundle = tiny_deep("llama")
    recs = make_records()[:2]
    editor = _emmet(corpus, tmp_path, layers=[1])
    assert not editor.stateful
    before = state_copy(bundle.model)
    alone = editor.compute_deltas(bundle.model, bundle.tokenizer, recs[1:])
    s0 = _nll(bundle, recs)
    session = WeightEditSession(bundle.model)
    try:
        session.apply(editor.edit_in(session, bundle.tokenizer, recs[:1]))
        second = editor.edit_in(session, bundle.tokenizer, recs[1:])
        assert second.state is None
        (name, delta), = second.deltas.items()
        assert not torch.allclose(delta, alone[name])
        session.apply(second)
        s2 = _nll(bundle, recs)
    finally:
        session.restore()
    assert (s2 < s0).all()
    assert_state_equal(bundle.model, before)


def test_sequential_run_through_the_edit_loop(tiny_deep, corpus, tmp_path):
    bundle = tiny_deep("llama")
    recs = make_records()
    before = state_copy(bundle.model)
    editor = _emmet(corpus, tmp_path / "stats")
    module = EditEvalModule(bundle, output_dir=str(tmp_path), score_after_stream=True)
    trainer = L.Trainer(accelerator="cpu", devices=1, inference_mode=False, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[EditorCallback(editor, sequential=True)])
    trainer.test(module, datamodule=EditDataModule(test=lambda: recs, batch_size=2), verbose=False)
    rows = [json.loads(x) for x in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert_state_equal(bundle.model, before)
    summary = module.summary
    assert len(rows) == 3 and all("final" in r for r in rows)
    assert summary["post/reliability"] > summary["pre/reliability"]
    assert summary["edits/failed"] == 0
