"""RLEdit on tiny random models: the episode objective (accumulated shifts, memory of earlier
steps, the step-by-step gradient), edits that take after training, bit-exact restore, a stream
through the edit loop, and loading from a checkpoint."""

import json

import lightning as L
import pytest
import torch

from editlab.data.collate import EditBatchCollator
from editlab.data.datamodule import EditDataModule
from editlab.data.records import EditRecord, Probe
from editlab.lit.callbacks import EditorCallback
from editlab.lit.checkpoint import build_editor, load_editor
from editlab.lit.edit_eval import EditEvalModule
from editlab.lit.editor_train import EditorTrainModule
from editlab.methods.base import EditError
from editlab.methods.hyper import edit_gradient_factors, edited_forward, locality_kl, target_nll
from editlab.methods.rledit import RLEdit

from conftest import assert_state_equal, make_records, state_copy

LAST = ["model.layers.3.mlp.up_proj.weight", "model.layers.3.mlp.down_proj.weight"]
COUNTRIES = [("France", "Paris", "Rome"), ("Germany", "Berlin", "Tokyo"), ("Italy", "Rome", "Madrid"),
             ("Spain", "Madrid", "Paris"), ("Japan", "Tokyo", "London"), ("England", "London", "Berlin")]


def _records(n: int = 6) -> list[EditRecord]:
    out = []
    for i in range(n):
        country, _, new = COUNTRIES[i % len(COUNTRIES)]
        other, answer, _ = COUNTRIES[(i + 1) % len(COUNTRIES)]
        out.append(EditRecord(record_id=i, prompt=f"The capital of {country} is", subject=country,
                              target_new=new, rephrase_prompts=(f"{country} has its capital in",),
                              locality=(Probe(f"The capital of {other} is", answer, "neighborhood"),)))
    return out


def _editor(**kwargs) -> RLEdit:
    torch.manual_seed(0)
    settings = dict(edit_params=LAST, rank=8, edit_lr=1e-2, edits_per_step=2, episode_steps=3)
    return RLEdit(**{**settings, **kwargs})


def _warm(editor, bundle, batch):
    """One training call fills the normalisation statistics; then eval mode freezes them."""
    editor.bind(bundle.model)
    editor.train()
    with torch.no_grad():
        editor.training_losses(bundle.model, batch)
    editor.eval()


def _grads(editor, bundle, batch):
    for p in editor.parameters():
        p.grad = None
    out = editor.training_losses(bundle.model, batch)
    out["loss"].backward()
    return out, {n: p.grad.clone() for n, p in editor.named_parameters()}


def _one_graph_episode_loss(editor, model, batch):
    """The episode objective written out as one graph (the memory of every step through its own
    forward), independently of RLEdit.training_losses."""
    named = dict(model.named_parameters())
    total = 0.0
    episodes = editor.episodes(batch)
    for episode in episodes:
        weights = {n: named[n].detach() for n in editor.edit_params}
        for t, step in enumerate(episode):
            shifts = editor.shifts(model, step.edit, params=weights)
            after = {n: weights[n] + shifts[n] for n in weights}
            loss = editor.c_reg * sum(s.pow(2).sum() for s in shifts.values())
            for k in range(min(editor.memory_depth, t + 1)):
                past = episode[t - k]
                nll = target_nll(edited_forward(model, after, past.rephrase), past.rephrase)[0]
                with torch.no_grad():
                    pre = edited_forward(model, weights, past.locality)
                kl = locality_kl(pre, edited_forward(model, after, past.locality), past.locality, "answer")
                loss = loss + editor.memory_decay**k * (editor.c_edit * nll + editor.c_loc * kl)
            total = total + loss
            weights = {n: weights[n] + shifts[n].detach() for n in weights}
    return total / len(episodes)


# ------------------------------------------------------------------------ the objective
def test_batches_are_cut_into_steps_and_episodes(tiny):
    bundle = tiny("llama")
    batch = EditBatchCollator(bundle.tokenizer)(_records(5))
    editor = RLEdit(edits_per_step=2, episode_steps=2)
    episodes = editor.episodes(batch)
    assert [[[r.record_id for r in step.records] for step in ep] for ep in episodes] == [[[0, 1], [2, 3]], [[4]]]
    step = episodes[0][1]
    assert step.rephrase.input_ids.tolist() == batch.rephrase.input_ids[2:4].tolist()
    assert step.rows_of(step.locality).tolist() == [0, 1]


def test_step_by_step_gradient_is_the_gradient_of_the_episode_loss(tiny_deep):
    """The returned loss has the value and the gradient of Σ_t L_t built as one graph: the steps
    edit the weights the earlier steps left, and the memory terms are differentiated."""
    bundle = tiny_deep("llama")
    batch = EditBatchCollator(bundle.tokenizer)(_records(6))
    editor = _editor(memory_depth=3, memory_decay=0.5, c_reg=1e-2)
    _warm(editor, bundle, batch)
    out, grads = _grads(editor, bundle, batch)
    for p in editor.parameters():
        p.grad = None
    reference = _one_graph_episode_loss(editor, bundle.model, batch)
    reference.backward()
    assert torch.allclose(out["loss"].detach(), reference.detach(), rtol=1e-5)
    for name, p in editor.named_parameters():
        assert torch.allclose(grads[name], p.grad, rtol=1e-4, atol=1e-8), name
    assert any(g.abs().sum() > 0 for g in grads.values())


def test_the_memory_term_changes_the_gradient_and_only_through_earlier_steps(tiny_deep):
    bundle = tiny_deep("llama")
    batch = EditBatchCollator(bundle.tokenizer)(_records(6))
    with_memory = _editor(memory_depth=10)
    _warm(with_memory, bundle, batch)
    without = _editor(memory_depth=1)
    without.bind(bundle.model)
    without.load_state_dict(with_memory.state_dict())
    without.eval()
    out_m, g_m = _grads(with_memory, bundle, batch)
    out_1, g_1 = _grads(without, bundle, batch)
    assert float(out_m["loss_memory"]) > 0 and float(out_1["loss_memory"]) == 0
    assert torch.equal(out_m["loss_edit"], out_1["loss_edit"])  # the current edit's term is the same
    assert any(not torch.allclose(g_m[n], g_1[n]) for n in g_m), "the memory term left the gradient unchanged"
    # a one-step episode has no earlier step: the depth makes no difference there
    single = EditBatchCollator(bundle.tokenizer)(_records(2))
    _, s_m = _grads(with_memory, bundle, single)
    _, s_1 = _grads(without, bundle, single)
    for n in s_m:
        assert torch.equal(s_m[n], s_1[n]), n


def test_later_steps_edit_the_accumulated_weights(tiny_deep):
    """Step 2's gradient factors are read on the weights step 1 left, not on the base model."""
    bundle = tiny_deep("llama")
    batch = EditBatchCollator(bundle.tokenizer)(_records(4))
    before = state_copy(bundle.model)
    editor = _editor()
    _warm(editor, bundle, batch)
    first, second = editor.episodes(batch)[0]
    with torch.no_grad():
        shift = editor.shifts(bundle.model, first.edit)
    named = dict(bundle.model.named_parameters())
    moved = {n: named[n].detach() + s for n, s in shift.items()}
    on_base = edit_gradient_factors(bundle.model, LAST, second.edit, positions="answer")
    on_moved = edit_gradient_factors(bundle.model, LAST, second.edit, params=moved, positions="answer")
    assert not torch.allclose(on_base[LAST[0]][1], on_moved[LAST[0]][1])
    assert all(x.shape[0] == int(second.edit.target_mask.sum()) for x, _, _ in on_moved.values())
    assert_state_equal(bundle.model, before)


def test_identity_network_shift_is_the_ridge_solution(tiny):
    """At init (identity blocks) the shift solves (KᵀK + e^λ I) S = Kᵀ D with D = −α (k·k̃) δ̃."""
    bundle = tiny("gpt2")
    editor = RLEdit(rank=4, edit_lr=1e-3)
    editor.bind(bundle.model)
    batch = EditBatchCollator(bundle.tokenizer)(make_records()[:2])
    _warm(editor, bundle, batch)  # statistics frozen from here
    shifts = editor.shifts(bundle.model, batch.edit)
    name = editor.edit_params[0]  # a Conv1D weight: stored (in, out), the shift as is
    x, d, _ = edit_gradient_factors(bundle.model, [name], batch.edit, positions="answer")[name]
    transform = editor.transforms[editor._route[name][0]]
    xn, dn = transform._normalise(x, "x"), transform._normalise(d, "delta")
    values = -1e-3 * (x * xn).sum(-1, keepdim=True) * dn
    expected = torch.linalg.solve(x.t() @ x + torch.eye(x.shape[1]), x.t() @ values)
    assert torch.allclose(shifts[name].detach(), expected, rtol=1e-4, atol=1e-9)


# ------------------------------------------------------------------------ editing
def test_training_makes_the_edits_take(tiny_deep):
    """A dozen training episodes (the edit NLL on the edit prompts) and the editor's edits of the
    first records, on the unedited model, reach a much lower NLL than its first edits."""
    bundle = tiny_deep("llama")
    collate = EditBatchCollator(bundle.tokenizer)
    records = _records(6)
    batch = collate(records)
    test = collate(records[:2])

    def edited_nll(editor):
        editor.eval()
        with torch.no_grad():
            new = editor.edited_parameters(bundle.model, test.edit)
            return target_nll(edited_forward(bundle.model, new, test.edit), test.edit)[0].item()

    with torch.no_grad():
        unedited = target_nll(edited_forward(bundle.model, None, test.edit), test.edit)[0].item()
    editor = _editor(edit_lr=1e-3, edit_outer="prompt")
    editor.bind(bundle.model)
    optimizer = torch.optim.Adam(editor.optimizer_groups(1e-2))
    for step in range(12):
        editor.train()
        out = editor.training_losses(bundle.model, batch)
        if step == 0:
            first = edited_nll(editor)
            editor.train()
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    trained = edited_nll(editor)
    assert trained < first - 2.0 and trained < unedited - 4.0, (unedited, first, trained)


def test_compute_deltas_and_apply_restore_bit_exactly(tiny):
    bundle = tiny("gptj")
    model = bundle.model
    before = state_copy(model)
    editor = RLEdit(rank=8, edit_lr=1e-2)
    records = make_records()[:2]
    with pytest.raises(EditError, match="RLEdit: the normalisation"):
        editor.compute_deltas(model, bundle.tokenizer, records)  # untrained: no statistics yet
    _warm(editor, bundle, EditBatchCollator(bundle.tokenizer)(make_records()))
    deltas = editor.compute_deltas(model, bundle.tokenizer, records)
    assert sorted(deltas) == sorted(editor.edit_params)
    assert all(d.abs().max() > 0 for d in deltas.values())
    assert_state_equal(model, before)
    with editor.apply(model, bundle.tokenizer, records) as session:
        for name, delta in session.deltas.items():
            assert torch.equal(deltas[name], delta)
            assert torch.equal(model.get_parameter(name), before[name] + delta)
    assert_state_equal(model, before)
    assert all(p.grad is None for p in model.parameters())


def test_a_stream_through_the_edit_loop(tiny_deep, tmp_path):
    bundle = tiny_deep("llama")
    before = state_copy(bundle.model)
    editor = _editor()
    _warm(editor, bundle, EditBatchCollator(bundle.tokenizer)(_records(6)))
    module = EditEvalModule(bundle, output_dir=str(tmp_path), score_after_stream=True)
    trainer = L.Trainer(accelerator="cpu", devices=1, inference_mode=False, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[EditorCallback(editor, sequential=True)])
    trainer.test(module, datamodule=EditDataModule(test=lambda: _records(6), batch_size=2), verbose=False)
    rows = [json.loads(x) for x in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all("final" in r for r in rows)
    assert "final/reliability" in module.summary
    assert_state_equal(bundle.model, before)


def test_a_checkpoint_rebuilds_the_editor(tiny, tmp_path):
    bundle = tiny("llama")
    config = {"_target_": "editlab.methods.rledit.RLEdit", "rank": 4, "edits_per_step": 2, "episode_steps": 2}
    module = EditorTrainModule(bundle, build_editor(config, "here"), lr=1e-3, editor_config=config)
    module.editor.train()
    with torch.no_grad():
        module.editor.training_losses(bundle.model, EditBatchCollator(bundle.tokenizer)(make_records()))
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "rledit.ckpt")
    loaded = load_editor(tmp_path / "rledit.ckpt", bundle)
    assert isinstance(loaded, RLEdit) and loaded.episode_steps == 2 and not loaded.training
    for key, value in module.editor.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_invalid_parameters_are_refused(tiny):
    bundle = tiny("llama")
    with pytest.raises(EditError, match="RLEdit edits weights of linear layers"):
        RLEdit(edit_params=["model.norm.weight"]).bind(bundle.model)
