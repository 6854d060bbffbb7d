import pytest
import torch

from editlab.data.collate import encode_pairs
from editlab.scoring import answer_token_table, cut_answer, greedy_generate, head_logits, head_nll, score_pairs

from conftest import ALL_TYPES

PROMPTS = ["The capital of France is", "Danielle Darrieux speaks", "The iPhone is made by the company"]
TARGETS = ["Paris", "French and English", "Apple"]


def _manual(bundle, prompts, targets):
    """Full forward, full-vocabulary log-softmax, explicit indexing: the reference."""
    seq2seq = bundle.model.config.is_encoder_decoder
    nll, preds = [], []
    for p, t in zip(prompts, targets):
        b = encode_pairs(bundle.tokenizer, [p], [t], seq2seq=seq2seq,
                         decoder_start_token_id=getattr(bundle.model.config, "decoder_start_token_id", None))
        with torch.no_grad():
            logits = bundle.model(**b.model_inputs()).logits[0]
        logp = torch.log_softmax(logits.float(), -1)
        n = int(b.target_mask[0].sum())
        pos = b.positions[0, :n]
        tgt = b.target_ids[0, :n]
        nll.append(float(-logp[pos, tgt].mean()))
        preds.append(logits[pos].argmax(-1).tolist())
    return nll, preds


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_scores_match_full_forward(tiny, model_type):
    bundle = tiny(model_type)
    scores = score_pairs(bundle.model, bundle.tokenizer, PROMPTS, TARGETS, chunk_size=2)
    nll, preds = _manual(bundle, PROMPTS, TARGETS)
    assert torch.allclose(scores.nll, torch.tensor(nll), atol=1e-4)
    for i, p in enumerate(preds):
        n = len(p)
        assert scores.mask[i].sum() == n
        assert scores.pred[i, :n].tolist() == p


def test_chunking_and_order_do_not_matter(tiny):
    bundle = tiny("llama")
    a = score_pairs(bundle.model, bundle.tokenizer, PROMPTS, TARGETS, chunk_size=1)
    b = score_pairs(bundle.model, bundle.tokenizer, PROMPTS, TARGETS, chunk_size=64)
    assert torch.allclose(a.nll, b.nll, atol=1e-5)
    assert torch.equal(a.pred, b.pred) and torch.equal(a.mask, b.mask)


def test_greedy_generate_matches_unbatched(tiny):
    bundle = tiny("gpt2")
    prompts = ["The capital of France is", "Hi"]
    batched = greedy_generate(bundle.model, bundle.tokenizer, prompts, max_new_tokens=5)
    single = [greedy_generate(bundle.model, bundle.tokenizer, [p], max_new_tokens=5)[0] for p in prompts]
    assert batched == single
    assert bundle.tokenizer.padding_side == "right"


@pytest.mark.parametrize("cap", [None, 3.0])
def test_fused_head_nll_matches_log_softmax_and_its_gradient(tiny, cap, monkeypatch):
    bundle = tiny("gemma3_text")
    monkeypatch.setattr(bundle.model.config, "final_logit_softcapping", cap)
    torch.manual_seed(0)
    d = bundle.model.get_output_embeddings().weight.shape[1]
    hidden = torch.randn(5, d, requires_grad=True)
    targets = torch.tensor([3, 17, 17, 100, 250])
    ref = -torch.log_softmax(head_logits(bundle.model, hidden), -1).gather(1, targets[:, None]).squeeze(1)
    (g_ref,) = torch.autograd.grad((ref * torch.arange(1.0, 6.0)).sum(), hidden)
    fused = head_nll(bundle.model, hidden, targets, chunk=64)  # several chunks over the vocabulary
    (g_fused,) = torch.autograd.grad((fused * torch.arange(1.0, 6.0)).sum(), hidden)
    assert torch.allclose(fused, ref, atol=1e-5)
    assert torch.allclose(g_fused, g_ref, atol=1e-5)


def test_cut_answer_stops_at_newline_or_sentence_end():
    assert cut_answer(" Paris.\nThe city") == "Paris"
    assert cut_answer("\n Paris\nRome") == "Paris"  # a leading newline does not end an empty answer
    assert cut_answer(" 3.5 metres! Yes") == "3.5 metres"  # a dot inside a number is no sentence end
    assert cut_answer(" Paris is") == "Paris is"


def test_answer_token_table_marks_enders_and_content(tiny):
    tok = tiny("llama").tokenizer
    ends, content = answer_token_table(tok, size=len(tok) + 3)
    assert ends.shape == (len(tok) + 3,) and not ends[-3:].any()
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert ends[ids(".")[0]] and ends[ids("\n")[0]] and not ends[ids(" Paris")[0]]
    assert content[ids(" Paris")[0]] and not content[ids("\n")[0]]


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "t5"])
def test_answer_generation_batched_equals_one_at_a_time(tiny, model_type):
    bundle = tiny(model_type)
    prompts = ["The capital of France is", "Hi", "Danielle Darrieux speaks the language of", "Apple"]
    caps = [3, 7, 1, 5]
    batched = greedy_generate(bundle.model, bundle.tokenizer, prompts, max_new_tokens=caps, chunk_size=3,
                              stop_at_answer_end=True)
    single = [greedy_generate(bundle.model, bundle.tokenizer, [p], max_new_tokens=[c], stop_at_answer_end=True)[0]
              for p, c in zip(prompts, caps)]
    assert batched == single
    assert bundle.tokenizer.padding_side == "right"


def test_per_row_caps_and_answer_end(tiny):
    bundle = tiny("llama")
    tok = bundle.tokenizer
    prompts = ["The capital of France is", "The mother tongue of Danielle Darrieux is"]
    free = greedy_generate(bundle.model, tok, prompts, max_new_tokens=12)
    capped = greedy_generate(bundle.model, tok, prompts, max_new_tokens=[2, 5])
    for text, full, cap in zip(capped, free, [2, 5]):
        n = len(tok(text, add_special_tokens=False)["input_ids"])
        assert n <= cap and full.startswith(text)
    answers = greedy_generate(bundle.model, tok, prompts, max_new_tokens=[12, 12], stop_at_answer_end=True)
    for answer, full in zip(answers, free):
        assert answer == cut_answer(full)
    with pytest.raises(ValueError, match="caps"):
        greedy_generate(bundle.model, tok, prompts, max_new_tokens=[3])


def test_scripted_answer_stops_at_sentence_end_and_saves_steps(tiny):
    from conftest import scripted_next_tokens

    bundle = tiny("llama")
    tok = bundle.tokenizer
    tid = lambda text: tok(text, add_special_tokens=False)["input_ids"][0]  # noqa: E731
    table = {tid(" is"): tid(" The"), tid(" The"): tid(" Paris"), tid(" Paris"): tid("."), tid("."): tid(" Rome")}
    steps: list[int] = []
    counter = bundle.model.get_output_embeddings().register_forward_hook(lambda m, a, o: steps.append(1))
    try:
        with scripted_next_tokens(bundle.model, table, default=tid(" Rome")):
            free = greedy_generate(bundle.model, tok, ["The capital of France is"], max_new_tokens=[7])
            n_free = len(steps)
            steps.clear()
            answer = greedy_generate(bundle.model, tok, ["The capital of France is"], max_new_tokens=[7],
                                     stop_at_answer_end=True)
    finally:
        counter.remove()
    assert free == [" The Paris. Rome Rome Rome Rome"]
    assert answer == ["The Paris"]
    assert n_free == 7 and len(steps) == 3  # generation ended when the answer did
