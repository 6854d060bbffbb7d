import pytest
import torch

from editlab.data.collate import subject_span
from editlab.methods import keyvalue
from editlab.methods.base import EditError
from editlab.methods.keyvalue import (
    _PrefixRunner,
    _split,
    check_records,
    context_templates,
    fill,
    mean_keys,
    optimize_values,
)
from editlab.models.arch import arch_for
from editlab.tracing import CallRecorder, Trace

from conftest import CAUSAL_TYPES, assert_state_equal, make_records, state_copy


@pytest.mark.parametrize("model_type", CAUSAL_TYPES)
def test_prefix_suffix_split_equals_full_forward(tiny, model_type):
    b = tiny(model_type)
    tok, model = b.tokenizer, b.model
    rows = [tok(t)["input_ids"] for t in ("hello world the cat sat", "a b", "x y z w v u")]
    cuts = [3, 0, 2]  # the second row has no prefix at all
    runner = _PrefixRunner(model, _split(rows, cuts, tok.pad_token_id))
    spec = arch_for(model)
    with torch.no_grad():
        hidden = runner.run(torch.arange(3))
        subset = runner.run(torch.tensor([2, 0]))
        replayed = runner.run(torch.arange(3), start_block=1)  # blocks below 1 recorded once
        replayed_again = runner.run(torch.arange(3), start_block=1)
    torch.testing.assert_close(replayed, hidden, atol=1e-5, rtol=1e-5)
    assert torch.equal(replayed, replayed_again)
    for i, (r, c) in enumerate(zip(rows, cuts)):
        with torch.no_grad(), CallRecorder(model, [], stop_at=spec.lm_head) as rec:
            model(input_ids=torch.tensor([r]), use_cache=False)
        torch.testing.assert_close(hidden[i, : len(r) - c], rec.stopped_input[0, c:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(subset[0], hidden[2], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(subset[1, :2], hidden[0, :2], atol=1e-6, rtol=1e-6)


def test_subject_span_and_fill(tiny):
    tok = tiny("llama").tokenizer
    text, at = fill("Once upon a time. {}", "The capital of France is")
    assert text == "Once upon a time. The capital of France is" and at == len("Once upon a time. ")
    start, end = subject_span(tok, text, "France")
    ids = tok(text)["input_ids"]
    assert tok.decode(ids[start:end]).strip() == "France"
    with pytest.raises(ValueError, match="does not occur"):
        subject_span(tok, text, "Germany")


def test_check_records_names_record_and_field():
    recs = make_records()
    bad = recs[0].__class__(**{**recs[0].__dict__, "subject": "Spain", "record_id": "r-7"})
    with pytest.raises(EditError, match=r"record 'r-7'.*'subject'"):
        check_records([bad], "ROME")
    with pytest.raises(EditError, match="no records"):
        check_records([], "ROME")


def test_context_templates_cached_and_seeded(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("EDITLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(keyvalue, "_TEMPLATE_MEMO", {})
    b = tiny("llama")
    rng_before = torch.random.get_rng_state()
    first = context_templates(b.model, b.tokenizer, ((5, 5), (8, 5)))
    assert torch.equal(rng_before, torch.random.get_rng_state()), "global RNG untouched"
    assert first[0] == "{}" and len(first) == 11
    assert all(t.endswith(". {}") and t.count("{}") == 1 for t in first[1:])
    assert len(list((tmp_path / "templates").glob("*.json"))) == 1
    monkeypatch.setattr(keyvalue, "_TEMPLATE_MEMO", {})
    assert context_templates(b.model, b.tokenizer, ((5, 5), (8, 5))) == first  # from disk
    (next((tmp_path / "templates").glob("*.json"))).unlink()
    monkeypatch.setattr(keyvalue, "_TEMPLATE_MEMO", {})
    assert context_templates(b.model, b.tokenizer, ((5, 5), (8, 5))) == first  # same seed, same text


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_mean_keys_average_over_templates(tiny, model_type):
    b = tiny(model_type)
    rec = make_records()[1]
    templates = ["{}", "Some text. {}"]
    keys, outs, _ = mean_keys(b.model, b.tokenizer, [rec], templates, [1])
    spec = arch_for(b.model)
    path = spec.module_path(b.model, "mlp_out", 1)
    manual = []
    for tmpl in templates:
        text, at = fill(tmpl, rec.prompt)
        _, end = subject_span(b.tokenizer, text, rec.subject, char_start=at + rec.prompt.index(rec.subject))
        with torch.no_grad(), Trace(b.model, [path], retain_input=True) as tr:
            b.model(**b.tokenizer(text, return_tensors="pt"))
        manual.append(tr.inputs[path][0, end - 1].double())
    torch.testing.assert_close(keys[1][0], torch.stack(manual).mean(0))
    assert outs[1].shape[1] == b.model.config.hidden_size if hasattr(b.model.config, "hidden_size") else True


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gemma3_text"])
def test_value_optimisation_lowers_loss_and_requests_are_independent(tiny_deep, model_type):
    b = tiny_deep(model_type)
    recs = make_records()[:2]
    spec = arch_for(b.model)
    site = spec.module_path(b.model, "mlp_out", 1)  # blocks 2-3 carry the edit to the answer position
    before = state_copy(b.model)
    kw = dict(num_steps=8, lr=0.1, weight_decay=0.0, clamp_norm_factor=100.0, early_stop_loss=0.0, fact_token="last")
    together = optimize_values(b.model, b.tokenizer, recs, ["{}", "A story. {}"], site, **kw)
    assert_state_equal(b.model, before)
    for i, rec in enumerate(recs):
        assert together.losses[i][-1] < together.losses[i][0]
        alone = optimize_values(b.model, b.tokenizer, [rec], ["{}", "A story. {}"], site, **kw)
        torch.testing.assert_close(alone.target[0], together.target[i], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(alone.init[0], together.init[i], atol=1e-5, rtol=1e-5)


def test_value_clamp_bounds_delta(tiny):
    b = tiny("llama")
    site = arch_for(b.model).module_path(b.model, "mlp_out", 0)
    res = optimize_values(b.model, b.tokenizer, make_records()[:1], ["{}"], site, num_steps=5, lr=5.0,
                          clamp_norm_factor=0.1, early_stop_loss=0.0)
    assert res.delta.norm() <= 0.1 * res.init.norm() * (1 + 1e-5)
