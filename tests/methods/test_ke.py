"""KE on tiny random models: conditioned updates, the Lagrange multiplier, training, no writes."""

import pytest
import torch

from editlab.data.collate import EditBatchCollator
from editlab.methods.base import EditError
from editlab.methods.hyper import edit_gradients, edited_forward, last_mlp_weights, target_nll
from editlab.methods.ke import KE, _ConditionedParameter, _ReverseGrad, _smoothed_nll

from conftest import assert_state_equal, make_records, state_copy


def _batch(bundle, records=None):
    return EditBatchCollator(bundle.tokenizer)(records or make_records())


def _step(editor, bundle, batch, optimizer):
    out = editor.training_losses(bundle.model, batch)
    optimizer.zero_grad()
    out["loss"].backward()
    optimizer.step()
    return out


def _ke(model, **kw):
    torch.manual_seed(0)
    base = dict(hidden_dim=16, condition_dim=32)
    base.update(kw)
    editor = KE(**base)
    editor.bind(model)
    return editor


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_update_depends_on_the_condition_and_the_edit(tiny, model_type):
    bundle = tiny(model_type)
    model = bundle.model
    editor = _ke(model)
    editor.eval()
    collate = EditBatchCollator(bundle.tokenizer)
    first, second = (collate([r]).edit for r in make_records()[:2])
    base = editor.updates(model, first)
    other_condition = editor.updates(model, first, cond=second)
    other_edit = editor.updates(model, second)
    for name in editor.edit_params:
        assert base[name].shape == model.get_parameter(name).shape
        assert base[name].abs().max() > 0
        # same gradient, another condition: another update
        assert (base[name] - other_condition[name]).abs().max() > 1e-3 * base[name].abs().max(), name
        assert not torch.allclose(base[name], other_edit[name]), name
    assert torch.equal(editor.updates(model, first)[editor.edit_params[0]], base[editor.edit_params[0]])


def test_conditioned_parameter_is_the_reference_formula():
    torch.manual_seed(0)
    cp = _ConditionedParameter(torch.Size([3, 5]), condition_dim=4, hidden_dim=6, max_scale=0.5)
    condition, grad = torch.randn(1, 4), torch.randn(3, 5)
    col_a, row_a, col_b, row_b, norm = cp.net(condition).split([5, 3, 5, 3, 1], dim=-1)
    a = row_a.softmax(-1).t() @ col_a
    b = row_b.softmax(-1).t() @ col_b
    expected = 0.5 * norm.sigmoid() * (grad * a + b)
    assert torch.allclose(cp(condition, grad), expected, atol=1e-7)
    bias = _ConditionedParameter(torch.Size([5]), condition_dim=4, hidden_dim=6, max_scale=1.0)
    assert bias(condition, torch.randn(5)).shape == (5,)


def test_reverse_grad_and_smoothed_nll(tiny):
    x = torch.tensor(2.0, requires_grad=True)
    (_ReverseGrad.apply(x) * 3.0).backward()
    assert x.grad.item() == -3.0
    bundle = tiny("gpt2")
    batch = _batch(bundle).edit
    with torch.no_grad():
        logits = edited_forward(bundle.model, None, batch)
    plain, acc = target_nll(logits, batch)
    assert torch.equal(_smoothed_nll(logits, batch, 0.0)[0], plain)
    smoothed, acc_s = _smoothed_nll(logits, batch, 0.1)
    assert acc_s == acc and smoothed.item() != pytest.approx(plain.item())


@pytest.mark.parametrize("margin,direction", [(0.0, 1), (10.0, -1)])
def test_multiplier_ascends_on_violation_and_descends_otherwise(tiny, margin, direction):
    """One optimiser step on ``loss``: the multiplier grows when KL > margin (margin 0) and shrinks
    when the constraint holds (margin 10), while the editor descends."""
    bundle = tiny("gpt2")
    editor = _ke(bundle.model, margin=margin, lr_multiplier=0.1)
    editor.train()
    batch = _batch(bundle)
    optimizer = torch.optim.SGD(editor.optimizer_groups(1e-3))
    out = _step(editor, bundle, batch, optimizer)
    kl = out["loss_loc"].item()
    assert kl > 0
    assert editor.multiplier.grad.item() == pytest.approx(-(kl - margin), rel=1e-4)
    assert (editor.multiplier.item() - 1.0) * direction > 0
    assert out["multiplier"].item() == 1.0 and out["margin"].item() == pytest.approx(margin)


def test_multiplier_is_projected_and_margin_anneals(tiny):
    bundle = tiny("gpt2")
    editor = _ke(bundle.model, margin=1e-3, margin_min=5e-4)
    with torch.no_grad():
        editor.multiplier.fill_(-2.0)
    out = editor.training_losses(bundle.model, _batch(bundle))
    assert out["multiplier"].item() == 0.0 and editor.multiplier.item() == 0.0
    assert editor.anneal_margin(0.5) == pytest.approx(1e-3)
    assert editor.anneal_margin(0.95) == pytest.approx(8e-4)
    assert editor.anneal_margin(0.95) == pytest.approx(6.4e-4)
    assert editor.anneal_margin(0.95) == pytest.approx(5.12e-4)
    assert editor.anneal_margin(0.95) == pytest.approx(5e-4), "never below margin_min"
    assert "margin" in editor.state_dict()


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_training_step_changes_the_editor_and_never_the_model(tiny, model_type):
    bundle = tiny(model_type)
    model = bundle.model
    before = state_copy(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    editor = _ke(model)
    editor.train()
    start = {n: p.detach().clone() for n, p in editor.named_parameters()}
    optimizer = torch.optim.Adam(editor.optimizer_groups(1e-3))
    out = _step(editor, bundle, _batch(bundle), optimizer)
    assert {"loss", "loss_edit", "loss_loc", "edit_acc", "loc_acc", "multiplier", "margin"} <= set(out)
    unchanged = [n for n, p in editor.named_parameters() if torch.equal(p.detach(), start[n])]
    assert not unchanged, f"editor parameters left unchanged: {unchanged}"
    assert_state_equal(model, before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    groups = editor.optimizer_groups(1e-3)
    assert groups[1]["params"] == [editor.multiplier] and groups[1]["weight_decay"] == 0.0
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in editor.parameters())


def test_compute_deltas_and_apply_restore_bit_exactly(tiny):
    bundle = tiny("gptj")
    model = bundle.model
    before = state_copy(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    editor = _ke(model, edit_params=last_mlp_weights(model, 1))
    records = make_records()
    deltas = editor.compute_deltas(model, bundle.tokenizer, records)
    assert sorted(deltas) == sorted(editor.edit_params)
    for name, delta in deltas.items():
        assert delta.shape == model.get_parameter(name).shape and delta.abs().max() > 0
    assert_state_equal(model, before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    with editor.apply(model, bundle.tokenizer, records) as session:
        for name, delta in session.deltas.items():
            assert torch.equal(model.get_parameter(name), before[name] + delta)
    assert_state_equal(model, before)
    # the gradient the editor reads is the edit loss's
    grads = edit_gradients(model, editor.edit_params, editor.encode(bundle.tokenizer, model, records))
    assert all(g.abs().max() > 0 for g in grads.values())


def test_training_raises_the_target_probability(tiny_deep):
    bundle = tiny_deep("gpt2")
    collate = EditBatchCollator(bundle.tokenizer)
    batches = [collate([r]) for r in make_records()]
    editor = _ke(bundle.model, hidden_dim=64, condition_dim=64)

    def edit_nll():
        editor.eval()
        total = 0.0
        for batch in batches:
            new = editor.edited_parameters(bundle.model, batch.edit)
            with torch.no_grad():
                logits = edited_forward(bundle.model, {n: v.detach() for n, v in new.items()}, batch.edit)
                total += target_nll(logits, batch.edit)[0].item()
        editor.train()
        return total / len(batches)

    start = edit_nll()
    optimizer = torch.optim.Adam(editor.optimizer_groups(1e-3))
    for step in range(60):
        _step(editor, bundle, batches[step % len(batches)], optimizer)
    trained = edit_nll()
    assert trained < start - 2.0, (start, trained)


def test_unknown_parameter_and_unsupported_shapes(tiny):
    model = tiny("llama").model
    with pytest.raises(EditError, match="model.layers.7.mlp.up_proj.weight"):
        KE(edit_params=["model.layers.7.mlp.up_proj.weight"]).bind(model)
    with pytest.raises(ValueError):
        KE(label_smoothing=1.0)
    with pytest.raises(EditError, match="not bound"):
        KE().optimizer_groups(1e-3)
