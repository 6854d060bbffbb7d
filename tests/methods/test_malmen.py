"""MALMEN on tiny random models: the least-squares aggregation, per-edit factors, the training
split's gradient, the edit taking after training, no writes to the model."""

import dataclasses

import pytest
import torch

from editlab.data.collate import EditBatchCollator
from editlab.methods.base import EditError
from editlab.methods.hyper import TrainableEditor, edit_gradients, edited_forward, target_nll
from editlab.methods.malmen import MALMEN

from conftest import assert_state_equal, make_records, state_copy


def _batch(bundle, records=None):
    return EditBatchCollator(bundle.tokenizer)(records or make_records())


def _many_records(n: int):
    """``n`` distinct edits (the three test records with numbered subjects and targets)."""
    base = make_records()
    out = []
    for i in range(n):
        r = base[i % len(base)]
        out.append(dataclasses.replace(r, record_id=i, prompt=f"{r.prompt} {i}", target_new=f"{r.target_new}{i}"))
    return out


def _trained_statistics(editor, bundle, seed: int = 0) -> None:
    """Statistics from one training call, then a random (non-identity) hypernetwork, eval mode."""
    editor.train()
    editor.training_losses(bundle.model, _batch(bundle))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in editor.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    editor.eval()


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_delta_is_the_regularised_least_squares_solution(tiny, model_type):
    """compute_deltas equals ΔW = (UᵀU + e^λ I)⁻¹ UᵀV solved in float64 for every edited weight
    (Conv1D and Linear layouts), ΔW satisfies the normal equation, differs from the plain sum UᵀV
    (MEND's aggregation), and does not depend on how many edits are captured per forward."""
    bundle = tiny(model_type)
    model = bundle.model
    records = _many_records(11)
    torch.manual_seed(0)
    editor = MALMEN(rank=8, edit_lr=1e-2, capture_batch_size=4)
    editor.bind(model)
    _trained_statistics(editor, bundle)
    deltas = editor.compute_deltas(model, bundle.tokenizer, records)
    batch = editor.encode(bundle.tokenizer, model, records)
    factors = editor.gradient_factors(model, batch)
    for name in editor.edit_params:
        keys, grads = factors[name]
        assert keys.shape[0] > keys.shape[1] / 4  # many rows: a real least-squares problem
        with torch.no_grad():
            shifts = editor.value_shifts(name, keys, grads).double()
        group, layer = editor._route[name]
        lam = editor.nets[group].lamda[layer].detach().double().exp()
        u = keys.double()
        want = torch.linalg.inv(u.t() @ u + lam * torch.eye(u.shape[1], dtype=torch.float64)) @ u.t() @ shifts
        got = deltas[name].double()
        got = got if editor._transposed[name] else got.t()  # (in, out)
        assert got.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6 * float(want.abs().max()))
        residual = u.t() @ (u @ got - shifts) + lam * got
        assert float(residual.abs().max()) < 1e-3 * float((u.t() @ shifts).abs().max())
        assert not torch.allclose(got, u.t() @ shifts, rtol=0.1), "the sum of per-edit updates is not MALMEN's"
    editor.capture_batch_size = 32
    whole = editor.compute_deltas(model, bundle.tokenizer, records)
    for name in deltas:
        torch.testing.assert_close(whole[name], deltas[name], rtol=1e-4, atol=1e-6 * float(deltas[name].abs().max()))


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_factors_are_each_edits_own_gradient_at_its_answer_positions(tiny, model_type):
    """For the last block's MLP output weight, Σ_t d_t u_tᵀ over the captured rows is the sum of
    the edits' own NLL gradients (each edit alone), whatever the sub-batching; ``token="ans"`` keeps
    one row per answer token, ``token="all"`` more rows at an earlier block."""
    bundle = tiny(model_type)
    model = bundle.model
    records = make_records()
    editor = MALMEN(rank=4, capture_batch_size=2)
    editor.bind(model)
    name = editor.edit_params[-1]
    keys, grads = editor.gradient_factors(model, _batch(bundle, records).edit)[name]
    conv = editor._transposed[name]
    summed = keys.t() @ grads if conv else grads.t() @ keys
    single = sum(edit_gradients(model, [name], _batch(bundle, [r]).edit)[name] for r in records)
    torch.testing.assert_close(summed, single, rtol=1e-4, atol=1e-6)
    n_answer = int(_batch(bundle, records).edit.target_mask.sum())
    assert keys.shape[0] == n_answer
    early = editor.edit_params[0]
    ans = editor.gradient_factors(model, _batch(bundle, records).edit)[early][0].shape[0]
    editor.token = "all"
    every = editor.gradient_factors(model, _batch(bundle, records).edit)[early][0].shape[0]
    assert ans == n_answer < every


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_split_training_gradient_equals_the_unsplit_computation(tiny, model_type):
    """The three-step split (ΔW without a graph; ∂L/∂ΔW sub-batch by sub-batch; back through the
    solve and the hypernetwork) gives every editor parameter the gradient, and the loss its value,
    of the one-graph computation (edited_parameters + MEND's objective on the edited model)."""
    bundle = tiny(model_type)
    batch = _batch(bundle)
    torch.manual_seed(0)
    editor = MALMEN(rank=8, edit_lr=1e-2, capture_batch_size=2, net_batch_size=3, edit_outer="both")
    editor.bind(bundle.model)
    _trained_statistics(editor, bundle)
    editor.zero_grad()
    split = editor.training_losses(bundle.model, batch)
    split["loss"].backward()
    got = {n: p.grad.clone() for n, p in editor.named_parameters()}
    editor.zero_grad()
    whole = TrainableEditor.training_losses(editor, bundle.model, batch)
    whole["loss"].backward()
    for key in ("loss", "loss_edit", "loss_loc", "edit_acc", "loc_acc"):
        torch.testing.assert_close(split[key].detach(), whole[key].detach(), rtol=1e-5, atol=1e-7)
    moved = 0
    for name, p in editor.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-6 * float(p.grad.abs().max()) + 1e-12,
                                   msg=name)
        moved += bool(p.grad.abs().max() > 0)
    assert moved == len(got), "every parameter (λ and η included) takes a gradient"


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_training_makes_the_edits_take(tiny_deep, model_type):
    """60 steps on one batch of three edits: the trained editor's batch edit reaches a much lower
    target NLL than its first edit and than the unedited model."""
    bundle = tiny_deep(model_type)
    model = bundle.model
    records = make_records()
    batch = _batch(bundle, records)
    with torch.no_grad():
        unedited = target_nll(edited_forward(model, None, batch.edit), batch.edit)[0].item()
    torch.manual_seed(0)
    editor = MALMEN(rank=32, edit_lr=1e-2, edit_outer="prompt")
    editor.bind(model)
    editor.train()
    optimizer = torch.optim.Adam(editor.optimizer_groups(1e-3))

    def edited_nll() -> float:
        deltas = editor.compute_deltas(model, bundle.tokenizer, records)
        new = {n: model.get_parameter(n).detach() + d for n, d in deltas.items()}
        with torch.no_grad():
            return target_nll(edited_forward(model, new, batch.edit), batch.edit)[0].item()

    for step in range(60):
        out = editor.training_losses(model, batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        if step == 0:
            first = edited_nll()
    trained = edited_nll()
    assert trained < first - 1.0, (unedited, first, trained)
    assert trained < unedited - 3.0, (unedited, first, trained)


def test_compute_deltas_and_apply_restore_bit_exactly(tiny):
    bundle = tiny("gptj")
    model = bundle.model
    before = state_copy(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    torch.manual_seed(0)
    editor = MALMEN(rank=8, edit_lr=1e-2)
    records = make_records()
    with pytest.raises(EditError, match="normalisation"):
        editor.compute_deltas(model, bundle.tokenizer, records)  # untrained: no statistics yet
    assert editor.edit_params == [f"transformer.h.{i}.mlp.fc_out.weight" for i in range(2)]  # last 6 (of 2)
    editor.train()
    out = editor.training_losses(model, _batch(bundle))
    out["loss"].backward()
    stats = {k: v.clone() for k, v in editor.state_dict().items()}
    deltas = editor.compute_deltas(model, bundle.tokenizer, records)
    assert editor.training, "compute_deltas restores the editor's mode"
    assert all(torch.equal(v, editor.state_dict()[k]) for k, v in stats.items()), "editing changes no state"
    assert sorted(deltas) == sorted(editor.edit_params)
    for name, delta in deltas.items():
        assert delta.shape == model.get_parameter(name).shape and delta.abs().max() > 0
    assert_state_equal(model, before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    with editor.apply(model, bundle.tokenizer, records) as session:
        for name, delta in session.deltas.items():
            assert torch.equal(deltas[name], delta), "compute_deltas is deterministic in eval mode"
            assert torch.equal(model.get_parameter(name), before[name] + delta)
    assert_state_equal(model, before)


def test_invalid_parameters_and_models(tiny):
    with pytest.raises(ValueError, match="token"):
        MALMEN(token="prompt")
    model = tiny("gpt2").model
    for bad in ("transformer.h.1.ln_2.weight", "transformer.wte.weight", "transformer.h.1.mlp.c_fc.bias"):
        with pytest.raises(EditError, match="MALMEN edits"):
            MALMEN(edit_params=[bad]).bind(model)
    t5 = tiny("t5")
    editor = MALMEN(rank=4, edit_params=["decoder.block.1.layer.2.DenseReluDense.wo.weight"])
    editor.bind(t5.model)
    with pytest.raises(EditError, match="decoder-only"):
        editor.gradient_factors(t5.model, EditBatchCollator(t5.tokenizer, seq2seq=True,
                                                            decoder_start_token_id=0)(make_records()).edit)
