import pytest
import torch

from editlab.data.collate import EditBatchCollator, encode_pairs

from conftest import make_records


def test_causal_positions_predict_targets(tiny):
    tok = tiny("gpt2").tokenizer
    prompts = ["The capital of France is", "Paris is"]
    targets = ["Paris", "the capital of France"]
    b = encode_pairs(tok, prompts, targets)
    for i, (p, t) in enumerate(zip(prompts, targets)):
        p_ids = tok(p)["input_ids"]
        t_ids = tok(p + " " + t)["input_ids"][len(p_ids):]
        n = len(t_ids)
        assert b.target_ids[i, :n].tolist() == t_ids and b.target_mask[i].sum() == n
        assert b.prompt_lengths[i] == len(p_ids)
        # position of target token j is prompt_len - 1 + j, and the next input token is target j
        for j in range(n):
            pos = int(b.positions[i, j])
            assert pos == len(p_ids) - 1 + j
            if j < n - 1:
                assert int(b.input_ids[i, pos + 1]) == t_ids[j]
        assert int(b.attention_mask[i].sum()) == len(p_ids) + n - 1


def test_seq2seq_layout(tiny):
    b5 = tiny("t5")
    b = encode_pairs(b5.tokenizer, ["question one", "q2"], ["answer", "a longer answer"], seq2seq=True,
                     decoder_start_token_id=b5.model.config.decoder_start_token_id)
    assert b.decoder_input_ids is not None
    assert torch.equal(b.decoder_input_ids[:, 0], torch.full((2,), b5.model.config.decoder_start_token_id))
    n = int(b.target_mask[1].sum())
    assert b.decoder_input_ids[1, 1:n].tolist() == b.target_ids[1, : n - 1].tolist()
    assert b.positions[1, :n].tolist() == list(range(n))


def test_errors(tiny):
    tok = tiny("gpt2").tokenizer
    with pytest.raises(ValueError, match="prompts"):
        encode_pairs(tok, ["a"], ["b", "c"])
    with pytest.raises(ValueError):
        encode_pairs(tok, [], [])


def test_edit_batch_collator_maps_rows_to_records(tiny):
    """Record 2 has no rephrasing: the rephrase part has rows for records 0 and 1 only, and
    ``rows_of`` names each row's record; every record has a locality probe (rows = records)."""
    tok = tiny("gpt2").tokenizer
    records = make_records()
    batch = EditBatchCollator(tok)(records)
    assert batch.records == records
    edit = encode_pairs(tok, [r.prompt for r in records], [r.target_new for r in records])
    assert torch.equal(batch.edit.input_ids, edit.input_ids)
    rephrase = encode_pairs(tok, [r.rephrase_prompts[0] for r in records[:2]], [r.target_new for r in records[:2]])
    assert torch.equal(batch.rephrase.input_ids, rephrase.input_ids)
    assert batch.rows_of(batch.rephrase).tolist() == [0, 1]
    assert batch.rows_of(batch.locality).tolist() == [0, 1, 2] and batch.rows_of(batch.edit).tolist() == [0, 1, 2]
    assert batch.locality.target_mask.any(dim=1).all()
    moved = batch.to("cpu")
    assert moved.rephrase_rows.tolist() == [0, 1] and moved.records == records
    with pytest.raises(ValueError, match="not a part of this batch"):
        batch.rows_of(edit)
    bare = [r for r in records if r.record_id == 2]
    alone = EditBatchCollator(tok)(bare)
    assert alone.rephrase is None and alone.rephrase_rows is None and len(alone.locality) == 1


# ------------------------------------------------------------- inputs longer than the model takes
def _long_record(tmp_source="cf.json", **fields):
    from editlab.data.records import EditRecord

    base = dict(record_id=7, prompt="The capital of France is", subject="France", target_new="Rome",
                target_true="Paris", source=tmp_source, index=3)
    return EditRecord(**{**base, **fields})


LONG = "word " * 400  # ~400+ tokens: past the tiny models' 128 positions


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gemma3_text"])
@pytest.mark.parametrize("field", ["prompt", "rephrase_prompts", "neighborhood_prompts", "generation_prompts"])
def test_a_text_longer_than_the_model_takes_is_a_record_error(tiny, model_type, field):
    """The record, the field and both lengths are named (GPT-2 would otherwise fail with an
    IndexError in its position table; Llama would run far past its trained positions)."""
    from editlab.data.collate import check_lengths
    from editlab.data.records import RecordError
    from editlab.models.arch import arch_for

    bundle = tiny(model_type)
    limit = arch_for(bundle.model).max_positions(bundle.model)
    assert limit == 128
    value = LONG + "The capital of France is" if field == "prompt" else (LONG,)
    record = _long_record(**{field: value})
    with pytest.raises(RecordError) as err:
        check_lengths([record], bundle.tokenizer, limit, generation_tokens=10, model_name="tiny")
    message = str(err.value)
    name = field if field == "prompt" else f"{field}[0]"
    assert message.startswith(f"cf.json, record 3, field '{name}'"), message
    assert "longer than the 128 positions tiny takes (record 7)" in message
    total = int(message.split(" = ")[1].split(" tokens")[0])
    assert total > 128
    check_lengths([_long_record()], bundle.tokenizer, limit, generation_tokens=10)  # a normal record passes


def test_lengths_count_generated_tokens_and_the_users_truncation(tiny):
    from editlab.data.collate import check_lengths
    from editlab.data.records import RecordError

    tok = tiny("gpt2").tokenizer
    prompt = "word " * 25  # 100 tokens: fits with 10 generated tokens, not with 50
    check_lengths([_long_record(generation_prompts=(prompt,))], tok, 128, generation_tokens=10)
    with pytest.raises(RecordError, match=r"generation_prompts\[0\].*generated tokens \(50\)"):
        check_lengths([_long_record(generation_prompts=(prompt,))], tok, 128, generation_tokens=50)
    with pytest.raises(RecordError, match=r"field 'rephrase_prompts\[0\]'.*max_prompt_tokens"):
        check_lengths([_long_record(rephrase_prompts=(LONG,))], tok, 128)
    # probes truncated from the left when scored (the user asked) fit; the edit prompt must fit whole
    check_lengths([_long_record(rephrase_prompts=(LONG,))], tok, 128, max_prompt_tokens=64)
    with pytest.raises(RecordError, match="field 'prompt'"):
        check_lengths([_long_record(prompt=LONG)], tok, 128, max_prompt_tokens=64)
    check_lengths([_long_record(prompt=LONG * 50)], tok, None)  # no limit (T5's relative positions)


def test_editor_apply_refuses_a_long_prompt_before_computing(tiny):
    from editlab.data.records import RecordError
    from editlab.methods.base import Editor

    class Counting(Editor):
        calls = 0

        def compute_deltas(self, model, tokenizer, records):
            Counting.calls += 1
            return {}

    bundle = tiny("gpt2")
    with pytest.raises(RecordError, match="longer than the 128 positions"):
        with Counting().apply(bundle.model, bundle.tokenizer, [_long_record(prompt=LONG)]):
            pass
    assert Counting.calls == 0


def test_lengths_count_the_framing_of_generated_answers(tiny):
    """A chat or question-answer framing adds tokens to every prompt whose answer is generated: a
    prompt that fits as it is can be too long framed."""
    from editlab.data.collate import check_lengths
    from editlab.data.records import RecordError

    tok = tiny("gpt2").tokenizer
    record = _long_record(rephrase_prompts=("word " * 25,))  # ~100 tokens
    frame = "Please answer the question below in a few words. " * 3 + "Question: {} Answer:"
    check_lengths([record], tok, 128, answer_tokens=10)
    with pytest.raises(RecordError, match=r"field 'rephrase_prompts\[0\] \(framed for generation\)'.*generated tokens"):
        check_lengths([record], tok, 128, answer_tokens=10, frame=frame.format)
    check_lengths([record], tok, 128, frame=frame.format)  # no answers generated: nothing framed


def test_the_scoring_settings_check_the_chat_framed_prompts(tiny):
    from editlab.data.records import RecordError
    from editlab.evaluation.scorer import ScoringSettings

    tok = tiny("gpt2").tokenizer
    record = _long_record(rephrase_prompts=("word " * 25,))
    qa = ScoringSettings(scoring_modes=("teacher_forced", "generation"), generation_framing="question_answer",
                         qa_template="Please answer the question below in a few words. " * 3 + "Q: {prompt} A:",
                         generation_max_new_tokens=10)
    with pytest.raises(RecordError, match="framed for generation"):
        qa.check_lengths([record], tok, 128)
    ScoringSettings(scoring_modes=("teacher_forced", "generation"), generation_max_new_tokens=10).check_lengths(
        [record], tok, 128)
