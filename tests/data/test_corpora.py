import itertools
import sys

import pytest
import torch

from editlab.data.corpora import HFDataset, TextFile, WikipediaSample, batch_rows, pack_rows
from editlab.models.tiny import TINY_CORPUS

from conftest import packed_stream

SEQ = 32


def _docs() -> list[str]:
    lines = [line for line in TINY_CORPUS.splitlines() if line.strip()]
    return [" ".join(lines[i : i + 3]) for i in range(0, len(lines), 3)]


def test_packing_has_no_padding(tiny):
    tok = tiny("gpt2").tokenizer
    stream = packed_stream(tok, _docs())
    rows = list(pack_rows(tok, _docs(), SEQ))
    assert all(len(r) == SEQ for r in rows[:-1]) and 0 < len(rows[-1]) <= SEQ
    assert torch.cat(rows).tolist() == stream
    batches = list(batch_rows(rows, 4))
    assert all(x.shape[0] <= 4 for x in batches) and sum(x.numel() for x in batches) == len(stream)
    assert torch.cat(list(pack_rows(tok, _docs(), SEQ, n_tokens=70))).tolist() == stream[:70]


def test_wikipedia_sample_yields_english_paragraphs():
    corpus = WikipediaSample()
    paragraphs = list(itertools.islice(corpus.texts(), 4))
    assert paragraphs[0].startswith("Anarchism is a political philosophy")
    for text in paragraphs:
        assert len(text.split()) >= corpus.min_words
        assert not any(mark in text for mark in ("'''", "[[", "{{", "<ref", "=="))
        assert " the " in text and text[0].isupper()
    assert corpus.key == WikipediaSample().key


def test_text_file_jsonl_and_hf_dataset_error(tmp_path, monkeypatch):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "First document."}\n\n{"text": "Second one.", "id": 2}\n', encoding="utf-8")
    assert list(TextFile(path).texts()) == ["First document.", "Second one."]
    txt = tmp_path / "docs.txt"
    txt.write_text("one\ntwo\n\n\nthree\n", encoding="utf-8")
    assert list(TextFile(txt).texts()) == ["one two", "three"]
    key = TextFile(txt).key
    txt.write_text("one\ntwo\n\nfour\n", encoding="utf-8")
    assert TextFile(txt).key != key
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets"):
        next(HFDataset("wikitext", "wikitext-103-raw-v1").texts())
