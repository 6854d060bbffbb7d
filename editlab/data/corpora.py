"""Text corpora: plain-text documents for key statistics (ROME/MEMIT), T-Patcher's memory set and
perplexity, and their packing into token rows.

A :class:`Corpus` yields documents and names its content with a stable :attr:`Corpus.key` (part of
cache keys: same key, same documents).  Three sources:

* :class:`WikipediaSample` — the English Wikipedia extract shipped in the ``gensim`` wheel (offline;
  the default everywhere);
* :class:`TextFile` — a local ``.jsonl`` or plain-text file;
* :class:`HFDataset` — a Hugging Face dataset (needs ``datasets`` and internet), streamed.

:func:`pack_rows` tokenizes documents without special tokens, joins them with EOS and cuts rows of a
fixed length (packed pre-training style: no padding); :func:`batch_rows` stacks equal-length rows.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

__all__ = ["Corpus", "WikipediaSample", "TextFile", "HFDataset", "pack_rows", "batch_rows"]

GENSIM_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


class Corpus(ABC):
    """A source of documents: :meth:`texts` yields plain-text documents, :attr:`key` names the
    content stably (it is part of the cache key: same key ⇔ same documents)."""

    @property
    @abstractmethod
    def key(self) -> str: ...

    @abstractmethod
    def texts(self) -> Iterator[str]: ...


_APOSTROPHES = re.compile(r"'{2,}")  # wiki bold / italic quotes left by filter_wiki
_NOT_PROSE = tuple("=*#:;|!{}")  # headings, lists, definitions, tables


def _wiki_paragraphs(clean: str, min_words: int) -> Iterator[str]:
    """Prose paragraphs (one per line in wikitext) of ``filter_wiki`` output."""
    for line in clean.splitlines():
        text = " ".join(_APOSTROPHES.sub("", line).split())
        if text and not text.startswith(_NOT_PROSE) and len(text.split()) >= min_words:
            yield text


@dataclass(frozen=True)
class WikipediaSample(Corpus):
    """The English Wikipedia extract shipped in the ``gensim`` wheel (offline default corpus).

    206 pages of an ``enwiki`` dump (107 articles after redirects); markup is stripped with
    gensim's ``filter_wiki`` and prose paragraphs of at least ``min_words`` words are kept
    (5.0k paragraphs, 0.4M words, 0.55M SmolLM2 tokens with the EOS separators).
    """

    min_words: int = 15

    @property
    def key(self) -> str:
        return f"gensim-enwiki-sample-v1-w{self.min_words}"

    @staticmethod
    def path() -> Path:
        """The bz2 dump inside the installed gensim (``gensim.test.utils.datapath``, without
        importing that module, which builds test fixtures on import)."""
        spec = importlib.util.find_spec("gensim")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("WikipediaSample needs gensim (pip install gensim); or pass TextFile(path)")
        path = Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data" / GENSIM_WIKI_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing from the installed gensim; reinstall gensim")
        return path

    def texts(self) -> Iterator[str]:
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki

        with bz2.open(self.path(), "rb") as handle:
            for _title, text, _page_id in extract_pages(handle, filter_namespaces=("0",)):
                if text.lstrip()[:9].upper() == "#REDIRECT":
                    continue
                yield from _wiki_paragraphs(filter_wiki(text), self.min_words)


@dataclass(frozen=True)
class TextFile(Corpus):
    """A local corpus: ``.jsonl`` (one JSON object per line, document in ``field``) or plain text
    (documents separated by blank lines; the lines of one document are joined with a space)."""

    path: str | os.PathLike[str]
    field: str = "text"

    @property
    def is_jsonl(self) -> bool:
        return Path(self.path).suffix.lower() == ".jsonl"

    @property
    def key(self) -> str:
        digest = hashlib.sha256()
        with open(self.path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        field = f":{self.field}" if self.is_jsonl else ""
        return f"textfile:{Path(self.path).name}{field}:{digest.hexdigest()[:16]}"

    def texts(self) -> Iterator[str]:
        with open(self.path, encoding="utf-8") as handle:
            if self.is_jsonl:
                for number, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    value = json.loads(line).get(self.field)
                    if not isinstance(value, str):
                        raise ValueError(f"{self.path}:{number}: no string field {self.field!r}")
                    if value.strip():
                        yield value
                return
            paragraph: list[str] = []
            for line in handle:
                if line.strip():
                    paragraph.append(line.strip())
                elif paragraph:
                    yield " ".join(paragraph)
                    paragraph = []
            if paragraph:
                yield " ".join(paragraph)


@dataclass(frozen=True)
class HFDataset(Corpus):
    """A Hugging Face dataset (needs ``datasets`` and internet), e.g. ROME's
    ``HFDataset("wikipedia", "20200501.en")`` or ``HFDataset("wikitext", "wikitext-103-raw-v1")``.
    Streams by default, so ``n_tokens`` bounds what is downloaded."""

    name: str
    config: str | None = None
    split: str = "train"
    field: str = "text"
    streaming: bool = True

    @property
    def key(self) -> str:
        return f"hf:{self.name}:{self.config}:{self.split}:{self.field}"

    def texts(self) -> Iterator[str]:
        try:
            import datasets
        except ImportError as err:
            raise ImportError(
                "HFDataset needs the Hugging Face `datasets` package (pip install datasets) and internet; "
                "offline, use WikipediaSample() or TextFile(path)"
            ) from err
        data = datasets.load_dataset(self.name, self.config, split=self.split, streaming=self.streaming)
        for record in data:
            text = record[self.field]
            if text and text.strip():
                yield text


# ---------------------------------------------------------------------------------------- packing
def pack_rows(
    tokenizer: PreTrainedTokenizerBase,
    texts: Iterable[str],
    max_seq_len: int,
    n_tokens: int | None = None,
    docs_per_call: int = 512,
) -> Iterator[torch.Tensor]:
    """Tokenize ``texts`` (no special tokens), join them with EOS in between and yield 1-D rows of
    ``max_seq_len`` token ids; the last row holds the remainder (shorter).  At most ``n_tokens``
    tokens in all."""
    if max_seq_len < 1:
        raise ValueError("max_seq_len must be positive")
    eos = tokenizer.eos_token_id
    budget = n_tokens if n_tokens is not None else float("inf")
    buffer: list[int] = []
    emitted = 0
    first = True
    docs = iter(texts)
    while emitted < budget:
        chunk = list(islice(docs, docs_per_call))
        if not chunk:
            break
        for ids in tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]:
            if not ids:
                continue
            if not first and eos is not None:
                buffer.append(eos)
            first = False
            buffer.extend(ids)
            while len(buffer) >= max_seq_len and emitted < budget:
                size = int(min(max_seq_len, budget - emitted))
                yield torch.tensor(buffer[:size], dtype=torch.long)
                emitted += size
                del buffer[:max_seq_len]
            if emitted >= budget:
                return
    if buffer and emitted < budget:
        yield torch.tensor(buffer[: int(min(len(buffer), budget - emitted))], dtype=torch.long)


def batch_rows(rows: Iterable[torch.Tensor], rows_per_batch: int) -> Iterator[torch.Tensor]:
    """Stack rows into ``[B, L]`` batches of up to ``rows_per_batch`` rows of equal length."""
    group: list[torch.Tensor] = []
    for row in rows:
        if group and row.numel() != group[0].numel():
            yield torch.stack(group)
            group = []
        group.append(row)
        if len(group) == rows_per_batch:
            yield torch.stack(group)
            group = []
    if group:
        yield torch.stack(group)
