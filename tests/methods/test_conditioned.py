"""ConditionedLM (editlab/methods/conditioned.py): routed, prefix-conditioned view of causal LMs."""

import pytest
import torch
from tokenizers import processors

from editlab.general import token_nll
from editlab.methods.conditioned import ConditionedLM
from editlab.models.tiny import tiny_model, tiny_tokenizer
from editlab.scoring import greedy_generate, is_edit_wrapper, lm_logits_at, score_pairs

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
    from editlab.data.collate import encode_pairs

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
    with pytest.raises(TypeError, match="encoder-decoder"):
        t5 = tiny("t5")
        ConditionedLM(t5.model, t5.tokenizer, fixed(""))
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
