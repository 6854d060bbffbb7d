"""SERAC (editlab/methods/serac.py) on tiny models with the tiny sentence encoder."""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from editlab.data.collate import EditBatchCollator, encode_pairs
from editlab.data.datamodule import EditDataModule
from editlab.data.loaders import load_counterfact_easyedit
from editlab.evaluation.scorer import ScoringSettings
from editlab.lit.callbacks import EditorCallback
from editlab.lit.edit_eval import EditEvalModule
from editlab.lit.checkpoint import load_editor, read_editor_checkpoint
from editlab.lit.editor_train import EditorTrainModule
from editlab.methods.base import EditError, WeightEditSession
from editlab.methods.conditioned import default_bos
from editlab.methods.hyper import target_nll
from editlab.methods.serac import (
    SERAC, CrossScope, EmbeddingScope, balanced_bce, prefixed_batch, row_texts, target_nll_at_targets,
)
from editlab.models.encoder import SentenceEncoder
from editlab.models.tiny import tiny_model
from editlab.evaluation.generation import greedy_generate
from editlab.evaluation.teacher_forced import score_pairs

from conftest import assert_state_equal, state_copy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lit"))
from learned_step import easyedit_records, write_easyedit  # noqa: E402

ENCODER = {"_target_": "editlab.models.encoder.SentenceEncoder.tiny"}
CONFIG = {"_target_": "editlab.methods.serac.SERAC", "encoder": ENCODER}


class KnownScope(nn.Module):
    """A classifier whose scope is known: a query is in an edit's scope iff it starts with one of
    the prompts listed for that edit text (log p = 0), else out of scope (log p = -10)."""

    def __init__(self, scopes: dict[str, list[str]]) -> None:
        super().__init__()
        self.scopes = scopes
        self.unused = nn.Parameter(torch.zeros(()))

    def prepare(self, edits):
        return list(edits)

    def score(self, prepared, queries, pairs=None):
        m = torch.tensor([[0.0 if any(q.startswith(p) for p in self.scopes[e]) else -10.0 for e in prepared]
                          for q in queries])
        return m if pairs is None else m[pairs[:, 0], pairs[:, 1]]


def _serac(bundle, records=(), seed: int = 0, **kwargs) -> SERAC:
    """A bound SERAC with a counterfactual model visibly different from the base model and, given
    ``records``, the known-scope classifier (each record's prompt and rephrasings are its scope)."""
    editor = SERAC(encoder=SentenceEncoder.tiny(), **kwargs)
    editor.bind(bundle.model, bundle.tokenizer)
    if editor.counterfactual is not None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in editor.counterfactual.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    if records:
        editor.classifier = KnownScope({editor.edit_text(r): [r.prompt, *r.rephrase_prompts] for r in records})
    editor.eval()
    return editor


def _rows(bundle, pairs):
    return encode_pairs(bundle.tokenizer, [p for p, _ in pairs], [t for _, t in pairs])


# ------------------------------------------------------------------------------------ routing


def test_routes_in_scope_to_the_counterfactual_and_the_rest_to_the_base_exactly(tiny, records):
    bundle = tiny("llama")
    model, tok = bundle.model, bundle.tokenizer
    memory = records[:2]
    editor = _serac(bundle, memory)
    r0, r1, r2 = records
    inscope = [(r0.prompt, r0.target_new), (r0.rephrase_prompts[0], r0.target_new),
               (r1.rephrase_prompts[1], r1.target_new)]
    outscope = [(r0.locality[0].prompt, r0.locality[0].target), (r2.prompt, r2.target_new),
                (r1.locality[0].prompt, r1.locality[0].target)]
    owners = [r0, r0, r1]
    batch = _rows(bundle, inscope + outscope)
    with editor.apply(model, tok, memory) as session:
        wrapper = session.forward_model
        assert wrapper.is_edit_wrapper
        logits = wrapper(**batch.model_inputs(), use_cache=False).logits
    base = model(**batch.model_inputs(), use_cache=False).logits
    mask = batch.attention_mask.bool()
    n_in = len(inscope)
    # out of scope: the base model's logits at every real position
    torch.testing.assert_close(logits[n_in:][mask[n_in:]], base[n_in:][mask[n_in:]], rtol=0, atol=1e-5)
    # in scope: the counterfactual model on (own edit's prefix + row), built by hand ...
    bos = default_bos(tok)
    for i, owner in enumerate(owners):
        real = batch.input_ids[i][mask[i]].tolist()
        prefix = ([bos] if bos is not None else []) + tok(editor.prefix(owner), add_special_tokens=False)["input_ids"]
        tail = real[1:] if bos is not None and real[0] == bos else real
        shift = len(prefix) - (len(real) - len(tail))
        cf = editor.counterfactual(input_ids=torch.tensor([prefix + tail]), use_cache=False).logits[0]
        got = logits[i, : len(real)]
        want = cf[shift: shift + len(real)]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
        assert not torch.allclose(got, base[i, : len(real)], atol=1e-3)  # the counterfactual model answered
    # ... and as training builds it (prefixed_batch): the same logits at the target positions
    sub = _rows(bundle, inscope)
    pre = prefixed_batch(tok, sub, [editor.prefix(o) for o in owners])
    cf = editor.counterfactual(**pre.model_inputs(), use_cache=False).logits
    rows, pos = sub.gather_index()
    prow, ppos = pre.gather_index()
    torch.testing.assert_close(logits[rows, pos], cf[prow, ppos], rtol=0, atol=1e-4)


def test_router_uses_the_trained_classifier_and_threshold(tiny, records):
    bundle = tiny("llama")
    editor = _serac(bundle)
    with editor.apply(bundle.model, bundle.tokenizer, records[:2]) as session:
        wrapper = session.forward_model
        texts = [records[0].prompt, records[2].prompt]
        routes = wrapper.router(texts)
        index, prob = wrapper.router.last
    logp = editor.classifier.score(editor.classifier.prepare([editor.edit_text(r) for r in records[:2]]), texts)
    best, arg = logp.max(-1)
    assert torch.equal(index, arg) and torch.allclose(prob, best.exp())
    for (model_index, prefix), p, j in zip(routes, best.exp().tolist(), arg.tolist()):
        assert (model_index, prefix) == ((1, editor.prefix(records[j])) if p > 0.5 else (0, ""))


def test_sequential_memory_accumulates_and_restore_forgets_it(tiny, records):
    bundle = tiny("llama")
    model, tok = bundle.model, bundle.tokenizer
    editor = _serac(bundle, records)
    session = WeightEditSession(model)
    session.apply(editor.compute_edit(model, tok, records[:1]))
    session.apply(editor.compute_edit(model, tok, records[1:2]))
    assert [r.record_id for r in session.memory] == [0, 1]
    routes = session.forward_model.router([records[0].prompt, records[1].prompt, records[2].prompt])
    assert routes == [(1, editor.prefix(records[0])), (1, editor.prefix(records[1])), (0, "")]
    session.restore()
    assert session.forward_model is model and not session.memory


def test_edit_leaves_the_base_model_untouched(tiny, records):
    bundle = tiny("llama")
    model, tok = bundle.model, bundle.tokenizer
    before = state_copy(model)
    editor = SERAC(encoder=SentenceEncoder.tiny())
    edit = editor.compute_edit(model, tok, records)  # binds (copies the base model) on first use
    assert_state_equal(model, before)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert edit.memory == tuple(records) and not edit.deltas and not edit.patches
    assert editor.compute_edit(model, tok, records[:1]).wrap is edit.wrap  # one wrap: memories accumulate
    with editor.apply(model, tok, records) as session:
        batch = _rows(bundle, [(r.prompt, r.target_new) for r in records])
        session.forward_model(**batch.model_inputs())
        assert_state_equal(model, before)
    assert_state_equal(model, before)
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(editor.counterfactual.parameters(), model.parameters()))
    with pytest.raises(EditError, match="no records"):
        editor.compute_edit(model, tok, [])


# ------------------------------------------------------------------------------------ training


def test_target_nll_at_targets_equals_the_full_logits_nll(tiny, records):
    bundle = tiny("llama")
    editor = _serac(bundle)
    batch = prefixed_batch(bundle.tokenizer, _rows(bundle, [(r.prompt, r.target_new) for r in records]),
                           [editor.prefix(r) for r in records])
    cf = editor.counterfactual
    nll, acc = target_nll_at_targets(cf, batch)
    full_nll, full_acc = target_nll(cf(**batch.model_inputs(), use_cache=False).logits, batch)
    torch.testing.assert_close(nll, full_nll, rtol=1e-5, atol=1e-6)
    assert float(acc) == float(full_acc)
    nll.backward()
    assert cf.get_output_embeddings().weight.grad is not None


def test_balanced_bce():
    logp = torch.log(torch.tensor([0.9, 0.5, 0.2, 0.4]))
    labels = torch.tensor([1, 1, 0, 0])
    expected = -(torch.log(torch.tensor(0.9)) + torch.log(torch.tensor(0.5))) / 2 \
        - (torch.log(torch.tensor(0.8)) + torch.log(torch.tensor(0.6))) / 2
    assert torch.allclose(balanced_bce(logp, labels), expected)
    assert torch.allclose(balanced_bce(logp[:2], labels[:2]), -(logp[:2]).mean())  # no negatives
    assert torch.isfinite(balanced_bce(torch.zeros(1), torch.zeros(1)))  # p = 1 on a negative


@pytest.mark.parametrize("variant", [{}, {"cross_attend": True}, {"cos": True, "use_all_negatives": True,
                                                                   "rephrase_negatives": True}])
def test_training_losses_train_both_parts(tiny, records, variant):
    """A few optimizer steps lower the classifier's BCE and the counterfactual NLL; every trained
    parameter gets a gradient; the classifier sees the rows as the router will (decoded tokens)."""
    bundle = tiny("llama")
    editor = SERAC(encoder=SentenceEncoder.tiny(), **variant)
    editor.bind(bundle.model, bundle.tokenizer)
    assert isinstance(editor.classifier, CrossScope if variant.get("cross_attend") else EmbeddingScope)
    batch = EditBatchCollator(bundle.tokenizer)(records)
    opt = torch.optim.Adam([p for p in editor.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for _ in range(15):
        out = editor.training_losses(bundle.model, batch)
        opt.zero_grad()
        out["loss"].backward()
        if first is None:
            first = {k: float(v.detach()) for k, v in out.items()}
            missing = [n for n, p in editor.named_parameters() if p.requires_grad and p.grad is None]
            assert not missing, missing
        opt.step()
    last = {k: float(v.detach()) for k, v in editor.training_losses(bundle.model, batch).items()}
    assert last["loss_loc"] < 0.7 * first["loss_loc"] and last["loss_edit"] < 0.7 * first["loss_edit"]
    assert last["cls_acc"] >= max(first["cls_acc"], 0.9)
    assert row_texts(bundle.tokenizer, _rows(bundle, [(records[1].prompt, records[1].target_new)])) == \
        [bundle.tokenizer.decode(_rows(bundle, [(records[1].prompt, records[1].target_new)]).input_ids[0],
                                 skip_special_tokens=True)]


def _data(tmp_path: Path, n_train: int = 8, n_val: int = 4) -> EditDataModule:
    train = write_easyedit(tmp_path / "train.json", n_train)
    val = write_easyedit(tmp_path / "val.json", n_val, offset=n_train)
    return EditDataModule(train=partial(load_counterfact_easyedit, train), val=partial(load_counterfact_easyedit, val),
                          test=partial(load_counterfact_easyedit, val), train_batch_size=4, val_batch_size=2)


def _trainer(max_steps: int, callbacks=(), val_every=None) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, inference_mode=False, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     val_check_interval=val_every, check_val_every_n_epoch=None if val_every else 1,
                     limit_val_batches=None if val_every else 0, callbacks=list(callbacks),
                     enable_checkpointing=bool(callbacks))


def test_fit_changes_classifier_and_counterfactual_only_and_checkpoints_them(tiny, tmp_path):
    bundle = tiny("llama")
    base = state_copy(bundle.model)
    editor = SERAC(encoder=SentenceEncoder.tiny())
    module = EditorTrainModule(bundle, editor, lr=1e-3, editor_config=CONFIG)
    before = {k: v.detach().clone() for k, v in editor.state_dict().items()}
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, monitor="val/loss", mode="min")
    trainer = _trainer(3, [ckpt], val_every=3)
    trainer.fit(module, datamodule=_data(tmp_path))
    trained = [n for n, p in editor.named_parameters() if p.requires_grad]
    assert any(n.startswith("classifier.") for n in trained) and any(n.startswith("counterfactual.") for n in trained)
    for name, param in editor.named_parameters():
        if param.requires_grad:
            assert not torch.equal(before[name], param.detach()), f"{name} did not change"
    assert_state_equal(bundle.model, base)
    assert not any(p.requires_grad for p in bundle.model.parameters()) and not bundle.model.training
    for key in ("val/reliability", "val/locality", "val/loss", "val/loss_loc", "val/edit_acc"):
        assert key in trainer.callback_metrics, key

    checkpoint = read_editor_checkpoint(ckpt.last_model_path)
    keys = list(checkpoint["state_dict"])
    assert keys and all(k.startswith(("editor.classifier.", "editor.counterfactual.")) for k in keys)
    assert checkpoint["editor"]["config"] == CONFIG
    loaded = load_editor(ckpt.last_model_path, bundle)  # rebuilt from the stored config
    assert isinstance(loaded, SERAC) and not loaded.training
    for k, v in editor.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    records = load_counterfact_easyedit(tmp_path / "val.json")
    batch = _rows(bundle, [(r.prompt, r.target_new) for r in records] + [(records[0].locality[0].prompt, "x")])
    editor.eval()
    with editor.apply(bundle.model, bundle.tokenizer, records[:2]) as s:
        a = s.forward_model(**batch.model_inputs()).logits
    with loaded.apply(bundle.model, bundle.tokenizer, records[:2]) as s:
        b = s.forward_model(**batch.model_inputs()).logits
    assert torch.equal(a, b)
    assert_state_equal(bundle.model, base)


# ------------------------------------------------------------------------------------ edit loop


@pytest.mark.parametrize("sequential", [False, True])
def test_edit_loop_scores_through_serac(tiny, tmp_path, sequential):
    """EditEvalModule + EditorCallback: locality rows go to the base model (agreement 1.0),
    reliability is the counterfactual model's accuracy on the prefixed edit prompt."""
    bundle = tiny("llama")
    base = state_copy(bundle.model)
    rows = easyedit_records(4)
    for row in rows:  # locality probes outside every edit's scope (the fixture's ask about other capitals)
        row["locality_prompt"] = f"The official language of {row['subject']} is"
    path = tmp_path / "test.json"
    path.write_text(json.dumps(rows))
    records = load_counterfact_easyedit(path)
    editor = _serac(bundle, records)
    dm = EditDataModule(test=partial(load_counterfact_easyedit, path), batch_size=2)
    evaluation = EditEvalModule(bundle, ScoringSettings(probability_comparison=False), score_after_stream=sequential)
    L.Trainer(accelerator="cpu", devices=1, inference_mode=False, logger=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[EditorCallback(editor, sequential=sequential)]
              ).test(evaluation, datamodule=dm, verbose=False)
    summary = evaluation.summary
    assert summary["post/locality"] == 1.0
    accuracy = []
    for r in records:
        batch = encode_pairs(bundle.tokenizer, [r.prompt], [r.target_new])
        pre = prefixed_batch(bundle.tokenizer, batch, [editor.prefix(r)])
        with torch.no_grad():
            logits = editor.counterfactual(**pre.model_inputs()).logits
        rows, pos = pre.gather_index()
        accuracy.append(float((logits[rows, pos].argmax(-1) == pre.target_ids[pre.target_mask]).float().mean()))
    assert summary["post/reliability"] == pytest.approx(sum(accuracy) / len(accuracy), abs=1e-6)
    if sequential:
        assert summary["final/locality"] == 1.0
    assert_state_equal(bundle.model, base)


# ------------------------------------------------------------------------------------ errors


def test_bad_settings_and_models(tiny):
    with pytest.raises(ValueError, match="threshold"):
        SERAC(threshold=1.0)
    with pytest.raises(ValueError, match="prefix_template"):
        SERAC(prefix_template="{subject} {target}")
    with pytest.raises(ValueError, match="freeze_cntr"):
        SERAC(freeze_cntr=True, counterfactual="distilgpt2")
    t5 = tiny("t5")
    with pytest.raises(TypeError, match="must be an encoder-decoder model"):
        SERAC(encoder=SentenceEncoder.tiny(), counterfactual=tiny("llama").model).bind(t5.model, t5.tokenizer)
    with pytest.raises(TypeError, match="must be a decoder-only model"):
        SERAC(encoder=SentenceEncoder.tiny(), counterfactual=t5.model).bind(tiny("llama").model, t5.tokenizer)
    with pytest.raises(EditError, match="not bound"):
        SERAC(encoder=SentenceEncoder.tiny()).conditioned(tiny("llama").model, [])


def test_counterfactual_model_choices(tiny, records):
    """freeze_cntr routes in-scope rows to the base model with the edit's prefix (no trained
    counterfactual); a given model with a smaller vocabulary is resized to the base's."""
    bundle = tiny("llama")
    frozen = _serac(bundle, records, freeze_cntr=True)
    assert frozen.counterfactual is None and not any(k.startswith("counterfactual") for k in frozen.state_dict())
    batch = _rows(bundle, [(records[0].prompt, records[0].target_new)])
    with frozen.apply(bundle.model, bundle.tokenizer, records[:1]) as session:
        wrapper = session.forward_model
        assert wrapper.router([records[0].prompt]) == [(0, frozen.prefix(records[0]))]
        got = wrapper(**batch.model_inputs()).logits
    pre = prefixed_batch(bundle.tokenizer, batch, [frozen.prefix(records[0])])
    want = bundle.model(**pre.model_inputs()).logits
    torch.testing.assert_close(got[batch.gather_index()], want[pre.gather_index()], rtol=0, atol=1e-4)

    small = tiny_model("llama", seed=1, vocab_size=len(bundle.tokenizer) - 5)
    editor = SERAC(encoder=SentenceEncoder.tiny(), counterfactual=small)
    editor.bind(bundle.model, bundle.tokenizer)
    size = bundle.model.get_output_embeddings().weight.shape[0]
    assert editor.counterfactual.get_output_embeddings().weight.shape[0] == size
    assert editor.counterfactual is small.model and all(p.requires_grad for p in small.model.parameters())

    # a loader (what a `_target_` + `_partial_: true` config gives, e.g. a packaged model)
    loaded = SERAC(encoder=SentenceEncoder.tiny(), counterfactual=partial(tiny_model, "gpt2", seed=2))
    loaded.bind(bundle.model, bundle.tokenizer)
    assert type(loaded.counterfactual).__name__ == "GPT2LMHeadModel"
    with loaded.apply(bundle.model, bundle.tokenizer, records[:1]) as session:
        assert len(session.forward_model.models) == 2


# ------------------------------------------------------------------------------------ T5


def _seq2seq_rows(bundle, pairs):
    return encode_pairs(bundle.tokenizer, [p for p, _ in pairs], [t for _, t in pairs], seq2seq=True,
                        decoder_start_token_id=bundle.model.config.decoder_start_token_id)


def test_t5_routes_in_scope_to_the_counterfactual_on_the_prefixed_encoder_input(tiny, records):
    """T5 base + T5 counterfactual: out-of-scope rows get the base model's decoder logits; in-scope
    rows the counterfactual model's on (edit prefix + encoder input) with the row's own decoder
    input, as prefixed_batch (training) builds it; scoring and generation run through the wrapper."""
    bundle = tiny("t5")
    model, tok = bundle.model, bundle.tokenizer
    before = state_copy(model)
    memory = records[:2]
    editor = _serac(bundle, memory, counterfactual=tiny_model("t5", seed=1))
    r0, r1, r2 = records
    inscope = [(r0.prompt, r0.target_new), (r0.rephrase_prompts[0], r0.target_new),
               (r1.rephrase_prompts[1], r1.target_new)]
    outscope = [(r0.locality[0].prompt, r0.locality[0].target), (r2.prompt, r2.target_new)]
    owners = [r0, r0, r1]
    batch = _seq2seq_rows(bundle, inscope + outscope)
    with editor.apply(model, tok, memory) as session:
        wrapper = session.forward_model
        assert wrapper.seq2seq and len(wrapper.models) == 2
        with torch.no_grad():
            logits = wrapper(**batch.model_inputs()).logits
            base = model(**batch.model_inputs()).logits
        dec = batch.decoder_attention_mask.bool()
        n_in = len(inscope)
        torch.testing.assert_close(logits[n_in:][dec[n_in:]], base[n_in:][dec[n_in:]], rtol=0, atol=1e-5)
        for i, owner in enumerate(owners):
            own = batch.input_ids[i][batch.attention_mask[i].bool()].tolist()
            encoder = tok(editor.prefix(owner), add_special_tokens=False)["input_ids"] + own
            with torch.no_grad():
                cf = editor.counterfactual(input_ids=torch.tensor([encoder]),
                                           decoder_input_ids=batch.decoder_input_ids[i: i + 1]).logits[0]
            torch.testing.assert_close(logits[i][dec[i]], cf[dec[i]], rtol=0, atol=1e-4)
            assert not torch.allclose(logits[i][dec[i]], base[i][dec[i]], atol=1e-3)
        sub = _seq2seq_rows(bundle, inscope)
        pre = prefixed_batch(tok, sub, [editor.prefix(o) for o in owners])
        assert torch.equal(pre.decoder_input_ids, sub.decoder_input_ids) and torch.equal(pre.positions, sub.positions)
        with torch.no_grad():
            cf = editor.counterfactual(**pre.model_inputs()).logits
        torch.testing.assert_close(logits[sub.gather_index()], cf[pre.gather_index()], rtol=0, atol=1e-4)

        prompts = [p for p, _ in inscope + outscope]
        targets = [t for _, t in inscope + outscope]
        scores = score_pairs(wrapper, tok, prompts, targets)
        prefixed = [editor.prefix(o) + p for o, (p, _) in zip(owners, inscope)]
        in_ref = score_pairs(editor.counterfactual, tok, prefixed, targets[:n_in])
        out_ref = score_pairs(model, tok, prompts[n_in:], targets[n_in:])
        torch.testing.assert_close(scores.nll, torch.cat([in_ref.nll, out_ref.nll]), rtol=0, atol=1e-5)
        generated = greedy_generate(wrapper, tok, prompts, max_new_tokens=4)
        assert generated == (greedy_generate(editor.counterfactual, tok, prefixed, max_new_tokens=4)
                             + greedy_generate(model, tok, prompts[n_in:], max_new_tokens=4))
    assert_state_equal(model, before)


def test_t5_training_losses(tiny, records):
    """SERAC trains on a T5 base: the counterfactual NLL is that of the prefixed encoder input
    (decoder scores the target), every trained parameter gets a gradient, and steps lower it."""
    bundle = tiny("t5")
    start = bundle.model.config.decoder_start_token_id
    editor = SERAC(encoder=SentenceEncoder.tiny())
    editor.bind(bundle.model, bundle.tokenizer)
    batch = EditBatchCollator(bundle.tokenizer, seq2seq=True, decoder_start_token_id=start)(records)
    out = editor.training_losses(bundle.model, batch)
    inscope = _seq2seq_rows(bundle, [(r.rephrase_prompts[0] if r.rephrase_prompts else r.prompt, r.target_new)
                                     for r in records])
    pre = prefixed_batch(bundle.tokenizer, inscope, [editor.prefix(r) for r in records])
    full_nll, _ = target_nll(editor.counterfactual(**pre.model_inputs()).logits, pre)
    torch.testing.assert_close(out["loss_edit"], full_nll, rtol=1e-5, atol=1e-6)
    opt = torch.optim.Adam([p for p in editor.parameters() if p.requires_grad], lr=3e-3)
    first = float(out["loss"].detach())
    out["loss"].backward()
    missing = [n for n, p in editor.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    for _ in range(5):
        opt.step()
        opt.zero_grad()
        editor.training_losses(bundle.model, batch)["loss"].backward()
    assert float(editor.training_losses(bundle.model, batch)["loss"].detach()) < first


def test_t5_fit_and_edit_loop(tiny, tmp_path):
    """EditorTrainModule trains SERAC on a T5 base (seq2seq batches, validation through the
    wrapper) and the edit loop scores and generates through it."""
    bundle = tiny("t5")
    base = state_copy(bundle.model)
    editor = SERAC(encoder=SentenceEncoder.tiny())
    module = EditorTrainModule(bundle, editor, lr=1e-3, editor_config=CONFIG)
    assert module.collator.seq2seq
    trainer = _trainer(2, val_every=2)
    trainer.fit(module, datamodule=_data(tmp_path))
    for key in ("val/reliability", "val/locality", "val/loss_edit"):
        assert key in trainer.callback_metrics, key
    assert_state_equal(bundle.model, base)
    editor.eval()
    evaluation = EditEvalModule(bundle, ScoringSettings(scoring_modes=["teacher_forced", "generation"]))
    dm = EditDataModule(test=partial(load_counterfact_easyedit, write_easyedit(tmp_path / "test.json", 2)),
                        batch_size=1)
    L.Trainer(accelerator="cpu", devices=1, inference_mode=False, logger=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[EditorCallback(editor)]).test(evaluation, datamodule=dm,
                                                                                 verbose=False)
    for key in ("post/reliability", "post/locality", "post/reliability@generation_em"):
        assert key in evaluation.summary, key
    assert_state_equal(bundle.model, base)


def test_routing_embeds_each_edit_once_alone_until_the_classifier_changes(tiny, records, monkeypatch):
    """Eval-mode ``prepare`` (routing) embeds each new edit alone and reuses it as the memory
    grows; training, or any change of the classifier's weights, embeds afresh."""
    bundle = tiny("llama")
    editor = _serac(bundle)
    scope = editor.classifier
    assert isinstance(scope, EmbeddingScope)
    texts = [editor.edit_text(r) for r in records[:3]]
    calls = []
    embed = scope.embed
    monkeypatch.setattr(scope, "embed", lambda batch: calls.append(list(batch)) or embed(batch))
    scope.eval()
    with torch.no_grad():
        first = scope.prepare(texts[:2])
        grown = scope.prepare(texts)  # one edit more: only it is embedded
        assert calls == [[texts[0]], [texts[1]], [texts[2]]]
        assert torch.equal(grown[:2], first)
        alone = torch.cat([embed([t]) for t in texts])
        assert torch.equal(grown, alone)
        torch.testing.assert_close(grown, embed(texts), rtol=0, atol=1e-5)  # as one padded batch
        calls.clear()
        scope.prepare(texts[::-1] + texts[:1])  # order and repeats: no new embedding
        assert calls == []
        next(scope.parameters()).add_(0.01)  # new weights: embedded again
        again = scope.prepare(texts[:1])
        assert calls == [[texts[0]]] and not torch.equal(again[0], grown[0])
    calls.clear()
    scope.train()
    with torch.no_grad():
        scope.prepare(texts)
    scope.eval()
    scope.prepare(texts)  # gradients on: the batch as given
    assert calls == [texts, texts]
