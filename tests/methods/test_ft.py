import pytest
import torch

from editlab.methods.base import EditError
from editlab.methods.ft import FTL
from editlab.evaluation.teacher_forced import score_pairs

from conftest import CAUSAL_TYPES, assert_state_equal, state_copy


def _p_target(bundle, rec):
    s = score_pairs(bundle.model, bundle.tokenizer, [rec.prompt], [rec.target_new])
    return float(torch.exp(-s.nll[0])), bool((s.pred[0] == s.target[0])[s.mask[0]].all())


@pytest.mark.parametrize("model_type", CAUSAL_TYPES + ("t5",))
@pytest.mark.parametrize("objective", ["prompt_last", "teacher_forced"])
def test_ft_edit_happens_and_weights_restore(tiny, records, model_type, objective):
    bundle = tiny(model_type)
    rec = records[0]
    before = state_copy(bundle.model)
    p0, hit0 = _p_target(bundle, rec)
    editor = FTL(layers=[1], lr=0.05, num_steps=100, objective=objective)
    with editor.apply(bundle.model, bundle.tokenizer, [rec]) as session:
        deltas = session.deltas
        p1, hit1 = _p_target(bundle, rec)
        assert len(deltas) == 1
    assert p1 > p0
    if objective == "teacher_forced":
        assert hit1, "teacher-forced efficacy on the edited prompt"
    assert editor.last_losses[-1] < editor.last_losses[0]
    assert_state_equal(bundle.model, before)


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gemma3_text"])
def test_replay_equals_full_forward(tiny, records, model_type):
    bundle = tiny(model_type)
    losses = []
    for replay in (True, False):
        ed = FTL(layers=[1], lr=0.01, num_steps=3, replay=replay, objective="teacher_forced")
        d = ed.compute_deltas(bundle.model, bundle.tokenizer, records[:2])
        losses.append((ed.last_losses, d))
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-4, abs=1e-5)
    for name in losses[0][1]:
        assert torch.allclose(losses[0][1][name], losses[1][1][name], atol=1e-6)


def test_norm_constraint_bounds_update(tiny, records):
    bundle = tiny("gpt2")
    d = FTL(layers=[0], lr=0.1, num_steps=5, norm_constraint=1e-3).compute_deltas(
        bundle.model, bundle.tokenizer, records[:1])
    (delta,) = d.values()
    assert delta.abs().max() <= 1e-3 + 1e-9 and delta.abs().max() > 0


def test_failure_midway_leaves_model_unchanged(tiny, records, monkeypatch):
    bundle = tiny("llama")
    before = state_copy(bundle.model)
    import editlab.methods.ft as ft

    calls = {"n": 0}
    real = ft.head_nll

    def failing(model, hidden, targets):
        calls["n"] += 1
        if calls["n"] == 3:
            return real(model, hidden, targets) * float("nan")
        return real(model, hidden, targets)

    monkeypatch.setattr(ft, "head_nll", failing)
    with pytest.raises(EditError, match="step 2"):
        with FTL(layers=[1], lr=0.05, num_steps=10).apply(bundle.model, bundle.tokenizer, records[:1]):
            pass
    assert_state_equal(bundle.model, before)


def test_bad_layer_is_a_clear_error(tiny, records):
    bundle = tiny("gpt2")
    with pytest.raises(EditError, match="out of range"):
        FTL(layers=[99]).compute_deltas(bundle.model, bundle.tokenizer, records[:1])
    with pytest.raises(ValueError, match="objective"):
        FTL(objective="nope")
