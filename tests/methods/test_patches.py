"""The shared FFN-like patch and the replay T-Patcher and CaliNet train it in."""

import pytest
import torch
from transformers.activations import ACT2FN

from editlab.methods.base import Edit, WeightEditSession, applied
from editlab.methods.patches import FFNPatch, HostReplay, attached, host_patches, resolve_layer
from editlab.methods.base import EditError
from editlab.models.arch import arch_for
from editlab.scoring import lm_head_input

from conftest import assert_state_equal, state_copy


def _patch(d: int, n: int = 3, gated: bool = False, seed: int = 0, scale: float = 1.0) -> FFNPatch:
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, d, generator=g) * scale
    gates = torch.randn(n, d, generator=g) * scale if gated else None
    return FFNPatch(keys=keys, values=torch.randn(n, d, generator=g), bias=torch.randn(n, generator=g),
                    gates=gates, activation="gelu_new" if gated else "relu", anchors=torch.randn(2, d, generator=g))


@pytest.mark.parametrize("gated", [False, True])
def test_ffn_patch_computes_the_documented_formula(gated):
    p = _patch(8, gated=gated)
    h = torch.randn(2, 5, 8, dtype=torch.float64)
    pre = h.float() @ p.keys.t() + p.bias
    slots = ACT2FN["gelu_new"](h.float() @ p.gates.t()) * pre if gated else torch.relu(pre)
    out = p(h)
    assert out.dtype == torch.float64 and out.shape == (2, 5, 8)
    assert torch.allclose(out.float(), slots @ p.values, atol=1e-5)
    assert torch.allclose(p.pre_activation(h), pre, atol=1e-5)
    assert not any(t.requires_grad for t in p.parameters())
    assert "anchors" not in p.state_dict() and p.anchors.shape == (2, 8)
    assert p.num_slots == 3


def test_ffn_patch_checks_shapes():
    with pytest.raises(ValueError):
        FFNPatch(keys=torch.zeros(2, 4), values=torch.zeros(3, 4))
    with pytest.raises(ValueError):
        FFNPatch(keys=torch.zeros(2, 4), values=torch.zeros(2, 4), bias=torch.zeros(3))
    with pytest.raises(ValueError):
        FFNPatch(keys=torch.zeros(2, 4), values=torch.zeros(2, 4), activation="nope")


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gemma3_text", "gpt_neox", "t5"])
def test_replay_equals_the_full_forward_with_the_patch_installed(tiny, records, model_type):
    """The training forward (blocks from the host's up replayed with a hooked patch function) gives
    exactly the LM-head inputs of a full forward with the patch installed by the session."""
    bundle = tiny(model_type)
    model = bundle.model
    before = state_copy(model)
    modules = [name for name, _ in model.named_modules()]
    layer = resolve_layer(model, -1, "test")
    replay = HostReplay(model, bundle.tokenizer, records[:2], layer, "test")
    patch = _patch(replay.inputs.shape[1], scale=0.5)
    replayed = replay.hidden(patch)
    with applied(model, Edit(patches={replay.host_path: patch})) as session:
        assert session.patches == [patch]
        full = lm_head_input(model, replay.batch)[replay.rows, replay.positions]
        assert host_patches(replay.host) == [patch]
    assert torch.allclose(replayed, full, atol=1e-5)
    assert not torch.allclose(replayed, replay.hidden(None), atol=1e-3)  # the patch mattered
    assert replay.host_path == arch_for(model).module_path(model, "mlp", layer)
    assert_state_equal(model, before)
    assert [name for name, _ in model.named_modules()] == modules
    assert host_patches(replay.host) == []


def test_attached_removes_its_hook_on_error(tiny, records):
    model = tiny("llama").model
    host = model.get_submodule("model.layers.1.mlp")

    def boom(h):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with attached(host, boom):
            model(input_ids=torch.tensor([[5, 6]]), use_cache=False)
    assert not host._forward_hooks


def test_resolve_layer_counts_from_the_end_and_checks_range(tiny):
    model = tiny("gpt2").model
    assert resolve_layer(model, -1, "x") == 1 and resolve_layer(model, 0, "x") == 0
    with pytest.raises(EditError, match="out of range"):
        resolve_layer(model, 2, "x")


def test_session_keeps_several_patches_on_one_host_and_removes_them_all(tiny, records):
    model = tiny("gpt2").model
    before = state_copy(model)
    path = "transformer.h.1.mlp"
    session = WeightEditSession(model)
    a, b = _patch(32, seed=1), _patch(32, seed=2)
    session.apply(Edit(patches={path: a}))
    session.apply(Edit(patches={path: b}))
    host = model.get_submodule(path)
    assert host_patches(host) == [a, b]
    assert any("editlab_patch_" in k for k in model.state_dict())
    session.restore()
    assert host_patches(host) == [] and not host._forward_hooks
    assert_state_equal(model, before)
