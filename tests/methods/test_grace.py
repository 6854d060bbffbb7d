"""GRACE on tiny models: the codebook's rules (add, expand, split) by hand at the state level, the
edit taking at the query and nothing else changing, the codebook as the session's stream state,
and a sequential stream through the edit loop whose earlier edits still hold at its end."""

import io
import json

import lightning as L
import pytest
import torch

from editlab.data.datamodule import EditDataModule
from editlab.data.records import EditRecord
from editlab.evaluation.teacher_forced import score_pairs
from editlab.lit.callbacks import EditorCallback
from editlab.lit.edit_eval import EditEvalModule
from editlab.methods.base import EditError, WeightEditSession, applied
from editlab.methods.grace import GRACE, GraceAdapter, SPLIT_MARGIN, empty_codebook, update_codebook
from editlab.tracing import Trace

from conftest import assert_state_equal, state_copy

FAST = dict(layer=1, module="mlp_out", n_iter=40)  # block 1 of the 4-block tiny models


def _rec(i, prompt, target):
    return EditRecord(record_id=i, prompt=prompt, subject=prompt.split()[-2], target_new=target)


# one-token targets: a value at the last prompt token decides the next token directly
STREAM = [
    _rec(0, "The capital of France is", "Rome"),
    _rec(1, "The mother tongue of Danielle Darrieux is", "German"),
    _rec(2, "Toko Yasuda plays the", "Paris"),
    _rec(3, "The capital of Spain is", "Berlin"),
]
UNRELATED = "Lionel Messi plays football in a big stadium."


def _hits(bundle, rec):
    """Every target token of ``rec`` is the argmax (teacher-forced) on the model as it is."""
    s = score_pairs(bundle.model, bundle.tokenizer, [rec.prompt], [rec.target_new])
    return bool((s.pred[0] == s.target[0])[s.mask[0]].all()), float(torch.exp(-s.nll[0]))


def _host_inputs(bundle, path, text):
    ids = bundle.tokenizer(text, return_tensors="pt")["input_ids"]
    with Trace(bundle.model, [path], retain_input=True, stop=True) as tr, torch.no_grad():
        bundle.model(input_ids=ids, use_cache=False)
    return ids, tr.inputs[path]


def _snapshot(model):
    return (state_copy(model), [n for n, _ in model.named_modules()],
            sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()))


def _assert_unchanged(model, snap):
    state, names, hooks = snap
    assert_state_equal(model, state)
    assert [n for n, _ in model.named_modules()] == names
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks


# ----------------------------------------------------------------------- codebook rules (state level)
def test_the_codebook_adds_expands_and_splits_by_the_reference_rules():
    eps = 1.0
    v = torch.zeros(3)
    book, chosen, action = update_codebook(empty_codebook("h"), torch.zeros(4), v, "Rome", 0, eps, "coverage")
    assert action == "add" and chosen == 0 and book["radii"].tolist() == [eps] and book["labels"] == ["Rome"]
    # farther than the nearest radius + eps: a new entry, whatever the label
    far = torch.tensor([3.0, 0, 0, 0])
    book, chosen, action = update_codebook(book, far, v + 1, "Rome", 1, eps, "coverage")
    assert action == "add" and chosen == 1 and book["keys"].shape == (2, 4) and book["ids"] == [0, 1]
    assert torch.equal(book["values"][1], v + 1)
    # within reach (1.5 <= 1 + 1), same label, outside the radius: the radius grows to the distance
    before = {k: (t.clone() if torch.is_tensor(t) else list(t)) for k, t in book.items() if k != "host"}
    near = torch.tensor([0, 1.5, 0, 0])
    grown, chosen, action = update_codebook(book, near, v + 2, "Rome", 2, eps, "coverage")
    assert action == "expand" and chosen == 0 and grown["keys"].shape == (2, 4)
    assert grown["radii"].tolist() == pytest.approx([1.5, eps])
    for k, t in before.items():  # the input codebook is not modified
        assert torch.equal(book[k], t) if torch.is_tensor(t) else book[k] == t
    # inside the grown radius, same label: nothing changes, the entry is trained again
    same, chosen, action = update_codebook(grown, torch.tensor([0, 1.0, 0, 0]), v, "Rome", 3, eps, "coverage")
    assert action == "within" and chosen == 0 and torch.equal(same["radii"], grown["radii"])
    # within reach, another label: a new entry and both radii split at half the distance
    split, chosen, action = update_codebook(book, near, v + 2, "Paris", 2, eps, "coverage")
    assert action == "split" and chosen == 2 and split["labels"] == ["Rome", "Rome", "Paris"]
    assert split["radii"].tolist() == pytest.approx([0.75 - SPLIT_MARGIN, eps, 0.75])
    # moving average: the key also moves halfway to the query
    moved, _, action = update_codebook(book, near, v, "Rome", 2, eps, "moving_average")
    assert action == "expand" and torch.allclose(moved["keys"][0], near / 2)
    assert moved["radii"][0].item() == pytest.approx(1.5)


def test_the_adapter_replaces_the_host_output_in_range_and_adds_exact_zeros_elsewhere():
    host = torch.nn.Linear(4, 3)
    keys = torch.tensor([[0.0, 0, 0, 0], [5, 5, 5, 5]])
    values = torch.tensor([[1.0, 2, 3], [-1, -2, -3]])
    adapter = GraceAdapter(host, keys, values, torch.tensor([1.0, 0.5]))
    x = torch.tensor([[[0.1, 0, 0, 0.2], [5, 5, 5, 5.4], [5, 5, 5, 5.6], [2, 2, 2, 2]]])
    out = host(x) + adapter(x)
    assert adapter.in_range(x).tolist() == [[True, True, False, False]]
    assert torch.allclose(out[0, 0], values[0]) and torch.allclose(out[0, 1], values[1])
    assert torch.equal(out[0, 2:], host(x)[0, 2:]) and torch.equal(adapter(x)[0, 2:], torch.zeros(2, 3))
    assert "adapter" not in dict(host.named_modules()) and not list(adapter.children())  # no cycle
    assert set(adapter.state_dict()) == {"keys", "values", "radii"}


# ----------------------------------------------------------------------- edits on tiny models
@pytest.mark.parametrize("model_type,module", [("llama", "mlp_out"), ("gpt2", "mlp_in")])
def test_the_edit_takes_far_inputs_are_untouched_and_restore_is_exact(tiny_deep, model_type, module):
    bundle = tiny_deep(model_type)
    model, tok = bundle.model, bundle.tokenizer
    snap = _snapshot(model)
    rec = STREAM[0]
    hit0, p0 = _hits(bundle, rec)
    ids = tok(UNRELATED, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits0 = model(input_ids=ids).logits
    editor = GRACE(**{**FAST, "module": module})
    edit = editor.compute_edit(model, tok, [rec])
    _assert_unchanged(model, snap)  # computing an edit changes nothing
    ((path, adapter),) = edit.patches.items()
    assert edit.replace and isinstance(adapter, GraceAdapter) and adapter.num_keys == 1
    assert path == editor.host_path(model) and path.endswith({"mlp_out": ".1.mlp.down_proj",
                                                              "mlp_in": ".1.mlp.c_fc"}[module])
    assert edit.state["host"] == path and edit.state["labels"] == ["Rome"] and edit.state["ids"] == [0]
    assert editor.last_losses[0][-1] < editor.last_losses[0][0]
    _, unrelated_inputs = _host_inputs(bundle, path, UNRELATED)
    assert not adapter.in_range(unrelated_inputs).any()  # the unrelated prompt is outside every radius
    with applied(model, edit) as session:
        hit1, p1 = _hits(bundle, rec)
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, logits0)  # bit-equal far from every key
        _, prompt_inputs = _host_inputs(bundle, path, rec.prompt)
        assert adapter.in_range(prompt_inputs)[0].tolist()[-1]  # the last prompt token is the query
        assert len(session.patches) == 1
    assert not hit0 and hit1 and p1 > p0
    _assert_unchanged(model, snap)


def test_a_record_without_target_or_an_encoder_decoder_is_refused_and_nothing_changes(tiny, tiny_deep):
    bundle = tiny_deep("llama")
    snap = _snapshot(bundle.model)
    bad = EditRecord(record_id="r7", prompt="The capital of France is", subject="France", target_new="x")
    object.__setattr__(bad, "target_new", " ")  # past the record's own validation
    with pytest.raises(EditError, match=r"record 'r7': field 'target_new'"):
        GRACE(**FAST).compute_edit(bundle.model, bundle.tokenizer, [bad])
    with pytest.raises(EditError, match="out of range"):
        GRACE(**{**FAST, "layer": 4}).compute_edit(bundle.model, bundle.tokenizer, STREAM[:1])
    _assert_unchanged(bundle.model, snap)
    t5 = tiny("t5")
    with pytest.raises(EditError, match="encoder-decoder"):
        GRACE(**FAST).compute_edit(t5.model, t5.tokenizer, STREAM[:1])


def test_the_codebook_is_the_session_state_and_a_failed_edit_keeps_the_old_one(tiny_deep):
    bundle = tiny_deep("llama")
    model, tok = bundle.model, bundle.tokenizer
    snap = _snapshot(model)
    editor = GRACE(**FAST)
    session = WeightEditSession(model)
    for n, rec in enumerate(STREAM[:3], start=1):
        session.apply(editor.edit_in(session, tok, [rec]))
        assert session.stream_state["keys"].shape[0] == n and session.stream_state["ids"] == list(range(n))
        assert len(session.patches) == 1 and session.patches[0].num_keys == n  # the codebook replaced
    assert not hasattr(editor, "codebook") and all(not torch.is_tensor(v) for v in vars(editor).values())
    state = session.stream_state
    kept = {k: state[k].clone() for k in ("keys", "values", "radii")}
    with torch.no_grad():
        inputs = tok(STREAM[0].prompt, return_tensors="pt")
        logits = model(**inputs).logits
    # the same prompt and label again: the entry is reused (trained further), no entry is added
    again = editor.edit_in(session, tok, STREAM[:1])
    assert again.state["keys"].shape[0] == 3 and again.state["labels"] == state["labels"]
    # a failed edit (refused by the verifier) brings back the old codebook, state and patch
    with pytest.raises(EditError, match="undone"):
        session.apply(editor.edit_in(session, tok, STREAM[3:]),
                      verify=lambda s: (_ for _ in ()).throw(EditError("undone")))
    assert session.stream_state is state and len(session.patches) == 1 and session.patches[0].num_keys == 3
    for k, t in kept.items():
        assert torch.equal(state[k], t), k
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, logits)
    # a codebook of another host is refused
    with pytest.raises(EditError, match="codebook is at"):
        GRACE(**{**FAST, "layer": 2}).edit_in(session, tok, STREAM[3:])
    # the state is plain data: tensors, lists, strings, numbers (a stream checkpoint can hold it)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert torch.equal(loaded["keys"], state["keys"]) and loaded["labels"] == state["labels"]
    session.restore()
    assert session.stream_state is None
    _assert_unchanged(model, snap)


def test_several_records_in_one_call_are_edited_one_after_the_other(tiny_deep):
    bundle = tiny_deep("llama")
    snap = _snapshot(bundle.model)
    edit = GRACE(**FAST).compute_edit(bundle.model, bundle.tokenizer, STREAM[:2])
    assert edit.state["keys"].shape[0] == 2 and edit.state["labels"] == ["Rome", "German"]
    with applied(bundle.model, edit):
        assert all(_hits(bundle, r)[0] for r in STREAM[:2])
    _assert_unchanged(bundle.model, snap)


def _loop(bundle, editor, tmp_path, recs):
    module = EditEvalModule(bundle, output_dir=str(tmp_path), score_after_stream=True)
    trainer = L.Trainer(accelerator="cpu", devices=1, inference_mode=False, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[EditorCallback(editor, sequential=True)])
    trainer.test(module, datamodule=EditDataModule(test=lambda: recs, batch_size=1), verbose=False)
    rows = [json.loads(x) for x in (tmp_path / "records.jsonl").read_text().splitlines()]
    return module.summary, rows


def test_a_sequential_stream_through_the_edit_loop_keeps_its_earlier_edits(tiny_deep, tmp_path):
    bundle = tiny_deep("llama")
    snap = _snapshot(bundle.model)
    summary, rows = _loop(bundle, GRACE(**FAST), tmp_path, STREAM)
    _assert_unchanged(bundle.model, snap)
    assert len(rows) == len(STREAM)
    assert summary["pre/reliability"] == 0.0 and summary["post/reliability"] == 1.0
    assert all(r["final"]["reliability"] == 1.0 for r in rows)  # every edit still holds after the stream


def test_a_warm_value_starts_at_the_module_own_output(tiny_deep):
    """value_init='warm': the new entry's value is the host's output at the query, so an untrained
    value (one step at a negligible learning rate) leaves the model's answer where it was."""
    bundle = tiny_deep("llama")
    rec = STREAM[0]
    inputs = bundle.tokenizer(rec.prompt, return_tensors="pt")
    with torch.no_grad():
        logits = bundle.model(**inputs).logits
    edit = GRACE(**{**FAST, "value_init": "warm", "n_iter": 1, "edit_lr": 1e-9}).compute_edit(
        bundle.model, bundle.tokenizer, [rec])
    cold = GRACE(**{**FAST, "n_iter": 1, "edit_lr": 1e-9}).compute_edit(bundle.model, bundle.tokenizer, [rec])
    with applied(bundle.model, edit), torch.no_grad():
        assert torch.allclose(bundle.model(**inputs).logits, logits, atol=1e-4)
    with applied(bundle.model, cold), torch.no_grad():
        assert not torch.allclose(bundle.model(**inputs).logits, logits, atol=1e-4)
