"""General ability (editlab/evaluation/general.py): perplexity on held-out text and PIQA accuracy."""

import json
import math

import pytest
import torch

import editlab.evaluation.general as general
from editlab.evaluation.general import GeneralAbility, token_nll
from editlab.data.corpora import TextFile

from conftest import scripted_next_tokens, state_copy, assert_state_equal

TEXT = """The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France.
It is named after the engineer Gustave Eiffel, whose company designed and built the tower.

Locally nicknamed La dame de fer, it was constructed from 1887 to 1889 as the centrepiece of the
1889 World's Fair. Although initially criticised by some of France's leading artists, it has become
a global cultural icon of France and one of the most recognisable structures in the world.

The tower is 330 metres tall, about the same height as an 81-storey building, and the tallest
structure in Paris. Its base is square, measuring 125 metres on each side.
"""


def write_piqa(folder, items, labels):
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "piqa_valid.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    (folder / "piqa_valid-labels.lst").write_text("".join(f"{x}\n" for x in labels), encoding="utf-8")
    return data


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "heldout.txt"
    path.write_text(TEXT, encoding="utf-8")
    return TextFile(path)


def _direct_perplexity(model, rows, scored_from):
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            logits = model(input_ids=row[None]).logits[0].double()
            logp = torch.log_softmax(logits[:-1], dim=-1)
            nll = -logp.gather(1, row[1:, None]).squeeze(1)
            total += float(nll[scored_from:].sum())
            count += nll[scored_from:].numel()
    return math.exp(total / count), count


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gemma3_text"])
def test_perplexity_equals_exp_mean_nll_of_a_full_forward(tiny, corpus, model_type):
    bundle = tiny(model_type)
    before = state_copy(bundle.model)
    ev = GeneralAbility(corpus, n_tokens=100, seq_len=16, batch_size=3, logit_rows=7, piqa=None)
    out = ev(bundle.model, bundle.tokenizer)
    rows = ev.rows(bundle.model, bundle.tokenizer)
    assert [r.numel() for r in rows] == [16] * 6 + [4]  # the first 100 tokens, packed
    expected, count = _direct_perplexity(bundle.model, rows, 0)
    assert out["tokens"] == count == 100 - len(rows)  # a row's first token is context only
    assert out["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert out["nll"] == pytest.approx(math.log(expected), rel=1e-5)
    assert set(out) == {"perplexity", "nll", "tokens"}
    assert ev(bundle.model, bundle.tokenizer) == out  # deterministic
    assert_state_equal(bundle.model, before)


def test_perplexity_with_a_bos_token_scores_every_text_token(tiny, corpus, monkeypatch):
    bundle = tiny("llama")
    monkeypatch.setattr(general, "_default_bos", lambda tokenizer: tokenizer.bos_token_id)
    ev = GeneralAbility(corpus, n_tokens=50, seq_len=16, piqa=None)
    out = ev(bundle.model, bundle.tokenizer)
    rows = ev.rows(bundle.model, bundle.tokenizer)
    assert all(int(r[0]) == bundle.tokenizer.bos_token_id for r in rows)
    assert sum(r.numel() - 1 for r in rows) == 50 and max(r.numel() for r in rows) == 16
    expected, count = _direct_perplexity(bundle.model, rows, 0)
    assert out["tokens"] == count == 50
    assert out["perplexity"] == pytest.approx(expected, rel=1e-5)


def test_token_nll_matches_cross_entropy(tiny):
    bundle = tiny("gpt2")
    ids = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = bundle.model(input_ids=ids).logits
        expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(),
                                                     reduction="none")
        assert torch.allclose(token_nll(bundle.model, ids, logit_rows=5), expected.view(2, 8), atol=1e-5)


@pytest.mark.parametrize("label,expected", [(0, 1.0), (1, 0.0)])
def test_piqa_accuracy_on_a_forced_answer(tiny, tmp_path, label, expected):
    """After "Answer:" the scripted model predicts " Paris" with a clear margin: the solution
    "Paris" wins in both acc and acc_norm; it is right (1.0) or wrong (0.0) by the label."""
    bundle = tiny("llama")
    tid = lambda text: bundle.tokenizer(text, add_special_tokens=False)["input_ids"][0]  # noqa: E731
    items = [{"goal": f"Where is tower {i}?", "sol1": "Paris", "sol2": "Rome"} for i in range(3)]
    data = write_piqa(tmp_path / "locality", items, [label] * 3)
    ev = GeneralAbility(None, piqa=data, choice_batch_size=2)
    with scripted_next_tokens(bundle.model, {tid(":"): tid(" Paris")}, default=tid(" Rome")):
        out = ev(bundle.model, bundle.tokenizer)
    assert out == {"piqa_acc": expected, "piqa_acc_norm": expected, "piqa_examples": 3.0}


def test_piqa_reads_the_data_dir_and_takes_the_first_items(tiny, tmp_path):
    items = [{"goal": f"Goal {i}", "sol1": f"first {i}", "sol2": f"second solution {i}"} for i in range(5)]
    write_piqa(tmp_path / "locality", items, [0, 1, 0, 1, 1])
    ev = GeneralAbility(None, piqa="locality/piqa_valid.jsonl", piqa_examples=3, data_dir=tmp_path)
    assert [(it.index, it.label) for it in ev.items()] == [(0, 0), (1, 1), (2, 0)]
    out = ev(tiny("gpt2").model, tiny("gpt2").tokenizer)
    assert out["piqa_examples"] == 3.0 and 0.0 <= out["piqa_acc"] <= 1.0


def test_seq2seq_skips_perplexity_but_scores_piqa(tiny, corpus, tmp_path, caplog):
    items = [{"goal": "Goal", "sol1": "one", "sol2": "two"}]
    data = write_piqa(tmp_path / "locality", items, [0])
    bundle = tiny("t5")
    with caplog.at_level("WARNING"):
        out = GeneralAbility(corpus, piqa=data)(bundle.model, bundle.tokenizer)
    assert set(out) == {"piqa_acc", "piqa_acc_norm", "piqa_examples"}
    assert "perplexity is skipped for the seq2seq model" in caplog.text


def test_arguments_are_checked(corpus):
    with pytest.raises(ValueError, match="corpus, a PIQA file or both"):
        GeneralAbility(None, piqa=None)
    with pytest.raises(ValueError, match="n_tokens"):
        GeneralAbility(corpus, n_tokens=0)
