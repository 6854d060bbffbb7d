import pytest
import torch

from editlab.methods.base import Edit, EditError, Editor, WeightEditSession, applied

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


class _Scale(torch.nn.Module):
    """A patch: adds ``scale * input`` to its host's output."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(scale))

    def forward(self, x):
        return self.scale * x


def _mlp_path(model):
    return "transformer.h.0.mlp"


def test_patches_attach_suspend_and_restore_cleanly(tiny):
    model = tiny("gpt2").model
    before = state_copy(model)
    keys = set(model.state_dict())
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        base = model(ids).logits
    session = WeightEditSession(model)
    session.apply(Edit(patches={_mlp_path(model): _Scale(0.5)}))
    assert session.edited and len(session.patches) == 1
    assert set(model.state_dict()) - keys == {"transformer.h.0.mlp.editlab_patch_0.scale"}
    with torch.no_grad():
        patched = model(ids).logits
        assert not torch.allclose(patched, base)
        with session.suspended():
            assert torch.equal(model(ids).logits, base)
        assert torch.equal(model(ids).logits, patched)
    session.apply(Edit(deltas=_deltas(model), patches={_mlp_path(model): _Scale(0.1)}))
    assert len(session.patches) == 2
    session.restore()
    assert set(model.state_dict()) == keys and not session.edited
    assert_state_equal(model, before)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)


def test_failed_patch_edit_is_not_half_applied(tiny):
    model = tiny("gpt2").model
    before = state_copy(model)
    session = WeightEditSession(model)
    with pytest.raises(EditError, match="no.such.module"):
        session.apply(Edit(deltas=_deltas(model), patches={"no.such.module": _Scale(0.5)}))
    bad = _Scale(0.5)
    with torch.no_grad():
        bad.scale.fill_(float("inf"))
    with pytest.raises(EditError, match="NaN or Inf"):
        session.apply(Edit(deltas=_deltas(model), patches={_mlp_path(model): bad}))
    assert not session.edited
    assert_state_equal(model, before)


def test_memory_wraps_the_model_until_restore(tiny, records):
    model = tiny("gpt2").model
    seen = []

    def wrap(m, memory):
        seen.append(len(memory))
        return torch.nn.Sequential(m)

    session = WeightEditSession(model)
    assert session.forward_model is model
    session.apply(Edit(memory=records[:1], wrap=wrap))
    first = session.forward_model
    assert first is not model and first is session.forward_model  # built once per memory state
    with session.suspended():
        assert session.forward_model is model
    session.apply(Edit(memory=records[1:3], wrap=wrap))
    assert session.forward_model is not first and seen == [1, 3]
    assert [r.record_id for r in session.memory] == [r.record_id for r in records[:3]]
    session.restore()
    assert session.forward_model is model and not session.edited
    with pytest.raises(ValueError, match="needs `wrap`"):
        Edit(memory=records[:1])


def test_finite_deltas_that_sum_to_inf_are_undone(tiny):
    """Two deltas of 3e38 are each finite; the second makes the weight inf: that call is undone
    (bit-exactly), the first stays, and restore still returns the original."""
    model = tiny("llama").model
    before = state_copy(model)
    name = next(n for n, p in model.named_parameters() if p.dim() == 2)
    session = WeightEditSession(model)
    session.apply({name: torch.full_like(model.get_parameter(name), 3e38)})
    after_first = state_copy(model)
    with pytest.raises(EditError, match=f"makes '{name}' non-finite"):
        session.apply({name: torch.full_like(model.get_parameter(name), 3e38)})
    assert_state_equal(model, after_first)
    assert torch.equal(session.deltas[name], torch.full_like(before[name], 3e38))
    session.restore()
    assert_state_equal(model, before)


def test_a_verifier_that_fails_undoes_only_its_call(tiny, records):
    """``apply(edit, verify)``: a verifier that raises undoes that call's deltas, patches and
    memory; what earlier calls installed stays."""
    model = tiny("llama").model
    before = state_copy(model)
    session = WeightEditSession(model)
    first = _deltas(model, 0.1)
    session.apply(first)
    after_first = state_copy(model)

    def refuse(s):
        assert s.memory == records[:1] and s.edited  # the edit is installed when verified
        raise EditError("refused by the verifier")

    def wrap(m, memory):
        return m

    host = next(n for n, _ in model.named_modules() if n.endswith("layers.0.mlp"))
    edit = Edit(deltas=_deltas(model, 0.5), patches={host: torch.nn.Linear(8, 8)}, memory=records[:1], wrap=wrap)
    with pytest.raises(EditError, match="refused by the verifier"):
        session.apply(edit, verify=refuse)
    assert_state_equal(model, after_first)
    assert not session.memory and not session.patches and set(session.deltas) == set(first)
    session.restore()
    assert_state_equal(model, before)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("editor", ["kn_scale", "ftl_lr"])
def test_edits_that_break_the_forward_are_edit_errors(tiny, records, model_type, editor):
    """KN(new_scale=1e38) and FT-L at lr=1e30 (the issue's reproducers): finite deltas whose edited
    model has non-finite logits or an overflowing residual stream are undone by ``Editor.apply``
    as an EditError; the model is bit-exactly as before."""
    from editlab.methods.ft import FTL
    from editlab.methods.kn import KN

    bundle = tiny(model_type)
    before = state_copy(bundle.model)
    edit = KN(new_scale=1e38, steps=2, batch_size=2) if editor == "kn_scale" else FTL(lr=1e30, num_steps=1)
    with pytest.raises(EditError, match="non-finite|numerically broken"):
        with edit.apply(bundle.model, bundle.tokenizer, records[:1]):
            pass
    assert_state_equal(bundle.model, before)


def test_broken_pairs_names_the_broken_rows(tiny, records):
    """broken_pairs is 0 for a sound model and flags the rows whose forward overflows."""
    from editlab.scoring import broken_pairs

    bundle = tiny("llama")
    prompts, targets = [r.prompt for r in records], [r.target_new for r in records]
    assert broken_pairs(bundle.model, bundle.tokenizer, prompts, targets, blocks_of=bundle.model) == []
    emb = bundle.model.get_input_embeddings().weight
    others = {t for r in (records[0], records[2]) for t in bundle.tokenizer(r.prompt + " " + r.target_new)["input_ids"]}
    token = next(t for t in bundle.tokenizer(records[1].prompt)["input_ids"] if t not in others)
    with applied(bundle.model, {"model.embed_tokens.weight": _row(emb, token, 1e30)}):
        assert broken_pairs(bundle.model, bundle.tokenizer, prompts, targets, blocks_of=bundle.model) == [1]
        # chunks are grouped by length, not by position: the indices are still the caller's
        many = [0, 2, 0, 2, 0, 2, 1, 0]
        assert broken_pairs(bundle.model, bundle.tokenizer, [prompts[i] for i in many], [targets[i] for i in many],
                            blocks_of=bundle.model, chunk_size=3) == [6]


def _row(weight, row, value):
    delta = torch.zeros_like(weight)
    delta[row] = value
    return delta


class _Codebook(torch.nn.Module):
    """A patch holding every edit so far (GRACE-like): adds ``sum(values)`` to its host's output."""

    def __init__(self, values: list[float], width: int):
        super().__init__()
        self.register_buffer("values", torch.tensor(values, dtype=torch.float32))
        self.width = width

    def forward(self, x):
        return torch.full(x.shape[:-1] + (self.width,), float(self.values.sum()), dtype=x.dtype, device=x.device)


class _Stateful(Editor):
    """Each edit replaces the codebook patch with one holding one more value; the stream state is
    the list of values (what a stream checkpoint would hold)."""

    stateful = True

    def __init__(self, host: str, width: int, fail_at: int | None = None):
        self.host, self.width, self.fail_at = host, width, fail_at

    def compute_edit(self, model, tokenizer, records, state=None):
        values = list(state["values"]) if state else []
        values.append(0.01 * (len(values) + 1))
        if self.fail_at is not None and len(values) == self.fail_at:
            raise EditError("refused on purpose")
        return Edit(patches={self.host: _Codebook(values, self.width)}, replace=True, state={"values": values})


def test_a_stateful_editor_replaces_its_patch_and_keeps_its_state_in_the_session(tiny, records):
    """edit_in passes the session's stream state; a replacing patch retires the earlier one at its
    host; a failed edit (here: refused by the verifier) brings back the old patch and state; the
    editor object itself holds nothing; restore forgets the state."""
    bundle = tiny("llama")
    model, tok = bundle.model, bundle.tokenizer
    before = state_copy(model)
    host = next(n for n, _ in model.named_modules() if n.endswith("layers.0.mlp"))
    editor = _Stateful(host, model.config.hidden_size)
    session = WeightEditSession(model)
    inputs = tok(records[0].prompt, return_tensors="pt")
    outputs = []
    for _ in range(3):
        session.apply(editor.edit_in(session, tok, records[:1]))
        outputs.append(model(**inputs).logits)
    assert session.stream_state == {"values": [0.01, 0.02, 0.03]}
    assert len(session.patches) == 1 and session.patches[0].values.tolist() == pytest.approx([0.01, 0.02, 0.03])
    with pytest.raises(EditError, match="undone"):
        session.apply(editor.edit_in(session, tok, records[:1]), verify=lambda s: (_ for _ in ()).throw(
            EditError("undone")))
    assert session.stream_state == {"values": [0.01, 0.02, 0.03]} and len(session.patches) == 1
    assert torch.equal(model(**inputs).logits, outputs[-1])
    with session.suspended():  # the unedited model: the codebook's patch is off
        assert not torch.equal(model(**inputs).logits, outputs[-1])
    with pytest.raises(EditError, match="on purpose"):
        _Stateful(host, model.config.hidden_size, fail_at=4).edit_in(session, tok, records[:1])
    session.restore()
    assert session.stream_state is None and not session.patches
    assert_state_equal(model, before)
    assert all(not m._forward_hooks for m in model.modules())
    with editor.apply(model, tok, records[:1]) as fresh:  # a new session starts a new stream
        assert fresh.stream_state == {"values": [0.01]}
    assert_state_equal(model, before)


class _MaskSeen(torch.nn.Module):
    """A patch that asks for the attention mask and keeps what it got; adds nothing."""

    uses_attention_mask = True

    def __init__(self, width):
        super().__init__()
        self.width, self.seen = width, []

    def forward(self, x, attention_mask=None):
        self.seen.append(attention_mask)
        return x.new_zeros(*x.shape[:-1], self.width)


def test_a_patch_that_asks_gets_the_attention_mask_of_the_model_call(tiny):
    bundle = tiny("llama")
    model = bundle.model
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    patch = _MaskSeen(model.config.hidden_size)
    session = WeightEditSession(model)
    session.apply(Edit(patches={"model.layers.0.mlp.down_proj": patch}))
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        model(input_ids=ids)
    assert torch.equal(patch.seen[0], mask) and patch.seen[1] is None
    assert session._mask is None  # not kept between calls
    with torch.no_grad():  # called through a submodule: no model call, no mask
        model.model.layers[0].mlp(torch.zeros(1, 2, model.config.hidden_size))
    assert len(patch.seen) == 3
    assert patch.seen[-1] is None
    session.restore()
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
