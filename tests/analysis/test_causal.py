"""Causal tracing (editlab.analysis.causal) on tiny random models."""

import numpy as np
import pytest
import torch

from editlab.analysis.causal import (
    CATEGORIES,
    TraceResult,
    average_indirect_effects,
    layer_window,
    noise_std,
    restore_probability,
    token_categories,
    trace_prompt,
)
from editlab.data.collate import subject_span
from editlab.models.arch import arch_for

from conftest import CAUSAL_TYPES

PROMPT = "The mother tongue of Victor Hugo was"
SUBJECT = "Victor Hugo"


def _no_hooks(model):
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def _noise(bundle, factor=3.0):
    return factor * noise_std(bundle.model, bundle.tokenizer, ["Victor Hugo", "France", "Albert Einstein"])


def test_layer_window_matches_rome():
    assert list(layer_window(0, 30, 10)) == list(range(0, 5))
    assert list(layer_window(12, 30, 10)) == list(range(7, 17))
    assert list(layer_window(29, 30, 10)) == list(range(24, 30))
    assert list(layer_window(4, 30, 9)) == list(range(0, 9))
    assert list(layer_window(3, 30, 1)) == [3]


def test_noise_std_is_the_embedding_std(tiny):
    b = tiny("llama")
    ids = b.tokenizer("Victor Hugo", add_special_tokens=False)["input_ids"]
    expected = b.model.get_input_embeddings().weight[ids].std().item()
    assert noise_std(b.model, b.tokenizer, ["Victor Hugo"]) == pytest.approx(expected, rel=1e-6)


def test_zero_noise_gives_no_effect(tiny):
    b = tiny("llama")
    res = trace_prompt(b.model, b.tokenizer, PROMPT, SUBJECT, noise=0.0, samples=2, window=2)
    for r in res.values():
        assert r.low == pytest.approx(r.high, rel=1e-5)
        assert np.allclose(r.indirect_effect, 0.0, atol=1e-6 * r.high + 1e-9)
    _no_hooks(b.model)


def test_result_fields(tiny):
    b = tiny("gpt2")
    res = trace_prompt(b.model, b.tokenizer, PROMPT, SUBJECT, noise=_noise(b), kinds=["mlp"], samples=3, window=2)
    r = res["mlp"]
    n_tok = len(b.tokenizer(PROMPT)["input_ids"])
    assert isinstance(r, TraceResult) and r.scores.shape == (n_tok, arch_for(b.model).num_layers(b.model))
    assert r.subject_range == subject_span(b.tokenizer, PROMPT, SUBJECT)
    assert "".join(r.tokens) == PROMPT and len(r.tokens) == n_tok
    assert r.answer_id == int(torch.softmax(b.model(**b.tokenizer(PROMPT, return_tensors="pt")).logits[0, -1], -1).argmax())
    assert 0.0 < r.low and 0.0 < r.high <= 1.0 and np.isfinite(r.scores).all()
    # tokens before the subject are not corrupted: restoring them changes nothing
    assert np.all(r.scores[: r.subject_range[0]] == r.low)
    assert r.low != pytest.approx(r.high, rel=1e-6)  # the noise does corrupt


def test_restoring_everything_gives_the_clean_probability(tiny):
    b = tiny("llama")
    noise = _noise(b, 10.0)
    n_tok = len(b.tokenizer(PROMPT)["input_ids"])
    last = arch_for(b.model).num_layers(b.model) - 1
    for layer in (0, last):
        score, low, high = restore_probability(
            b.model, b.tokenizer, PROMPT, SUBJECT, [(t, layer, "hidden") for t in range(n_tok)], noise=noise, samples=3)
        assert score == pytest.approx(high, rel=1e-5)
        assert low != pytest.approx(high, rel=1e-3)
    # the batched trace: restoring the last token's final hidden state restores the clean run
    res = trace_prompt(b.model, b.tokenizer, PROMPT, SUBJECT, noise=noise, kinds=["hidden"], samples=3)["hidden"]
    assert res.scores[n_tok - 1, last] == pytest.approx(res.high, rel=1e-5)
    _no_hooks(b.model)


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gemma3_text"])
def test_batched_equals_one_restoration_per_forward(tiny, model_type):
    b = tiny(model_type)
    noise, samples, window = _noise(b, 5.0), 3, 2
    res = trace_prompt(b.model, b.tokenizer, PROMPT, SUBJECT, noise=noise, samples=samples, window=window,
                       max_rows=4)  # several chunks of tokens
    n_layers = arch_for(b.model).num_layers(b.model)
    for kind, r in res.items():
        naive = np.zeros_like(r.scores)
        for t in range(len(r.tokens)):
            for layer in range(n_layers):
                layers = [layer] if kind == "hidden" else layer_window(layer, n_layers, window)
                naive[t, layer], low, high = restore_probability(
                    b.model, b.tokenizer, PROMPT, SUBJECT, [(t, j, kind) for j in layers], noise=noise,
                    samples=samples)
        assert low == pytest.approx(r.low, rel=1e-5) and high == pytest.approx(r.high, rel=1e-6)
        np.testing.assert_allclose(r.scores, naive, rtol=1e-4, atol=1e-9)
        assert not np.allclose(r.scores, r.low)  # something was restored
    _no_hooks(b.model)


@pytest.mark.parametrize("model_type", CAUSAL_TYPES)
def test_mlp_and_attn_kinds_run_for_every_decoder(tiny, model_type):
    b = tiny(model_type)
    res = trace_prompt(b.model, b.tokenizer, PROMPT, SUBJECT, noise=_noise(b), kinds=["mlp", "attn"], samples=2,
                       window=2)
    n_layers = arch_for(b.model).num_layers(b.model)
    for r in res.values():
        assert r.scores.shape[1] == n_layers and np.isfinite(r.scores).all()
    # same seed, same noise: the result is reproducible
    again = trace_prompt(b.model, b.tokenizer, PROMPT, SUBJECT, noise=_noise(b), kinds=["mlp"], samples=2, window=2)
    np.testing.assert_array_equal(again["mlp"].scores, res["mlp"].scores)
    _no_hooks(b.model)


def test_encoder_decoder_is_refused(tiny):
    b = tiny("t5")
    with pytest.raises(ValueError, match="encoder-decoder"):
        trace_prompt(b.model, b.tokenizer, PROMPT, SUBJECT, noise=0.1)


def test_token_categories_and_averages():
    cats = token_categories((1, 4), 8)
    assert cats == {"first_subject": [1], "middle_subject": [2], "last_subject": [3], "first_subsequent": [4],
                    "further": [5, 6], "last": [7]}
    one = token_categories((0, 1), 2)
    assert one["first_subject"] == one["last_subject"] == [0] and one["first_subsequent"] == one["last"] == [1]
    assert token_categories((2, 4), 4)["first_subsequent"] == []

    def result(scores, low, span):
        return TraceResult(kind="mlp", scores=np.asarray(scores, dtype=float), low=low, high=1.0, tokens=[],
                           input_ids=[], subject_range=span, answer="", answer_id=0, prompt="", subject="",
                           window=1, noise=0.0, samples=1)

    a = result([[0.1, 0.2], [0.5, 0.9], [0.3, 0.3]], 0.1, (0, 2))
    b = result([[0.2, 0.2], [0.4, 0.6], [0.2, 0.8], [0.2, 0.2]], 0.2, (1, 3))
    avg = average_indirect_effects([a, b])
    np.testing.assert_allclose(avg["last_subject"]["mean"], [(0.4 + 0.0) / 2, (0.8 + 0.6) / 2])
    assert avg["last_subject"]["n"] == 2 and avg["middle_subject"]["n"] == 0
    assert set(avg) == set(CATEGORIES)
