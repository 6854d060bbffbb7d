"""MEND on tiny random models: exact factors, identity start, training, no writes to the model."""

import copy
import dataclasses

import pytest
import torch

from editlab.data.collate import EditBatchCollator
from editlab.methods.base import EditError
from editlab.methods.hyper import edit_gradients, edited_forward, last_mlp_weights, locality_kl, target_nll
from editlab.methods.ke import KE
from editlab.methods.mend import MEND, _GradientTransform

from conftest import assert_state_equal, make_records, state_copy


def _batch(bundle, records=None):
    return EditBatchCollator(bundle.tokenizer)(records or make_records())


def _edit_nll(editor, bundle, batches):
    """Mean target NLL of each edit under the weights the editor (eval mode) gives it."""
    was = editor.training
    editor.eval()
    total = 0.0
    for batch in batches:
        with torch.enable_grad():
            new = editor.edited_parameters(bundle.model, batch.edit)
        with torch.no_grad():
            logits = edited_forward(bundle.model, {n: v.detach() for n, v in new.items()}, batch.edit)
            total += target_nll(logits, batch.edit)[0].item()
    editor.train(was)
    return total / len(batches)


def _step(editor, bundle, batch, optimizer):
    out = editor.training_losses(bundle.model, batch)
    optimizer.zero_grad()
    out["loss"].backward()
    optimizer.step()
    return out


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_pseudo_gradient_is_the_true_gradient_for_the_identity_transform(tiny, model_type):
    """Fresh IDMLP (u = 0) with normalisation off: Σ_t δ_t x_tᵀ is dL/dW, Conv1D layout included,
    on a padded batch of three edits."""
    bundle = tiny(model_type)
    model = bundle.model
    batch = _batch(bundle).edit
    torch.manual_seed(0)
    editor = MEND(norm=False, edit_lr=0.5)
    editor.bind(model)
    pseudo = editor.pseudo_gradients(model, batch)
    # the reference gradient: ordinary backward on a copy whose edited weights are trainable
    trainable = copy.deepcopy(model)
    for n, p in trainable.named_parameters():
        p.requires_grad_(n in editor.edit_params)
    nll, _ = target_nll(trainable(**batch.model_inputs(), use_cache=False).logits, batch)
    nll.backward()
    for name in editor.edit_params:
        true = trainable.get_parameter(name).grad
        assert pseudo[name].shape == model.get_parameter(name).shape
        assert true.abs().max() > 0
        assert torch.allclose(pseudo[name], true, rtol=1e-4, atol=1e-7), name
    new = editor.edited_parameters(model, batch)
    grads = edit_gradients(model, editor.edit_params, batch)
    for name in editor.edit_params:
        expected = model.get_parameter(name) - 0.5 * grads[name]
        assert torch.allclose(new[name], expected, rtol=1e-5, atol=1e-7), "W̃ = W − α ∇W"


@pytest.mark.parametrize("combine,flags", [(True, {}), (False, {}), (False, {"one_sided": True}),
                                           (False, {"x_only": True}), (False, {"delta_only": True})])
def test_transform_starts_as_identity(combine, flags):
    torch.manual_seed(0)
    kw = dict(rank=8, n_hidden=1, init="id", act="relu", norm=False, combine=combine,
              one_sided=False, x_only=False, delta_only=False)
    kw.update(flags)
    transform = _GradientTransform(6, 10, n_modes=3, **kw)
    x, delta = torch.randn(7, 6), torch.randn(7, 10)
    for mode in range(3):
        x_t, delta_t = transform(x, delta, mode)
        assert torch.equal(x_t, x) and torch.equal(delta_t, delta)
    n_nets = sum(net is not None for net in (transform.mlp, transform.x_mlp, transform.delta_mlp))
    assert n_nets == (1 if combine else 1 if flags else 2)


def test_normalisation_statistics_are_running_mean_and_variance():
    torch.manual_seed(0)
    transform = _GradientTransform(4, 5, rank=4, n_hidden=0, init="id", act="relu", norm=True, combine=True,
                                   one_sided=False, x_only=False, delta_only=False, n_modes=None)
    chunks = [(torch.randn(n, 4) * 3 + 1, torch.randn(n, 5) * 0.1 - 2) for n in (5, 1, 9)]
    with pytest.raises(EditError, match="normalisation"):
        transform.eval()(*chunks[0])  # empty statistics: no edit before training
    transform.train()
    for x, delta in chunks:
        x_t, delta_t = transform(x, delta)
    xs, ds = torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])
    assert int(transform.count) == 15
    assert torch.allclose(transform.x_mean, xs.mean(0), atol=1e-5)
    assert torch.allclose(transform.delta_m2 / 14, ds.var(0), rtol=1e-4)
    # identity network: the output is the normalised input of the last chunk
    expected = (chunks[-1][0] - xs.mean(0)) / (xs.var(0).sqrt() + 1e-7)
    assert torch.allclose(x_t, expected, rtol=1e-4, atol=1e-5)
    state = {k: v.clone() for k, v in transform.state_dict().items()}
    transform.eval()(*chunks[0])
    assert all(torch.equal(state[k], v) for k, v in transform.state_dict().items()), "eval leaves the statistics"


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_training_steps_change_the_editor_and_never_the_model(tiny, model_type):
    bundle = tiny(model_type)
    model = bundle.model
    batch = _batch(bundle)
    before = state_copy(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    torch.manual_seed(0)
    editor = MEND(rank=16)
    editor.bind(model)
    editor.train()
    start = {n: p.detach().clone() for n, p in editor.named_parameters()}
    optimizer = torch.optim.Adam(editor.optimizer_groups(1e-3))
    out = _step(editor, bundle, batch, optimizer)
    assert {"loss", "loss_edit", "loss_loc", "edit_acc", "loc_acc"} <= set(out)
    assert int(next(iter(editor.transforms.values())).count) > 0, "statistics updated in training"
    _step(editor, bundle, batch, optimizer)  # u = 0 at init: v and the mode scales move from step 2
    unchanged = [n for n, p in editor.named_parameters() if torch.equal(p.detach(), start[n])]
    assert not unchanged, f"editor parameters left unchanged: {unchanged}"
    assert_state_equal(model, before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_compute_deltas_and_apply_restore_bit_exactly(tiny):
    bundle = tiny("gptj")
    model = bundle.model
    before = state_copy(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    torch.manual_seed(0)
    editor = MEND(rank=16, edit_lr=1e-2, edit_params=last_mlp_weights(model, 1))
    records = make_records()[:2]
    with pytest.raises(EditError, match="normalisation"):
        editor.compute_deltas(model, bundle.tokenizer, records)  # untrained: no statistics yet
    optimizer = torch.optim.Adam(editor.optimizer_groups(1e-3))
    editor.train()
    _step(editor, bundle, _batch(bundle), optimizer)
    deltas = editor.compute_deltas(model, bundle.tokenizer, records)
    assert editor.training, "compute_deltas restores the editor's mode"
    assert sorted(deltas) == sorted(editor.edit_params)
    for name, delta in deltas.items():
        assert delta.shape == model.get_parameter(name).shape and delta.abs().max() > 0
    assert_state_equal(model, before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    with editor.apply(model, bundle.tokenizer, records) as session:
        for name, delta in session.deltas.items():
            assert torch.equal(deltas[name], delta), "compute_deltas is deterministic in eval mode"
            assert torch.equal(model.get_parameter(name), before[name] + delta)
    assert_state_equal(model, before)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_training_raises_the_target_probability(tiny_deep, model_type):
    """60 steps on three repeated edits: the trained editor's edits reach a much lower target NLL
    than the editor's first edits (and than the unedited model)."""
    bundle = tiny_deep(model_type)
    collate = EditBatchCollator(bundle.tokenizer)
    batches = [collate([r]) for r in make_records()]
    with torch.no_grad():
        unedited = sum(target_nll(edited_forward(bundle.model, None, b.edit), b.edit)[0].item()
                       for b in batches) / len(batches)
    torch.manual_seed(0)
    editor = MEND(rank=64)
    editor.bind(bundle.model)
    editor.train()
    optimizer = torch.optim.Adam(editor.optimizer_groups(1e-3))
    _step(editor, bundle, batches[0], optimizer)
    first = _edit_nll(editor, bundle, batches)
    for step in range(1, 60):
        _step(editor, bundle, batches[step % len(batches)], optimizer)
    trained = _edit_nll(editor, bundle, batches)
    assert trained < first - 1.0, (unedited, first, trained)
    assert trained < unedited - 1.5, (unedited, first, trained)


def test_shared_transforms_and_optimizer_groups(tiny):
    model = tiny("llama").model
    editor = MEND(rank=8, lr_lr=3e-3)
    editor.bind(model)
    # up_proj (32 -> 64) and down_proj (64 -> 32) of both blocks: two shapes, two modes each
    assert sorted(editor.transforms) == ["32x64", "64x32"]
    groups = editor.optimizer_groups(1e-5)
    assert groups[0]["lr"] == 1e-5 and groups[1] == {"params": [editor.edit_lrs], "lr": 3e-3}
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in editor.parameters())
    assert torch.equal(editor.edit_lrs.detach(), torch.full((4,), 1e-4))
    unshared = MEND(rank=8, shared=False)
    unshared.bind(model)
    assert len(unshared.transforms) == 4
    assert all(layer.n_modes is None for t in unshared.transforms.values() for layer in t.mlp.layers)


def test_invalid_settings_and_parameters(tiny):
    with pytest.raises(ValueError, match="combine"):
        MEND(x_only=True)
    with pytest.raises(ValueError, match="init"):
        MEND(init="ortho")
    model = tiny("gpt2").model
    for bad in ("transformer.h.1.ln_2.weight", "transformer.wte.weight", "transformer.h.1.mlp.c_fc.bias"):
        with pytest.raises(EditError, match="MEND edits"):
            MEND(edit_params=[bad]).bind(model)
    with pytest.raises(ValueError, match="edit_outer"):
        MEND(edit_outer="paraphrase")
    with pytest.raises(ValueError, match="loc_positions"):
        MEND(loc_positions="prompt")


def test_edit_outer_chooses_the_inputs_of_the_edit_loss(tiny):
    """``rephrase`` (MEND) scores the rephrases, ``prompt`` the edit prompts, ``both`` the mean of
    the two; a batch without rephrases falls back to the prompts."""
    bundle = tiny("llama")
    batch = _batch(bundle)
    assert batch.rephrase is not None
    torch.manual_seed(0)
    editor = MEND(norm=False, edit_lr=0.5, c_loc=0.0)
    editor.bind(bundle.model)
    new = {n: v.detach() for n, v in editor.edited_parameters(bundle.model, batch.edit).items()}
    with torch.no_grad():
        on_reph = target_nll(edited_forward(bundle.model, new, batch.rephrase), batch.rephrase)[0]
        on_prompt = target_nll(edited_forward(bundle.model, new, batch.edit), batch.edit)[0]
    assert not torch.isclose(on_reph, on_prompt)
    expected = {"rephrase": on_reph, "prompt": on_prompt, "both": (on_reph + on_prompt) / 2}
    for mode, want in expected.items():
        editor.edit_outer = mode
        with torch.no_grad():
            got = editor.training_losses(bundle.model, batch)["loss_edit"]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    no_rephrase = dataclasses.replace(batch, rephrase=None)
    for mode in ("rephrase", "both"):
        editor.edit_outer = mode
        with torch.no_grad():
            got = editor.training_losses(bundle.model, no_rephrase)["loss_edit"]
        torch.testing.assert_close(got, on_prompt, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [lambda **kw: MEND(norm=False, edit_lr=0.5, **kw),
                                  lambda **kw: KE(**kw)], ids=["mend", "ke"])
def test_loc_positions_chooses_where_the_locality_kl_is_taken(tiny, make):
    """``loc_positions`` sets the positions of the locality input the objective's KL averages
    (every position, as MEND and KE do, or the answer's only)."""
    bundle = tiny("llama")
    batch = _batch(bundle)
    torch.manual_seed(0)
    editor = make()
    editor.bind(bundle.model)
    assert editor.loc_positions == "all"
    new = {n: v.detach() for n, v in editor.edited_parameters(bundle.model, batch.edit).items()}
    with torch.no_grad():
        pre = edited_forward(bundle.model, None, batch.locality)
        post = edited_forward(bundle.model, new, batch.locality)
    want = {mode: locality_kl(pre, post, batch.locality, mode) for mode in ("all", "answer")}
    assert not torch.isclose(want["all"], want["answer"])
    for mode in ("all", "answer"):
        editor.loc_positions = mode
        with torch.no_grad():
            got = editor.training_losses(bundle.model, batch)["loss_loc"]
        torch.testing.assert_close(got, want[mode], rtol=1e-4, atol=1e-7)


def _with_rephrases(records):
    """The test records, each with a rephrase (record 2 has none of its own)."""
    extra = ("The instrument of Toko Yasuda is",)
    return [r if r.rephrase_prompts else dataclasses.replace(r, rephrase_prompts=extra) for r in records]


def _editor_grads(editor):
    return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            for n, p in editor.named_parameters()}


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
@pytest.mark.parametrize("make", [lambda **kw: MEND(edit_lr=0.5, c_loc=2.0, edit_outer="both", **kw),
                                  lambda **kw: KE(**kw)], ids=["mend", "ke"])
def test_independent_batch_edits_equal_single_edits(tiny, model_type, make):
    """``batch_edits="independent"``: the objective of a batch of records and its gradient on every
    editor parameter equal the mean over records of each record trained alone (a batch of one),
    Linear and Conv1D layouts alike; ``joint`` (one batch edit) differs."""
    _check_independent_equals_single(tiny(model_type), make(batch_edits="independent"))


def test_independent_batch_edits_of_other_parameters_go_row_by_row(tiny):
    """KE editing a bias (1-D) computes each record's update on its own, with the same result."""
    torch.manual_seed(0)
    names = ["transformer.h.1.mlp.c_fc.bias", "transformer.h.1.mlp.c_proj.weight"]
    _check_independent_equals_single(tiny("gpt2"), KE(edit_params=names, batch_edits="independent"))


def _check_independent_equals_single(bundle, editor):
    model = bundle.model
    records = _with_rephrases(make_records())
    before = state_copy(model)
    editor.bind(model)
    if isinstance(editor, MEND):  # statistics from one training call, then frozen (eval mode)
        editor.training_losses(model, _batch(bundle, records))
        editor.eval()
    singles = []
    for record in records:
        editor.zero_grad()
        out = editor.training_losses(model, _batch(bundle, [record]))
        out["loss"].backward()
        parts = {k: out[k].detach() for k in ("loss", "loss_edit", "loss_loc")}
        singles.append((parts, _editor_grads(editor)))
    editor.zero_grad()
    out = editor.training_losses(model, _batch(bundle, records))
    out["loss"].backward()
    grads = _editor_grads(editor)
    for key in ("loss", "loss_edit", "loss_loc"):
        want = torch.stack([s[0][key] for s in singles]).mean()
        torch.testing.assert_close(out[key].detach(), want, rtol=1e-4, atol=1e-6)
    moved = 0
    for name, grad in grads.items():
        want = torch.stack([s[1][name] for s in singles]).mean(0)
        torch.testing.assert_close(grad, want, rtol=2e-3, atol=1e-6, msg=name)
        moved += bool(grad.abs().max() > 0)
    assert moved >= 2
    editor.batch_edits = "joint"
    joint = editor.training_losses(model, _batch(bundle, records))
    assert not torch.isclose(joint["loss"], out["loss"], rtol=1e-6, atol=0)  # apart by >= 3e-5 here
    assert_state_equal(model, before)


def test_independent_batch_edits_map_rows_to_their_records(tiny):
    """A record without a rephrase is left out of the rephrase rows; every other rephrase row is
    scored under its own record's edit, not its row number's."""
    bundle = tiny("llama")
    records = make_records()
    records[0] = dataclasses.replace(records[0], rephrase_prompts=())
    records[2] = _with_rephrases(records)[2]
    torch.manual_seed(0)
    editor = MEND(norm=False, edit_lr=0.5, edit_outer="rephrase", batch_edits="independent")
    editor.bind(bundle.model)
    batch = _batch(bundle, records)
    assert batch.rephrase_rows.tolist() == [1, 2] and batch.locality_rows.tolist() == [0, 1, 2]
    with torch.no_grad():
        got = editor.training_losses(bundle.model, batch)["loss_edit"]
    want = []
    for record in records[1:]:
        with torch.no_grad():
            want.append(editor.training_losses(bundle.model, _batch(bundle, [record]))["loss_edit"])
    torch.testing.assert_close(got, torch.stack(want).mean(), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="batch_edits"):
        MEND(batch_edits="separate")
