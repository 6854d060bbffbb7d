import pytest
import torch

from editlab.methods.base import EditError, WeightEditSession, applied

from conftest import assert_state_equal, state_copy


def _deltas(model, scale=0.1):
    names = [n for n, p in model.named_parameters() if p.dim() == 2][:2]
    return {n: torch.full_like(model.get_parameter(n), scale) for n in names}


def test_apply_and_restore_bit_exact(tiny):
    model = tiny("gpt2").model
    before = state_copy(model)
    deltas = _deltas(model)
    with applied(model, deltas):
        name = next(iter(deltas))
        assert torch.allclose(model.get_parameter(name), before[name] + 0.1)
    assert_state_equal(model, before)


def test_restore_after_exception(tiny):
    model = tiny("gpt2").model
    before = state_copy(model)
    with pytest.raises(RuntimeError):
        with applied(model, _deltas(model)):
            raise RuntimeError("failure inside the edited block")
    assert_state_equal(model, before)


@pytest.mark.parametrize("bad", ["shape", "name", "nan"])
def test_invalid_delta_leaves_model_unchanged(tiny, bad):
    model = tiny("gpt2").model
    before = state_copy(model)
    deltas = _deltas(model)
    second = list(deltas)[1]
    if bad == "shape":
        deltas[second] = torch.zeros(3, 3)
    elif bad == "name":
        deltas["no.such.weight"] = torch.zeros(3)
    else:
        deltas[second] = deltas[second].clone()
        deltas[second][0, 0] = float("nan")
    session = WeightEditSession(model)
    with pytest.raises(EditError):
        session.apply(deltas)
    assert not session.edited
    assert_state_equal(model, before)


def test_accumulate_suspend_restore(tiny):
    model = tiny("llama").model
    before = state_copy(model)
    session = WeightEditSession(model)
    session.apply(_deltas(model, 0.1))
    session.apply(_deltas(model, 0.2))
    edited = state_copy(model)
    with session.suspended():
        assert_state_equal(model, before)
    assert_state_equal(model, edited)
    session.restore()
    assert_state_equal(model, before)
