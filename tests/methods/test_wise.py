"""WISE on tiny models: the edit takes through the side memory, inputs routed to the main memory
are answered bit-exactly by the unedited weights, the routing threshold is learned, shards are
stored and merged, the side memory is stream state kept by the session, and nothing of the model
changes."""

import json

import lightning as L
import pytest
import torch

from editlab.data.datamodule import EditDataModule
from editlab.evaluation.teacher_forced import score_pairs
from editlab.lit.callbacks import EditorCallback
from editlab.lit.edit_eval import EditEvalModule
from editlab.methods.base import EditError, WeightEditSession
from editlab.methods import wise as wise_module
from editlab.methods.wise import NO_ACTIVATION, WISE, WiseAdapter, merge_task_vectors
from editlab.tracing import Trace

from conftest import assert_state_equal, state_copy

IRRELEVANT = ["Apple is a company based in California.", "Lionel Messi plays football.",
              "She was a chemist and a physicist."]
# the reference's steps and losses; a smaller learning rate, margins for a 4-block random model
# (its activation scores are ~10, a 7B model's ~20-40) and a denser mask, so that a few edits fit
FAST = dict(layer=-2, context_template_length_params=[], irrelevant_corpus=IRRELEVANT, edit_lr=0.5, n_iter=60,
            act_margin=[2.0, 10.0, 5.0], mask_ratio=0.5)
UNRELATED = "Lionel Messi plays football."
HOST = "model.layers.2.mlp.down_proj"


def _nll(bundle, rec):
    return float(score_pairs(bundle.model, bundle.tokenizer, [rec.prompt], [rec.target_new]).nll[0])


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _route(bundle, adapter, text):
    ids = bundle.tokenizer(text, return_tensors="pt")["input_ids"]
    with Trace(bundle.model, [HOST], retain_input=True) as tr, torch.no_grad():
        bundle.model(input_ids=ids)
    return int(adapter.route(tr.inputs[HOST].float())[0][0])


def test_edit_takes_and_restore_is_bit_exact(tiny_deep, records):
    bundle = tiny_deep("llama")
    model, tok = bundle.model, bundle.tokenizer
    before, hooks = state_copy(model), _hooks(model)
    nll0 = _nll(bundle, records[0])
    with WISE(**FAST).apply(model, tok, records[:1]) as session:
        assert _nll(bundle, records[0]) < nll0 - 2.0
        (adapter,) = session.patches
        assert isinstance(adapter, WiseAdapter) and session.stream_state["count"] == 1
    assert_state_equal(model, before)
    assert _hooks(model) == hooks and not any(isinstance(m, WiseAdapter) for m in model.modules())
    assert all(p.grad is None for p in model.parameters())  # gradients reach the side weight only


def test_threshold_is_learned_and_main_routes_are_bit_equal(tiny_deep, records):
    """The edit prompt routes to the side memory, an unrelated prompt to the main memory, whose
    logits are then bit-equal to the unedited model's; without the margin losses the threshold
    does not separate them."""
    bundle = tiny_deep("llama")
    model, tok = bundle.model, bundle.tokenizer
    unrelated = tok(UNRELATED, return_tensors="pt")
    with torch.no_grad():
        plain = model(**unrelated).logits
    edited_text = records[0].prompt + " " + records[0].target_new
    with WISE(**FAST).apply(model, tok, records[:1]) as session:
        adapter = session.patches[0]
        assert adapter.thresholds[0] == pytest.approx(session.stream_state["act_min"] * 0.88)
        assert _route(bundle, adapter, edited_text) == 0
        assert _route(bundle, adapter, UNRELATED) == -1
        with torch.no_grad():
            assert torch.equal(model(**unrelated).logits, plain)
        trained = session.stream_state["act_min"]
    # the key step: the margin losses push the edit's score up to beta (10); without them the side
    # memory's score stays where the NLL alone leaves it
    assert trained > 9.0
    with WISE(**dict(FAST, act_margin=[1e6, -1e6, -1e6])).apply(model, tok, records[:1]) as session:
        assert session.stream_state["act_min"] < 0.75 * trained


def test_state_passes_through_the_session_and_a_failed_edit_keeps_it(tiny_deep, records):
    bundle = tiny_deep("llama")
    model, tok = bundle.model, bundle.tokenizer
    before, hooks = state_copy(model), _hooks(model)
    editor = WISE(**FAST)
    session = WeightEditSession(model)
    session.apply(editor.edit_in(session, tok, records[:1]))
    first = session.stream_state
    session.apply(editor.edit_in(session, tok, records[2:3]))
    state = session.stream_state
    assert state["count"] == 2 and len(session.patches) == 1  # the new adapter replaced the first
    assert not torch.equal(state["side"], first["side"])  # trained on from the first edit's side memory
    ids = tok(records[0].prompt, return_tensors="pt")
    with torch.no_grad():
        out = model(**ids).logits
    with pytest.raises(EditError, match="refused"):
        session.apply(editor.edit_in(session, tok, records[1:2]),
                      verify=lambda s: (_ for _ in ()).throw(EditError("refused")))
    assert session.stream_state is state and len(session.patches) == 1
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, out)
    assert not hasattr(editor, "state") and not hasattr(editor, "_state")
    session.restore()
    assert session.stream_state is None and _hooks(model) == hooks
    assert_state_equal(model, before)


def test_merge_task_vectors_ties():
    base = torch.zeros(2, 3)
    a = torch.tensor([[1.5, -2.0, 0.1], [3.0, 0.0, -1.0]])
    b = torch.tensor([[1.0, 1.0, 0.2], [-1.0, 0.0, -3.0]])
    merged = merge_task_vectors(base, [a, b], [0.5, 0.5], density=1.0, alg="ties")
    # sign consensus by the weighted sum; the agreeing vectors averaged
    assert torch.allclose(merged, torch.tensor([[1.25, -2.0, 0.15], [3.0, 0.0, -2.0]]))
    sparse = merge_task_vectors(base, [a], [1.0], density=0.5, alg="ties")  # top 3 of 6 by magnitude
    assert torch.equal(sparse, torch.tensor([[1.5, -2.0, 0.0], [3.0, 0.0, 0.0]]))


@pytest.mark.parametrize("retrieve", [True, False])
def test_shards_are_stored_and_merged(tiny_deep, records, retrieve):
    """save_freq=1, merge_freq=2: each edit is a shard with its own mask; the second edit merges
    both (retrieve: into one memory with the smaller threshold; merge: into the merged side memory,
    which the adapter already shows after the first edit)."""
    bundle = tiny_deep("llama")
    model, tok = bundle.model, bundle.tokenizer
    # weight decay (the reference's 1e-5) moves every entry; without it only the mask's entries move
    editor = WISE(**FAST, save_freq=1, merge_freq=2, retrieve=retrieve, weight_decay=0.0)
    main = model.get_submodule(HOST).weight.detach()
    m0, m1 = (editor.shard_mask(main.shape, s, main.device) for s in (0, 1))
    assert not torch.equal(m0, m1) and abs(m0.float().mean().item() - 0.5) < 0.02
    session = WeightEditSession(model)
    try:
        session.apply(editor.edit_in(session, tok, records[:1]))
        s1 = session.stream_state
        assert s1["side"] is None and len(s1["shards"]) == 1 and s1["merges"] == 0
        shard = s1["shards"][0]["weight"]
        assert torch.equal((shard != main) & ~m0, torch.zeros_like(m0))  # only the mask's entries trained
        adapter = session.patches[0]
        if retrieve:
            assert s1["act_min"] == NO_ACTIVATION and s1["shards"][0]["act_min"] < NO_ACTIVATION
            assert torch.equal(adapter.weights()[1], shard)
        else:  # the reference merges pending shards before answering
            assert s1["merged"] is None and adapter.weights()[0] is not None and adapter.weights()[1] is None
        session.apply(editor.edit_in(session, tok, records[2:3]))
        s2 = session.stream_state
        assert s2["merges"] == 1 and s2["side"] is None
        if retrieve:
            assert len(s2["shards"]) == 1
            assert s2["shards"][0]["act_min"] == min(s1["shards"][0]["act_min"], s2["shards"][0]["act_min"])
            merged = s2["shards"][0]["weight"]
        else:
            assert s2["shards"] == [] and s2["merged"] is not None
            merged = s2["merged"]
        changed = merged != main
        assert changed.any() and not torch.equal(merged, shard)
        assert (changed & ~(m0 | m1)).sum() == 0  # TIES keeps only entries some shard trained
    finally:
        session.restore()


def test_sequential_edit_loop_keeps_earlier_edits(tiny_deep, records, tmp_path):
    """Two edits through the edit loop (EditorCallback, sequential): the state passes from edit to
    edit, the first edit still holds when rescored after the stream, and the model is restored."""
    bundle = tiny_deep("llama")
    before, hooks = state_copy(bundle.model), _hooks(bundle.model)
    recs = [records[0], records[2]]
    module = EditEvalModule(bundle, output_dir=str(tmp_path), score_after_stream=True)
    trainer = L.Trainer(accelerator="cpu", devices=1, inference_mode=False, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[EditorCallback(WISE(**FAST, save_freq=1, merge_freq=4), sequential=True)])
    trainer.test(module, datamodule=EditDataModule(test=lambda: recs, batch_size=1), verbose=False)
    rows = [json.loads(x) for x in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert_state_equal(bundle.model, before)
    assert _hooks(bundle.model) == hooks
    assert len(rows) == 2
    summary = module.summary
    assert summary["post/efficacy_score"] >= summary["pre/efficacy_score"]
    # one shard per edit (WISE-Retrieve): the first edit's memory, stored and routed by its own
    # threshold, still answers at the end of the stream
    assert rows[0]["post"]["reliability"] == 1.0 and rows[0]["final"]["reliability"] == 1.0


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_record_is_routed_alike_alone_and_in_a_padded_batch(tiny_deep, records, side):
    """The session passes the adapter the model call's attention mask: padded positions do not vote
    in a row's routing score, so a record's logits in a padded batch (right: teacher forcing, left:
    generation) are those it has alone.  Without the mask the pads would change its score."""
    bundle = tiny_deep("llama")
    model, tok = bundle.model, bundle.tokenizer
    edited = records[0].prompt + " " + records[0].target_new
    longer = UNRELATED + " " + " ".join(["He also scored many goals for his club and for his country."] * 3)
    padding = tok.padding_side
    with WISE(**FAST).apply(model, tok, records[:1]) as session:
        (adapter,) = session.patches
        alone = tok([edited], return_tensors="pt")
        try:
            tok.padding_side = side
            both = tok([edited, longer], return_tensors="pt", padding=True)
        finally:
            tok.padding_side = padding
        real = both["attention_mask"][0].bool()
        assert not real.all()  # the edited text is padded
        with torch.no_grad():
            one = model(**alone).logits[0]
            batched = model(**both).logits[0][real]
        torch.testing.assert_close(batched, one, rtol=1e-4, atol=1e-4)
        assert session._mask is None  # kept only while the model runs
        # the routing scores themselves: row 0's in the padded batch is its score alone
        seen = []
        score = wise_module.activation_score

        def recording(*args, **kwargs):
            seen.append(score(*args, **kwargs))
            return seen[-1]

        with pytest.MonkeyPatch.context() as mp, torch.no_grad():
            mp.setattr(wise_module, "activation_score", recording)
            model(**alone)
            model(**both)
        assert len(seen) == 2
        torch.testing.assert_close(seen[1][0], seen[0][0], rtol=1e-4, atol=1e-4)


def test_routing_diagnostic_script(tiny_deep, records):
    """experiments/wise_routing.py: an input the adapter routes to the side memory is scored with
    it (routed and forced agree); with the threshold out of reach the same input goes to the main
    memory and only the forced side memory gives the edited answer."""
    import importlib.util
    from pathlib import Path

    from editlab.models.arch import get_module

    path = Path(__file__).resolve().parents[2] / "experiments" / "wise_routing.py"
    spec = importlib.util.spec_from_file_location("wise_routing", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    bundle = tiny_deep("llama")
    model, tok = bundle.model, bundle.tokenizer
    before = state_copy(model)
    with WISE(**FAST).apply(model, tok, records[:1]) as session:
        (learned,) = session.patches
        side, threshold = learned.weights()[0].clone(), learned.thresholds[0]
    host = get_module(model, HOST)
    pairs = [(records[0].prompt, records[0].target_new)]
    open_ = WiseAdapter(host, False, "silu", True, [(side, threshold)])
    routed = script.measure(model, tok, host, open_, pairs)
    assert routed["n"] == 1 and routed["routed"] == 1.0 and routed["score_median"] >= threshold
    assert routed["tf_routed"] == routed["tf_side_forced"] > 0.0
    closed = script.measure(model, tok, host, WiseAdapter(host, False, "silu", True, [(side, float("inf"))]), pairs)
    assert closed["routed"] == 0.0 and closed["tf_side_forced"] == routed["tf_side_forced"]
    assert closed["tf_routed"] < closed["tf_side_forced"]
    assert_state_equal(model, before)
