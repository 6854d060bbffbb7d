"""The shared machinery of trained editors: edited forward, losses, gradients, binding, hooks."""

import copy

import pytest
import torch
from torch import nn

from editlab.data.collate import encode_pairs
from editlab.methods.base import EditError
from editlab.methods.hyper import (
    TrainableEditor,
    edit_gradients,
    edited_forward,
    last_mlp_weights,
    locality_kl,
    target_nll,
)
from editlab.methods.ke import KE
from editlab.methods.mend import MEND
from editlab.models.arch import arch_for
from editlab.tracing import GradientFactors

from conftest import assert_state_equal, make_records, state_copy


def _batch(bundle, records=None):
    records = records or make_records()
    return encode_pairs(bundle.tokenizer, [r.prompt for r in records], [r.target_new for r in records])


class _Shift(TrainableEditor):
    """A minimal trained editor: adds a learned matrix to each edited weight."""

    def build(self, model, params):
        self.shifts = nn.ParameterList(nn.Parameter(torch.zeros_like(p)) for p in params.values())

    def edited_parameters(self, model, batch, cond=None):
        named = dict(model.named_parameters())
        return {n: named[n].detach() + s for n, s in zip(self.edit_params, self.shifts)}


def test_edited_forward_substitutes_without_writing(tiny):
    bundle = tiny("llama")
    model, batch = bundle.model, _batch(bundle)
    before = state_copy(model)
    name = last_mlp_weights(model, 1)[-1]
    weight = model.get_parameter(name)
    with torch.no_grad():
        plain = edited_forward(model, None, batch)
        assert torch.equal(plain, model(**batch.model_inputs(), use_cache=False).logits)
    shift = torch.zeros_like(weight, requires_grad=True)
    logits = edited_forward(model, {name: weight.detach() + shift}, batch)
    nll, _ = target_nll(logits, batch)
    nll.backward()
    assert shift.grad is not None and shift.grad.abs().sum() > 0, "gradient reaches the substituted tensor"
    with torch.no_grad():
        moved = edited_forward(model, {name: weight.detach() + 0.5}, batch)
    assert not torch.allclose(moved, plain)
    assert_state_equal(model, before)
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def test_target_nll_matches_a_loop(tiny):
    bundle = tiny("gpt2")
    batch = _batch(bundle)
    with torch.no_grad():
        logits = edited_forward(bundle.model, None, batch)
    nll, acc = target_nll(logits, batch)
    per_seq, hits, total = [], 0, 0
    for i in range(len(batch)):
        toks = []
        for j in range(int(batch.target_mask[i].sum())):
            logp = torch.log_softmax(logits[i, batch.positions[i, j]], -1)
            toks.append(-logp[batch.target_ids[i, j]])
            hits += int(logp.argmax() == batch.target_ids[i, j])
            total += 1
        per_seq.append(torch.stack(toks).mean())
    assert torch.allclose(nll, torch.stack(per_seq).mean(), atol=1e-6)
    assert acc.item() == pytest.approx(hits / total)


def test_locality_kl(tiny):
    bundle = tiny("gpt2")
    batch = _batch(bundle)
    with torch.no_grad():
        logits = edited_forward(bundle.model, None, batch)
    assert locality_kl(logits, logits, batch).item() == pytest.approx(0.0, abs=1e-7)
    assert locality_kl(logits, logits * 3, batch).item() > 1e-4


def _kl_at(pre, post, places):
    terms = []
    for i, j in places:
        p, q = torch.log_softmax(pre[i, j], -1), torch.log_softmax(post[i, j], -1)
        terms.append((p.exp() * (p - q)).sum())
    return torch.stack(terms).mean()


def test_locality_kl_positions_are_all_or_the_answers(tiny):
    """``all``: every real position of the locality input (MEND); ``answer``: the positions that
    predict the answer's tokens, the ones the locality metric reads."""
    bundle = tiny("gpt2")
    batch = _batch(bundle)
    torch.manual_seed(0)
    with torch.no_grad():
        pre = edited_forward(bundle.model, None, batch)
    post = pre + torch.randn_like(pre)
    real = [(i, j) for i in range(len(batch)) for j in range(pre.shape[1]) if batch.attention_mask[i, j]]
    answer = [(i, int(batch.positions[i, k])) for i in range(len(batch))
              for k in range(pre.shape[1]) if k < batch.target_mask.shape[1] and batch.target_mask[i, k]]
    assert 0 < len(answer) < len(real)
    torch.testing.assert_close(locality_kl(pre, post, batch), _kl_at(pre, post, real))
    torch.testing.assert_close(locality_kl(pre, post, batch, "all"), _kl_at(pre, post, real))
    torch.testing.assert_close(locality_kl(pre, post, batch, "answer"), _kl_at(pre, post, answer))
    # a change outside the answer positions moves the full KL only
    away = pre.clone()
    for i, j in set(real) - set(answer):
        away[i, j] += 3 * torch.randn_like(away[i, j])
    assert locality_kl(pre, away, batch, "answer").item() == pytest.approx(0.0, abs=1e-6)
    assert locality_kl(pre, away, batch, "all").item() > 1e-3
    with pytest.raises(ValueError, match="positions"):
        locality_kl(pre, post, batch, "prompt")


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_edit_gradients_equal_autograd_on_a_trainable_copy(tiny, model_type):
    bundle = tiny(model_type)
    model, batch = bundle.model, _batch(bundle)
    names = last_mlp_weights(model, 2)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    grads = edit_gradients(model, names, batch)
    trainable = copy.deepcopy(model)
    for n, p in trainable.named_parameters():
        p.requires_grad_(n in names)
    nll, _ = target_nll(trainable(**batch.model_inputs(), use_cache=False).logits, batch)
    nll.backward()
    for n in names:
        expected = trainable.get_parameter(n).grad
        assert torch.allclose(grads[n], expected, rtol=1e-5, atol=1e-8), n
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("model_type", ["gpt2", "gptj", "llama", "t5"])
def test_last_mlp_weights_come_from_the_arch_table(tiny, model_type):
    model = tiny(model_type).model
    spec = arch_for(model)
    names = last_mlp_weights(model, 3)
    total = spec.num_layers(model)
    expected = []
    for layer in range(max(0, total - 3), total):
        expected += [spec.module_path(model, "mlp_in", layer) + ".weight",
                     spec.module_path(model, "mlp_out", layer) + ".weight"]
    assert names == expected
    params = dict(model.named_parameters())
    assert all(n in params and params[n].dim() == 2 for n in names)
    assert last_mlp_weights(model, 1) == expected[-2:]


@pytest.mark.parametrize("editor_cls", [_Shift, MEND, KE])
def test_unknown_edit_param_is_named(tiny, editor_cls):
    model = tiny("gpt2").model
    editor = editor_cls(edit_params=["transformer.h.1.mlp.c_fc.weight", "transformer.h.9.mlp.c_fc.weight"])
    with pytest.raises(EditError, match=r"transformer\.h\.9\.mlp\.c_fc\.weight"):
        editor.bind(model)


def test_edit_params_validation(tiny):
    with pytest.raises(ValueError):
        _Shift(edit_params=[])
    with pytest.raises(ValueError):
        _Shift(edit_params="transformer.h.1.mlp.c_fc.weight")
    name = "transformer.h.1.mlp.c_fc.weight"
    with pytest.raises(ValueError, match="^edit_params must not repeat a value"):  # when built, not at bind
        _Shift(edit_params=[name, name])
    editor = _Shift(edit_params=[name])
    editor.edit_params = [name, name]
    with pytest.raises(EditError, match="more than once"):
        editor.bind(tiny("gpt2").model)


def test_default_edit_params_resolve_at_bind(tiny):
    model = tiny("llama").model
    editor = _Shift()
    assert editor.edit_params is None
    editor.bind(model)
    assert editor.edit_params == last_mlp_weights(model, 3)
    assert len(editor.shifts) == len(editor.edit_params)


def test_apply_dispatch_and_restore(tiny):
    bundle = tiny("gpt2")
    model = bundle.model
    editor = _Shift(edit_params=["transformer.h.1.mlp.c_proj.weight"])
    editor.bind(model)
    seen = []
    assert editor.apply(lambda m: seen.append(type(m).__name__)) is editor  # nn.Module.apply
    assert "_Shift" in seen
    with torch.no_grad():
        editor.shifts[0].fill_(0.25)
    before = state_copy(model)
    records = make_records()[:1]
    with editor.apply(model, bundle.tokenizer, records) as session:
        assert list(session.deltas) == ["transformer.h.1.mlp.c_proj.weight"]
        assert torch.allclose(model.get_parameter("transformer.h.1.mlp.c_proj.weight"),
                              before["transformer.h.1.mlp.c_proj.weight"] + 0.25)
    assert_state_equal(model, before)


def test_gradient_factors_hooks_always_removed(tiny):
    bundle = tiny("llama")
    model, batch = bundle.model, _batch(bundle)
    name = last_mlp_weights(model, 1)[0]
    path = name.rpartition(".")[0]
    module = model.get_submodule(path)
    leaf = model.get_parameter(name).detach().requires_grad_(True)
    with GradientFactors(model, [path]) as capture:
        nll, _ = target_nll(edited_forward(model, {name: leaf}, batch), batch)
        torch.autograd.grad(nll, capture.grad_targets())
    x, delta = capture.factors(path)
    assert x.shape[-1] == module.in_features and delta.shape[-1] == module.out_features
    assert x.shape[0] == delta.shape[0] == batch.input_ids.numel()
    assert not module._forward_hooks
    with pytest.raises(RuntimeError, match="boom"):
        with GradientFactors(model, [path]):
            raise RuntimeError("boom")
    assert not module._forward_hooks
    with pytest.raises(KeyError):
        GradientFactors(model, [path]).factors(path)
