"""ConditionedLM (editlab/methods/conditioned.py): routed, prefix-conditioned view of causal LMs."""

import pytest
import torch
from tokenizers import processors

from editlab.data.collate import encode_pairs
from editlab.evaluation.general import token_nll
from editlab.methods.conditioned import ConditionedLM
from editlab.models.tiny import tiny_model, tiny_tokenizer
from editlab.evaluation.generation import greedy_generate
from editlab.evaluation.teacher_forced import score_pairs
from editlab.scoring import is_edit_wrapper, lm_logits_at

from conftest import assert_state_equal, state_copy

PROMPTS = ["The capital of France is", "Paris is the capital of", "Sony is a company from Japan and",
           "Apple is a company based in"]
TARGETS = ["Rome", "Germany", "Tokyo", "California"]
PREFIX = "The capital of Italy is Rome.\nThe official language of Italy is Italian.\n"


def fixed(prefix, index=0):
    return lambda texts: [(index, prefix)] * len(texts)


def bos_bundle(model_type="llama", seed=0):
    """A tiny model whose tokenizer puts <bos> before every text (like Llama's)."""
    bundle = tiny_model(model_type, seed=seed)
    tok = bundle.tokenizer
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", tok.bos_token_id)])
    assert tok("a")["input_ids"][0] == tok.bos_token_id
    return bundle


def encode(tok, texts, side):
    tok.padding_side = side
    try:
        return tok(texts, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = "right"


def direct_logits(model, tok, text, n):
    """The last ``n`` positions' logits of ``text`` run alone."""
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt")).logits[0, -n:]


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_empty_prefix_reproduces_the_model(tiny, model_type, side):
    bundle = tiny(model_type)
    model, tok = bundle.model, bundle.tokenizer
    wrapper = ConditionedLM(model, tok, fixed(""))
    assert is_edit_wrapper(wrapper) and wrapper.config is model.config
    enc = encode(tok, PROMPTS, side)
    mask = enc["attention_mask"].bool()
    with torch.no_grad():
        out = wrapper(**enc, use_cache=False).logits
        ref = model(**encode(tok, PROMPTS, "right")).logits  # right padding: unpadded positions
    ref_mask = encode(tok, PROMPTS, "right")["attention_mask"].bool()
    assert out.shape == (*enc["input_ids"].shape, ref.shape[-1])
    assert torch.allclose(out[mask], ref[ref_mask], atol=1e-5)
    assert (out[~mask] == 0).all()
    if side == "right":  # the very same batch: the model's own logits
        assert torch.allclose(out[mask], model(**enc).logits[mask], atol=1e-6)


@pytest.mark.parametrize("bos", [False, True])
@pytest.mark.parametrize("prefix_cache", [True, False])
@pytest.mark.parametrize("side", ["right", "left"])
def test_prefixed_logits_equal_running_prefix_plus_input(tiny, bos, prefix_cache, side):
    bundle = bos_bundle() if bos else tiny("llama")
    model, tok = bundle.model, bundle.tokenizer
    wrapper = ConditionedLM(model, tok, fixed(PREFIX), prefix_cache=prefix_cache)
    enc = encode(tok, PROMPTS, side)
    with torch.no_grad():
        out = wrapper(**enc).logits
    for i, prompt in enumerate(PROMPTS):
        mask = enc["attention_mask"][i].bool()
        n = int(mask.sum())
        # the prefix ends with a newline, so tokenising prefix + prompt splits at the boundary
        assert len(tok(PREFIX + prompt)["input_ids"]) == len(wrapper.prefix_ids(PREFIX)) + n - int(bos)
        assert torch.allclose(out[i][mask], direct_logits(model, tok, PREFIX + prompt, n), atol=1e-5)
    n_prefix = len(tok(PREFIX, add_special_tokens=False)["input_ids"])
    assert wrapper.context_rows == len(PROMPTS) and wrapper.context_tokens == len(PROMPTS) * n_prefix


def test_rows_with_different_prefixes_and_models(tiny):
    base, other = tiny("gpt2"), tiny_model("gpt2", seed=7)
    tok = base.tokenizer
    prefixes = ["", PREFIX, "Rome is a city in Italy.\n", PREFIX]

    def router(texts):
        assert texts == PROMPTS  # rows decoded without padding or special tokens
        return [(i % 2, prefixes[i]) for i in range(len(texts))]

    wrapper = ConditionedLM(base.model, tok, router, models=[base.model, other.model], max_batch_tokens=40)
    enc = encode(tok, PROMPTS, "left")
    with torch.no_grad():
        out = wrapper(**enc).logits
    for i, prompt in enumerate(PROMPTS):
        mask = enc["attention_mask"][i].bool()
        model = [base.model, other.model][i % 2]
        assert torch.allclose(out[i][mask], direct_logits(model, tok, prefixes[i] + prompt, int(mask.sum())),
                              atol=1e-5)


def test_scoring_and_generation_go_through_the_wrapper(tiny):
    bundle = tiny("llama")
    model, tok = bundle.model, bundle.tokenizer
    before = state_copy(model)
    wrapper = ConditionedLM(model, tok, fixed(PREFIX))
    prefixed = [PREFIX + p for p in PROMPTS]
    via, direct = score_pairs(wrapper, tok, PROMPTS, TARGETS), score_pairs(model, tok, prefixed, TARGETS)
    assert torch.allclose(via.nll, direct.nll, atol=1e-5)
    assert torch.equal(via.pred[via.mask], direct.pred[direct.mask])
    assert greedy_generate(wrapper, tok, PROMPTS, max_new_tokens=6) == greedy_generate(model, tok, prefixed,
                                                                                       max_new_tokens=6)
    caps = [2, 5, 3, 4]
    assert (greedy_generate(wrapper, tok, PROMPTS, max_new_tokens=caps, stop_at_answer_end=True)
            == greedy_generate(model, tok, prefixed, max_new_tokens=caps, stop_at_answer_end=True))
    assert_state_equal(model, before)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_generate_with_several_models_and_sub_batches(tiny):
    """Rows split over two models and token-bounded sub-batches generate as each model would
    alone, and per-row stopping criteria end in the state of a single batch."""
    base, other = tiny("llama"), tiny_model("llama", seed=3)
    tok = base.tokenizer
    routes = [(0, PREFIX), (1, ""), (1, PREFIX), (0, "")]
    by_text = dict(zip(PROMPTS, routes))  # greedy_generate reorders the prompts (by cap and length)
    wrapper = ConditionedLM(base.model, tok, lambda texts: [by_text[t] for t in texts],
                            models=[base.model, other.model], max_batch_tokens=30)
    caps = [4, 2, 6, 3]
    got = greedy_generate(wrapper, tok, PROMPTS, max_new_tokens=caps, stop_at_answer_end=True)
    for i, (index, prefix) in enumerate(routes):
        model = [base.model, other.model][index]
        assert got[i] == greedy_generate(model, tok, [prefix + PROMPTS[i]], max_new_tokens=caps[i],
                                         stop_at_answer_end=True)[0]


@pytest.mark.parametrize("model_type,bos", [("gpt2", False), ("llama", False), ("llama", True)])
def test_generate_reuses_the_shared_prefix_cache(tiny, model_type, bos):
    """Rows sharing a prefix generate against its cached keys/values ([prefix | padding | row]):
    the same tokens as running every prefixed row whole, and the prefix runs once across calls."""
    bundle = bos_bundle(model_type) if bos else tiny(model_type)
    model, tok = bundle.model, bundle.tokenizer
    prompts = PROMPTS + ["Rome", "The official language of the country whose capital is Paris is"]
    cached = ConditionedLM(model, tok, fixed(PREFIX))
    whole = ConditionedLM(model, tok, fixed(PREFIX), prefix_cache=False)
    caps = [3, 6, 2, 5, 4, 6]
    got = greedy_generate(cached, tok, prompts, max_new_tokens=caps, stop_at_answer_end=True)
    assert got == greedy_generate(whole, tok, prompts, max_new_tokens=caps, stop_at_answer_end=True)
    assert got == greedy_generate(model, tok, [PREFIX + p for p in prompts], max_new_tokens=caps,
                                  stop_at_answer_end=True)
    assert len(cached._kv) == 1
    runs = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, i, o: runs.append(i[0].shape[1]))
    n_prefix = len(cached.prefix_ids(PREFIX))
    try:
        greedy_generate(cached, tok, prompts[:2], max_new_tokens=2)  # a new hook: the prefix runs again
        assert runs[0] == n_prefix and max(runs[1:]) < n_prefix
        runs.clear()
        greedy_generate(cached, tok, prompts[2:4], max_new_tokens=2)  # unchanged model: cache hit
        assert runs and max(runs) < n_prefix
    finally:
        handle.remove()


def test_bos_is_carried_by_the_prefix(tiny):
    bundle = bos_bundle()
    model, tok = bundle.model, bundle.tokenizer
    wrapper = ConditionedLM(model, tok, fixed(PREFIX))
    ids = wrapper.prefix_ids(PREFIX)
    assert ids[0] == tok.bos_token_id and list(ids) == tok(PREFIX)["input_ids"]
    prefixed = [PREFIX + p for p in PROMPTS]
    assert greedy_generate(wrapper, tok, PROMPTS, max_new_tokens=4) == greedy_generate(model, tok, prefixed,
                                                                                       max_new_tokens=4)
    batch = tok(PROMPTS[:1], return_tensors="pt")
    with torch.no_grad():
        first = wrapper(**batch).logits[0, 0]  # logits at the input's own BOS: after the whole prefix
        full = model(**tok(PREFIX + PROMPTS[0], return_tensors="pt")).logits[0]
    assert torch.allclose(first, full[len(ids) - 1], atol=1e-5)


def test_token_nll_through_a_wrapper(tiny):
    bundle = tiny("gpt2")
    model, tok = bundle.model, bundle.tokenizer
    ids = tok(["The capital of France is Paris. The capital of Italy is Rome.",
               "Sony is a company from Japan. Toyota is a company from Japan."], return_tensors="pt",
              padding=True)["input_ids"][:, :12]
    with torch.no_grad():
        plain = token_nll(model, ids)
        assert torch.allclose(token_nll(ConditionedLM(model, tok, fixed("")), ids, logit_rows=8), plain, atol=1e-5)
        prefixed = token_nll(ConditionedLM(model, tok, fixed(PREFIX)), ids)
    assert prefixed.shape == plain.shape and not torch.allclose(prefixed, plain)
    n = len(tok(PREFIX)["input_ids"])
    with torch.no_grad():
        full = token_nll(model, torch.cat([torch.tensor([tok(PREFIX)["input_ids"]]), ids[:1]], dim=1))
    assert torch.allclose(prefixed[0], full[0, n:], atol=1e-5)


def test_lm_logits_at_reads_the_wrapper(tiny):
    bundle = tiny("llama")
    wrapper = ConditionedLM(bundle.model, bundle.tokenizer, fixed(""))
    batch = encode_pairs(bundle.tokenizer, PROMPTS, TARGETS)
    with torch.no_grad():
        assert torch.allclose(lm_logits_at(wrapper, batch), lm_logits_at(bundle.model, batch), atol=1e-5)


def test_bad_routes_and_models_are_clear_errors(tiny):
    bundle = tiny("llama")
    model, tok = bundle.model, bundle.tokenizer
    enc = tok(PROMPTS[:2], return_tensors="pt", padding=True)
    with pytest.raises(ValueError, match="1 routes for 2 rows"):
        ConditionedLM(model, tok, lambda texts: [(0, "")])(**enc)
    with pytest.raises(ValueError, match="route of row 0: model index 1"):
        ConditionedLM(model, tok, fixed("", index=1))(**enc)
    with pytest.raises(ValueError, match="route of row 0: prefix must be a string"):
        ConditionedLM(model, tok, lambda texts: [(0, None)] * len(texts))(**enc)
    with pytest.raises(ValueError, match="takes at most 128 positions"):
        ConditionedLM(model, tok, fixed("Rome " * 200))(**enc)
    with pytest.raises(TypeError, match="does not take"):
        ConditionedLM(model, tok, fixed(""))(**enc, labels=enc["input_ids"])
    t5 = tiny("t5")
    with pytest.raises(TypeError, match="all be decoder-only or all encoder-decoder"):
        ConditionedLM(t5.model, t5.tokenizer, fixed(""), models=[t5.model, model])
    with pytest.raises(ValueError, match="needs decoder_input_ids"):
        ConditionedLM(t5.model, t5.tokenizer, fixed(""))(**enc)
    with pytest.raises(TypeError, match="does not take decoder_input_ids"):
        ConditionedLM(model, tok, fixed(""))(**enc, decoder_input_ids=enc["input_ids"])
    with pytest.raises(ValueError, match="position 0 of row 0 is padding"):
        left = encode(tok, PROMPTS[:2], "left")
        ConditionedLM(model, tok, fixed("")).logits_at(torch.tensor([0]), torch.tensor([0]), **left)
    with pytest.raises(ValueError, match="models\\[0\\]"):
        ConditionedLM(model, tok, fixed(""), models=[tiny("gpt2").model])
    assert tiny_tokenizer().pad_token_id == tok.pad_token_id


def test_prefix_cache_is_reused_until_the_model_changes(tiny):
    bundle = tiny_model("llama", seed=5)  # modified below: not the shared fixture
    model, tok = bundle.model, bundle.tokenizer
    wrapper = ConditionedLM(model, tok, fixed(PREFIX))
    calls = []
    run = wrapper._head_inputs
    wrapper._head_inputs = lambda *a, **k: calls.append(a[1].shape) or run(*a, **k)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        first = wrapper(**enc).logits
        second = wrapper(**enc).logits
        assert len(calls) == 3 and torch.equal(first, second)  # prefix once, rows twice
        model.get_output_embeddings().weight.mul_(1.0)  # an in-place write: the prefix runs again
        wrapper(**enc)
        assert len(calls) == 5
        handle = model.model.layers[0].mlp.register_forward_hook(lambda m, a, o: o * 2)
        try:
            hooked = wrapper(**enc).logits
            assert len(calls) == 7 and not torch.allclose(hooked, first)
            mask = enc["attention_mask"][0].bool()
            assert torch.allclose(hooked[0][mask], direct_logits(model, tok, PREFIX + PROMPTS[0], int(mask.sum())),
                                  atol=1e-5)
        finally:
            handle.remove()
    wrapper(**enc)  # with gradients on nothing is kept
    wrapper(**enc)
    assert len(calls) == 11


@pytest.mark.parametrize("bos", [False, True])
def test_text_join_runs_the_prefixed_text_as_the_tokenizer_encodes_it(tiny, bos):
    """A prefix ending in a space: with ``text_join`` each row runs as ``tokenizer(prefix + text)``
    (the row's first word merges with the space), scoring and generating exactly like the
    prefixed prompts; the plain token concatenation differs."""
    bundle = bos_bundle(seed=0) if bos else tiny("llama")
    model, tok = bundle.model, bundle.tokenizer
    prefix = PREFIX + "The capital of Germany is Berlin.\nPrompt: "
    joined = ConditionedLM(model, tok, fixed(prefix), text_join=True)
    plain = ConditionedLM(model, tok, fixed(prefix))
    enc = encode(tok, PROMPTS, "left")
    with torch.no_grad():
        out, concat = joined(**enc).logits, plain(**enc).logits
    added = sum(len(tok(prefix + p)["input_ids"]) for p in PROMPTS) - int(enc["attention_mask"].sum())
    assert joined.context_tokens == added and joined.context_rows == len(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        mask = enc["attention_mask"][i].bool()
        n = int(mask.sum())
        assert torch.allclose(out[i][mask], direct_logits(model, tok, prefix + prompt, n), atol=1e-5)
        assert not torch.allclose(concat[i][mask], out[i][mask], atol=1e-3)
    prefixed = [prefix + p for p in PROMPTS]
    assert torch.allclose(score_pairs(joined, tok, PROMPTS, TARGETS).nll, score_pairs(model, tok, prefixed, TARGETS).nll,
                          atol=1e-5)
    caps = [3, 5, 2, 4]
    assert (greedy_generate(joined, tok, PROMPTS, max_new_tokens=caps, stop_at_answer_end=True)
            == greedy_generate(model, tok, prefixed, max_new_tokens=caps, stop_at_answer_end=True))


# ------------------------------------------------------------------ logits only where asked


def _real_positions(mask, every=1):
    """(rows, columns) of every ``every``-th real position, row-major."""
    rows, cols = torch.nonzero(mask, as_tuple=True)
    return rows[::every], cols[::every]


@pytest.mark.parametrize("model_type,bos,prefix_cache", [("gpt2", False, True), ("llama", True, True),
                                                         ("llama", False, False)])
@pytest.mark.parametrize("side", ["right", "left"])
def test_logits_at_equals_the_full_logits(tiny, model_type, bos, prefix_cache, side):
    """logits_at = forward(...).logits[rows, pos], with the LM head applied only at those positions
    and rows without a requested position not run; lm_logits_at and token_nll go through it."""
    bundle = bos_bundle(model_type) if bos else tiny(model_type)
    model, tok = bundle.model, bundle.tokenizer
    routes = [(0, PREFIX), (0, ""), (0, "Rome is a city in Italy.\n"), (0, PREFIX)]
    wrapper = ConditionedLM(model, tok, lambda texts: routes[: len(texts)], prefix_cache=prefix_cache)
    enc = encode(tok, PROMPTS, side)
    rows, pos = _real_positions(enc["attention_mask"].bool(), every=3)
    rows, pos = rows[rows != 1], pos[rows != 1]  # row 1 has nothing requested
    with torch.no_grad():
        full = wrapper(**enc).logits
        projected = []
        head = wrapper._head
        wrapper._head = lambda index, hidden: projected.append(hidden.shape[0]) or head(index, hidden)
        wrapper.context_rows = 0
        got = wrapper.logits_at(rows, pos, **enc)
    assert got.shape == (len(rows), full.shape[-1])
    assert torch.allclose(got, full[rows, pos], atol=1e-5)
    assert sum(projected) == len(rows)  # the head saw the requested positions only
    assert wrapper.context_rows == len(PROMPTS) - 1  # row 1 was not run

    tok.padding_side = side
    try:
        batch = encode_pairs(tok, PROMPTS, TARGETS)
    finally:
        tok.padding_side = "right"
    wrapper._head = head
    with torch.no_grad():
        aligned = wrapper(**batch.model_inputs()).logits[batch.gather_index()]
        assert torch.allclose(lm_logits_at(wrapper, batch), aligned, atol=1e-5)


def test_token_nll_projects_only_the_scored_positions(tiny):
    bundle = tiny("llama")
    model, tok = bundle.model, bundle.tokenizer
    ids = tok(["The capital of France is Paris. The capital of Italy is Rome.",
               "Sony is a company from Japan. Toyota is a company from Japan.",
               "Apple is a company based in California."], return_tensors="pt", padding=True)["input_ids"][:, :9]
    wrapper = ConditionedLM(model, tok, fixed(PREFIX))

    def no_full_logits(*args, **kwargs):
        raise AssertionError("token_nll asked the wrapper for full logits")

    with torch.no_grad():
        via_forward = [ConditionedLM(model, tok, fixed(PREFIX))(input_ids=ids[i: i + 1]).logits[0, :-1]
                       for i in range(len(ids))]
        wrapper.forward = no_full_logits
        nll = token_nll(wrapper, ids, logit_rows=16)  # two rows (16 positions) per call
    for i, logits in enumerate(via_forward):
        ref = -torch.log_softmax(logits, -1).gather(1, ids[i, 1:, None]).squeeze(1)
        assert torch.allclose(nll[i], ref, atol=1e-5)


# ------------------------------------------------------------------ encoder-decoder models (T5)


def eos_t5(seed=0):
    """A tiny T5 whose tokenizer appends </s> (here <eos>) to every text, as T5's does."""
    bundle = tiny_model("t5", seed=seed)
    tok = bundle.tokenizer
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A <eos>", pair="$A <eos> $B <eos>", special_tokens=[("<eos>", tok.eos_token_id)])
    assert tok("a")["input_ids"][-1] == tok.eos_token_id
    return bundle


def seq2seq_pairs(bundle, prompts=PROMPTS, targets=TARGETS, side="right"):
    tok = bundle.tokenizer
    tok.padding_side = side
    try:
        return encode_pairs(tok, prompts, targets, seq2seq=True,
                            decoder_start_token_id=bundle.model.config.decoder_start_token_id)
    finally:
        tok.padding_side = "right"


def left_pad(batch, pad):
    """``batch`` with its encoder input moved to left padding."""
    ids, mask = torch.full_like(batch.input_ids, pad), torch.zeros_like(batch.attention_mask)
    for i in range(len(batch)):
        real = batch.input_ids[i][batch.attention_mask[i].bool()]
        ids[i, ids.shape[1] - len(real):] = real
        mask[i, ids.shape[1] - len(real):] = 1
    batch.input_ids, batch.attention_mask = ids, mask
    return batch


@pytest.mark.parametrize("side", ["right", "left"])
def test_seq2seq_empty_prefix_reproduces_the_model(tiny, side):
    bundle = tiny("t5")
    model, tok = bundle.model, bundle.tokenizer
    wrapper = ConditionedLM(model, tok, fixed(""))
    assert wrapper.seq2seq and is_edit_wrapper(wrapper)
    batch = seq2seq_pairs(bundle)
    ref_batch = seq2seq_pairs(bundle)
    if side == "left":
        batch = left_pad(batch, tok.pad_token_id)
    assert int(batch.attention_mask[:, 0].sum()) < len(PROMPTS) or side == "right"
    with torch.no_grad():
        out = wrapper(**batch.model_inputs()).logits
        ref = model(**ref_batch.model_inputs()).logits
        at = wrapper.logits_at(*batch.gather_index(), **batch.model_inputs())
    dec_mask = batch.decoder_attention_mask.bool()
    assert out.shape == ref.shape == (*batch.decoder_input_ids.shape, ref.shape[-1])
    assert torch.allclose(out[dec_mask], ref[dec_mask], atol=1e-5)
    assert (out[~dec_mask] == 0).all()
    assert torch.allclose(at, ref[ref_batch.gather_index()], atol=1e-5)
    assert torch.allclose(lm_logits_at(wrapper, batch), lm_logits_at(model, ref_batch), atol=1e-5)


@pytest.mark.parametrize("text_join", [False, True])
def test_seq2seq_prefix_goes_before_the_encoder_input(text_join):
    """A prefixed row = the model run on the prefixed encoder input (token concatenation, or with
    text_join the tokenizer's encoding of prefix + text) and the row's own decoder input."""
    bundle = eos_t5()
    model, tok = bundle.model, bundle.tokenizer
    prefix = PREFIX + "Prompt: "
    wrapper = ConditionedLM(model, tok, fixed(prefix), text_join=text_join)
    batch = left_pad(seq2seq_pairs(bundle), tok.pad_token_id)
    with torch.no_grad():
        out = wrapper(**batch.model_inputs()).logits
        at = wrapper.logits_at(*batch.gather_index(), **batch.model_inputs())
    plain = ConditionedLM(model, tok, fixed(""))(**batch.model_inputs()).logits
    added = 0
    for i, prompt in enumerate(PROMPTS):
        own = batch.input_ids[i][batch.attention_mask[i].bool()].tolist()
        assert own[-1] == tok.eos_token_id
        encoder = (tok(prefix + prompt)["input_ids"] if text_join
                   else tok(prefix, add_special_tokens=False)["input_ids"] + own)
        added += len(encoder) - len(own)
        dec = batch.decoder_attention_mask[i].bool()
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([encoder]), decoder_input_ids=batch.decoder_input_ids[i: i + 1]).logits[0]
        assert torch.allclose(out[i][dec], ref[dec], atol=1e-5)
        assert not torch.allclose(out[i][dec], plain[i][dec], atol=1e-3)  # the prefix mattered
    assert torch.allclose(at, out[batch.gather_index()], atol=1e-6)
    assert wrapper.context_tokens == 2 * added and wrapper.context_rows == 2 * len(PROMPTS)


def test_seq2seq_scoring_and_generation_go_through_the_wrapper(tiny):
    bundle = tiny("t5")
    model, tok = bundle.model, bundle.tokenizer
    before = state_copy(model)
    wrapper = ConditionedLM(model, tok, fixed(PREFIX))
    prefixed = [PREFIX + p for p in PROMPTS]
    assert all(tok(PREFIX + p)["input_ids"] == list(wrapper.prefix_ids(PREFIX)) + tok(p)["input_ids"]
               for p in PROMPTS)  # the prefix ends with a newline: the texts split at the boundary
    via, direct = score_pairs(wrapper, tok, PROMPTS, TARGETS), score_pairs(model, tok, prefixed, TARGETS)
    assert torch.allclose(via.nll, direct.nll, atol=1e-5)
    assert torch.equal(via.pred[via.mask], direct.pred[direct.mask])
    assert (greedy_generate(wrapper, tok, PROMPTS, max_new_tokens=6)
            == greedy_generate(model, tok, prefixed, max_new_tokens=6))
    caps = [2, 5, 3, 4]
    assert (greedy_generate(wrapper, tok, PROMPTS, max_new_tokens=caps, stop_at_answer_end=True)
            == greedy_generate(model, tok, prefixed, max_new_tokens=caps, stop_at_answer_end=True))
    enc = encode(tok, PROMPTS, "left")
    out = wrapper.generate(**enc, max_new_tokens=3, pad_token_id=tok.pad_token_id)
    ref = model.generate(**tok(prefixed, return_tensors="pt", padding=True), max_new_tokens=3, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    assert torch.equal(out, ref)  # [decoder start | new tokens], as Hugging Face seq2seq generate
    assert (out[:, 0] == model.config.decoder_start_token_id).all()
    assert_state_equal(model, before)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_seq2seq_several_models_and_sub_batches(tiny):
    base, other = tiny("t5"), tiny_model("t5", seed=3)
    tok = base.tokenizer
    routes = [(0, PREFIX), (1, ""), (1, PREFIX), (0, "")]
    by_text = dict(zip(PROMPTS, routes))
    wrapper = ConditionedLM(base.model, tok, lambda texts: [by_text[t] for t in texts],
                            models=[base.model, other.model], max_batch_tokens=30)
    batch = seq2seq_pairs(base)
    with torch.no_grad():
        out = wrapper(**batch.model_inputs()).logits
    caps = [4, 2, 6, 3]
    got = greedy_generate(wrapper, tok, PROMPTS, max_new_tokens=caps, stop_at_answer_end=True)
    for i, (index, prefix) in enumerate(routes):
        model = [base.model, other.model][index]
        one = seq2seq_pairs(base, [prefix + PROMPTS[i]], [TARGETS[i]])
        with torch.no_grad():
            ref = model(**one.model_inputs()).logits[0]
        n = int(batch.decoder_attention_mask[i].sum())
        assert torch.allclose(out[i, :n], ref[:n], atol=1e-5)
        assert got[i] == greedy_generate(model, tok, [prefix + PROMPTS[i]], max_new_tokens=caps[i],
                                         stop_at_answer_end=True)[0]
