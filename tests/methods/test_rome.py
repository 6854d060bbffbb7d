import pytest
import torch

from editlab.methods.base import EditError
from editlab.methods.rome import ROME
from editlab.models.arch import arch_for, get_module
from editlab.evaluation.teacher_forced import score_pairs

from conftest import CAUSAL_TYPES, assert_state_equal, make_records, state_copy

TEMPLATES = ((5, 2),)  # two short generated templates: fast, and still an average over three



def _rome(corpus, tmp_path, **kw):
    # tiny random models cannot carry an edit from the subject to the answer position through
    # their diffuse attention, so the efficacy tests edit at the answer position (fact_token=last)
    base = dict(layers=[1], fact_token="last", v_num_grad_steps=30, v_lr=0.5, v_weight_decay=1e-3, clamp_norm_factor=20.0,
                context_template_length_params=TEMPLATES, template_prompts=("The", "I"),
                mom2_corpus=corpus, stats_cache_dir=str(tmp_path / "stats"))
    base.update(kw)
    return ROME(**base)


def _scores(bundle, rec):
    s = score_pairs(bundle.model, bundle.tokenizer, [rec.prompt, rec.prompt], [rec.target_new, rec.target_true])
    return s.nll.tolist(), bool((s.pred[0] == s.target[0])[s.mask[0]].all())


pytestmark = pytest.mark.usefixtures("template_cache")


@pytest.mark.parametrize("model_type", CAUSAL_TYPES)
def test_rome_edit_happens_and_weights_restore(tiny_deep, corpus, tmp_path, model_type):
    bundle = tiny_deep(model_type)
    rec = make_records()[0]
    before = state_copy(bundle.model)
    (nll_new0, nll_true0), _ = _scores(bundle, rec)
    editor = _rome(corpus, tmp_path)
    with editor.apply(bundle.model, bundle.tokenizer, [rec]) as session:
        deltas = session.deltas
        (nll_new1, nll_true1), _ = _scores(bundle, rec)
        s = score_pairs(bundle.model, bundle.tokenizer, [rec.prompt], [rec.target_new])
        hit_first = bool(s.pred[0, 0] == s.target[0, 0])
        spec = arch_for(bundle.model)
        assert list(deltas) == [spec.module_path(bundle.model, "mlp_out", 1) + ".weight"]
        sv = torch.linalg.svdvals(next(iter(deltas.values())).double())
        assert sv[1] < 1e-5 * sv[0], "a rank-one update"
    assert nll_new1 < nll_new0 - 1.0, "target probability up"
    assert nll_new1 < nll_true1, "efficacy: new target beats the old one"
    if model_type not in ("gemma2", "gemma3_text"):
        # (Gemma-2/3 normalise the MLP output before the residual: a tiny random model's RMSNorm
        # weights bound how far one edited value can move the logits)
        assert hit_first, "the first target token is now the argmax at the edited prompt"
    assert_state_equal(bundle.model, before)


@pytest.mark.parametrize("r_rome", [False, True])
@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_rank_one_update_maps_key_to_value(tiny_deep, corpus, tmp_path, model_type, r_rome):
    """(W + w uᵀ) k̂ (+ b) = v*: the defining equation of ROME's update."""
    bundle = tiny_deep(model_type)
    rec = make_records()[1]
    editor = _rome(corpus, tmp_path, r_rome=r_rome, fact_token="subject_last")
    templates = editor.templates(bundle.model, bundle.tokenizer)
    u, w, parts = editor.rank_one(bundle.model, bundle.tokenizer, rec, 1, templates)
    spec = arch_for(bundle.model)
    module = get_module(bundle.model, spec.module_path(bundle.model, "mlp_out", 1))
    weight = spec.weight_out_in(module).double() + torch.outer(w, u)
    out = weight @ parts["k_hat"]
    if getattr(module, "bias", None) is not None:
        out = out + module.bias.double()
    torch.testing.assert_close(out, parts["v_star"], atol=1e-6, rtol=1e-6)
    assert abs(u.norm().item() - 1) < 1e-9
    if r_rome:
        torch.testing.assert_close(parts["k_hat"], parts["k_star"])
    # u is C⁻¹ k* (normalised): C u ∥ k*
    c = editor.stats.mom2(bundle.model, bundle.tokenizer, [1])[1]
    cu = c @ u
    cos = torch.dot(cu, parts["k_star"]) / (cu.norm() * parts["k_star"].norm())
    assert cos > 1 - 1e-6


def test_batch_edits_apply_in_sequence_and_model_untouched(tiny_deep, corpus, tmp_path):
    bundle = tiny_deep("llama")
    recs = make_records()[:2]
    before = state_copy(bundle.model)
    editor = _rome(corpus, tmp_path)
    deltas = editor.compute_deltas(bundle.model, bundle.tokenizer, recs)
    assert_state_equal(bundle.model, before)
    assert len(editor.last_losses) == 2
    delta = next(iter(deltas.values())).double()
    sv = torch.linalg.svdvals(delta)
    assert sv[1] > 1e-3 * sv[0] and sv[2] < 1e-5 * sv[0], "two rank-one updates summed"
    with editor.apply(bundle.model, bundle.tokenizer, recs):
        for rec in recs:
            (nll_new, nll_true), _ = _scores(bundle, rec)
            assert nll_new < nll_true
    assert_state_equal(bundle.model, before)


def test_without_mom2_adjustment_needs_no_statistics(tiny_deep, tmp_path):
    bundle = tiny_deep("gpt2")
    editor = ROME(layers=[0], v_num_grad_steps=3, mom2_adjustment=False, context_template_length_params=TEMPLATES,
                  stats_cache_dir=str(tmp_path / "never"))
    editor.compute_deltas(bundle.model, bundle.tokenizer, make_records()[:1])
    assert not (tmp_path / "never").exists()


def test_rome_errors_name_record_and_field(tiny, tiny_deep, corpus, tmp_path):
    bundle = tiny_deep("llama")
    rec = make_records()[0]
    bad = rec.__class__(**{**rec.__dict__, "subject": "Spain", "record_id": "cf-9"})
    before = state_copy(bundle.model)
    with pytest.raises(EditError, match=r"record 'cf-9'.*subject"):
        _rome(corpus, tmp_path).compute_deltas(bundle.model, bundle.tokenizer, [bad])
    with pytest.raises(EditError, match="out of range"):
        _rome(corpus, tmp_path, layers=[9]).compute_deltas(bundle.model, bundle.tokenizer, [rec])
    with pytest.raises(EditError, match="decoder-only"):
        _rome(corpus, tmp_path).compute_deltas(tiny("t5").model, tiny("t5").tokenizer, [rec])
    assert_state_equal(bundle.model, before)
