"""Greedy generation and answer cutting (editlab/evaluation/generation.py)."""

import pytest

from editlab.evaluation.generation import answer_token_table, cut_answer, greedy_generate


def test_greedy_generate_matches_unbatched(tiny):
    bundle = tiny("gpt2")
    prompts = ["The capital of France is", "Hi"]
    batched = greedy_generate(bundle.model, bundle.tokenizer, prompts, max_new_tokens=5)
    single = [greedy_generate(bundle.model, bundle.tokenizer, [p], max_new_tokens=5)[0] for p in prompts]
    assert batched == single
    assert bundle.tokenizer.padding_side == "right"


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
