"""The model as a memory-based editor shows it: each input routed to a model and given a context.

Memory-based editors (IKE, SERAC) change *how an input is answered*, not the weights.
:class:`ConditionedLM` is their common view of the model: a *router* looks at every input row (its
real tokens decoded to text) and returns, per row, the index of the model that answers it (0 = the
base model; SERAC adds a counterfactual model) and a *prefix* text to put before it (IKE's
demonstrations and new facts; SERAC's edit; ``""`` for none).  The row is then run as
``tokenize(prefix) + the row's own tokens`` — a token concatenation, so the scored tokens are
exactly the original ones — and the logits at the row's own positions come back aligned with the
input (right or left padding; padded positions are zero).  Every metric therefore scores through
the wrapper unchanged (:func:`editlab.scoring.lm_logits_at` dispatches on ``is_edit_wrapper``).

BOS: a non-empty prefix carries the tokenizer's BOS token when the tokenizer puts one before a text
(Llama, Gemma); a row's own leading BOS is then dropped, and its logits (those that predict the
row's first real token) are read at the prefix's last token.  An empty prefix leaves a row exactly
as it is, so the wrapper reproduces the model's logits.

``text_join=True`` (IKE) runs a row instead as the tokenizer encodes ``prefix + row text`` whenever
that encoding still ends with the row's own tokens after its first word — a prefix ending in
``"Prompt: "`` then meets the row as running text does (``": The"``, not ``": "`` + ``"The"``).

Speed: rows that share a prefix (IKE: all of them) run the prefix once into a key/value cache and
only their own tokens against copies of it (the cache is kept across calls while gradients are off
and the model is unchanged); the LM head is applied only at the rows' real positions.  Rows are run with right padding (every real token at the position an unpadded forward
gives it) in sub-batches of at most ``max_batch_tokens`` tokens, prefix included.

:meth:`ConditionedLM.logits_at` computes the LM head only at requested ``(row, position)`` pairs
(``[M, V]``, what :func:`editlab.scoring.lm_logits_at` and :func:`editlab.evaluation.general.token_nll` read);
the plain forward returns the full aligned ``[N, L, V]`` logits.

:meth:`ConditionedLM.generate` runs each model's own ``generate`` on the prefixed rows (left
padding; rows sharing a prefix run as ``[prefix | padding | row]`` with the prefix's cached
keys/values passed in, so only the rows' own tokens are prefilled) and returns
``[input_ids | new tokens]`` in the input's frame, as Hugging Face ``generate`` does, with
stopping criteria that see the input-frame ids; so
:func:`editlab.evaluation.generation.greedy_generate` works on the wrapper unchanged.

Encoder-decoder models (T5; ``config.is_encoder_decoder``, every wrapped model alike): the prefix
goes before the row's *encoder* tokens (``text_join``: the encoder reads the tokenizer's encoding
of ``prefix + row text``, special tokens included — its positions are never scored, so nothing
needs to line up), the decoder input is the caller's, unchanged, and logits are the decoder's,
aligned with ``decoder_input_ids``.  There is no prefix cache (the encoder reads the prefix and
the row together).  :meth:`~ConditionedLM.generate` returns decoder ids that start with the
decoder start token, as Hugging Face seq2seq ``generate`` does.
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList
from transformers.modeling_outputs import CausalLMOutput, Seq2SeqLMOutput

from editlab.models.arch import arch_for, is_encoder_decoder
from editlab.scoring import head_logits
from editlab.tracing import CallRecorder

__all__ = ["ConditionedLM", "Router", "default_bos"]

log = logging.getLogger(__name__)

_KV_ENTRIES = 4  # prefixes whose keys/values a wrapper keeps across calls

Router = Callable[[list[str]], Sequence[tuple[int, str]]]
"""``texts → [(model_index, prefix_text), ...]``, one pair per input row."""


def default_bos(tokenizer) -> int | None:
    """The BOS id when ``tokenizer`` puts one before a text by default (Llama, Gemma), else None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None


def _max_positions(model: nn.Module) -> int | None:
    config = model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(limit) if limit else None


def _expanded_cache(model: nn.Module, layers: Sequence[tuple[torch.Tensor, torch.Tensor]],
                    n: int) -> DynamicCache:
    """A key/value cache holding one prefix's per-layer ``(keys, values)`` for ``n`` rows
    (views, not copies)."""
    cache = DynamicCache(config=model.config)
    for i, (k, v) in enumerate(layers):
        cache.update(k.expand(n, *k.shape[1:]), v.expand(n, *v.shape[1:]), i)
    return cache


@dataclass
class _Row:
    """One input row as the wrapper runs it."""

    index: int                # row in the input batch
    model: int                # index into ConditionedLM.models
    prefix: tuple[int, ...]   # prefix token ids (BOS first when the tokenizer adds one)
    tail: list[int]           # what runs after the prefix; it ends with the row's last `kept` tokens
    columns: list[int]        # the columns whose logits the row returns: its real tokens (seq2seq: the decoder's)
    dropped: bool             # the row's leading BOS was dropped (its logits: the token before the row's)
    body: int                 # the row's real tokens, leading BOS not counted
    own: int                  # the row's real input tokens (the context added is len(sequence) - own)

    @property
    def sequence(self) -> list[int]:
        """What the routed model runs (seq2seq: its encoder input)."""
        return list(self.prefix) + self.tail

    def new_positions(self) -> list[int]:
        """Position, in :attr:`sequence`, of the logits for each real token of the input row: the
        row's tokens are the last of the sequence (a re-encoded first token: the last token of its
        re-encoding; a dropped BOS: the token before the row)."""
        start = len(self.prefix) + len(self.tail) - self.body - int(self.dropped)
        return [max(0, start + j) for j in range(len(self.columns))]


class _InputFrame(StoppingCriteria):
    """Show stopping criteria the ids in the input's frame: ``[original row | new tokens]``
    (seq2seq: ``original`` is the decoder start column, ``width`` 1).

    ``criteria`` receives all ``n_rows`` rows of the original batch; rows outside ``rows`` (run by
    another model or in another sub-batch) carry ``pad`` as their new tokens.  The first ``width``
    columns of the ids the model generates are not new tokens (its prefixed input, or its decoder start).
    """

    def __init__(self, criteria: StoppingCriteriaList, original: torch.Tensor, rows: list[int], width: int,
                 pad: int) -> None:
        self.criteria = criteria
        self.original = original
        self.rows = torch.tensor(rows, device=original.device)
        self.width = width
        self.pad = pad

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, self.width:]
        full = torch.full((self.original.shape[0], new.shape[1]), self.pad, dtype=new.dtype, device=new.device)
        full[self.rows.to(new.device)] = new
        done = self.criteria(torch.cat([self.original.to(new.device), full], dim=1), scores, **kwargs)
        if isinstance(done, bool):
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)
        return done[self.rows.to(done.device)]


class ConditionedLM(nn.Module):
    """A routed, prefix-conditioned view of one or more LMs (all causal, or all encoder-decoder),
    called like the base model.

    Args:
        model: the base model (``models[0]``); its config, LM head and device are the wrapper's.
        tokenizer: the tokenizer of every model (rows are decoded with it for the router, and
            prefixes encoded with it).
        router: ``texts → [(model_index, prefix), ...]`` (:data:`Router`).
        models: every model a row may be routed to, the base model first (default: just it).
        max_batch_tokens: rows run together hold at most this many tokens (prefix included), which
            bounds the key/value cache of a long prefix; a single longer row still runs alone.
        prefix_cache: run a prefix shared by several rows once and reuse its keys/values (exact up
            to float rounding); False runs every row whole.
        text_join: run a row as the tokenizer encodes ``prefix + row text`` whenever that encoding
            ends with the row's own tokens — all of them, or all but those of its first word,
            which then merges with a space that ends the prefix (``"Prompt: " + "The"`` →
            ``": The"``, as in running text); otherwise, and by default, as the token
            concatenation.  Every row token after the first word is the row's own either way; the
            logits that predict the second word are read at the re-encoded first word's last token
            (the other first-word positions repeat the nearest earlier position's logits).
            Encoder-decoder models: the encoder reads ``tokenizer(prefix + row text)`` (special
            tokens included) whenever the prefix is non-empty.

    Attributes:
        seq2seq: the models are encoder-decoder models (``config.is_encoder_decoder``).
        context_tokens / context_rows: prefix tokens added, and rows run, by :meth:`forward`,
            :meth:`logits_at` and :meth:`generate` so far (their ratio is the mean context cost per query).
    """

    is_edit_wrapper = True

    def __init__(self, model: nn.Module, tokenizer, router: Router, models: Sequence[nn.Module] | None = None,
                 *, max_batch_tokens: int = 8192, prefix_cache: bool = True, text_join: bool = False) -> None:
        super().__init__()
        models = [model] if models is None else list(models)
        if not models or models[0] is not model:
            raise ValueError("models[0] must be the base model")
        kinds = [is_encoder_decoder(m) for m in models]
        if any(k != kinds[0] for k in kinds):
            names = ", ".join(f"{i}: {type(m).__name__} ({'encoder-decoder' if k else 'decoder-only'})"
                              for i, (m, k) in enumerate(zip(models, kinds)))
            raise TypeError(f"ConditionedLM's models must all be decoder-only or all encoder-decoder; got {names}")
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be positive, got {max_batch_tokens}")
        self.models = nn.ModuleList(models)
        self.tokenizer = tokenizer
        self.router = router
        self.max_batch_tokens = int(max_batch_tokens)
        self.prefix_cache = bool(prefix_cache)
        self.text_join = bool(text_join)
        self.seq2seq = kinds[0]
        self.bos = default_bos(tokenizer)
        self.context_tokens = 0
        self.context_rows = 0
        self._prefix_ids: dict[str, tuple[int, ...]] = {}
        self._kv: OrderedDict[tuple[int, tuple[int, ...]], tuple] = OrderedDict()

    # ------------------------------------------------------------- model-like
    @property
    def base(self) -> nn.Module:
        return self.models[0]

    @property
    def config(self):
        return self.base.config

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    def get_output_embeddings(self) -> nn.Module:
        return self.base.get_output_embeddings()

    def get_input_embeddings(self) -> nn.Module:
        return self.base.get_input_embeddings()

    # --------------------------------------------------------------- planning
    def prefix_ids(self, prefix: str) -> tuple[int, ...]:
        """Token ids of a prefix: ``()`` for ``""``, else BOS (when the tokenizer adds one) + its tokens."""
        if not prefix:
            return ()
        ids = self._prefix_ids.get(prefix)
        if ids is None:
            body = self.tokenizer(prefix, add_special_tokens=False)["input_ids"]
            ids = tuple(([self.bos] if self.bos is not None else []) + list(body))
            if len(self._prefix_ids) >= 64:
                self._prefix_ids.clear()
            self._prefix_ids[prefix] = ids
        return ids

    def _plan(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
              decoder_input_ids: torch.Tensor | None = None,
              decoder_attention_mask: torch.Tensor | None = None) -> list[_Row]:
        """How every row runs.  Seq2seq: a row's ``columns`` are its decoder input's real
        positions (all of them without ``decoder_attention_mask``; none without a decoder input)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        ids_cpu, mask_cpu = input_ids.cpu(), mask.cpu()
        columns = [torch.nonzero(mask_cpu[i]).flatten().tolist() for i in range(input_ids.shape[0])]
        outputs = columns
        if self.seq2seq:
            outputs = [[] for _ in columns]
            if decoder_input_ids is not None:
                if decoder_input_ids.dim() != 2 or decoder_input_ids.shape[0] != input_ids.shape[0]:
                    raise ValueError(f"decoder_input_ids must be [{input_ids.shape[0]}, length], "
                                     f"got shape {tuple(decoder_input_ids.shape)}")
                dec = (torch.ones_like(decoder_input_ids, dtype=torch.bool) if decoder_attention_mask is None
                       else decoder_attention_mask.bool()).cpu()
                outputs = [torch.nonzero(dec[i]).flatten().tolist() for i in range(dec.shape[0])]
        tokens = [ids_cpu[i, cols].tolist() for i, cols in enumerate(columns)]
        texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        routes = list(self.router(list(texts)))
        if len(routes) != len(texts):
            raise ValueError(f"the router returned {len(routes)} routes for {len(texts)} rows")
        rows = []
        for i, (route, toks, cols) in enumerate(zip(routes, tokens, columns)):
            try:
                index, prefix = route
            except (TypeError, ValueError) as err:
                raise ValueError(f"route of row {i} must be (model_index, prefix), got {route!r}") from err
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self.models):
                raise ValueError(f"route of row {i}: model index {index!r} is not in [0, {len(self.models)})")
            if not isinstance(prefix, str):
                raise ValueError(f"route of row {i}: prefix must be a string, got {type(prefix).__name__}")
            row = self._join(i, index, prefix, toks, outputs[i], texts[i])
            limit = _max_positions(self.models[index])
            if limit is not None and len(row.sequence) > limit:
                raise ValueError(f"row {i} with its prefix has {len(row.sequence)} tokens; model {index} "
                                 f"takes at most {limit} positions")
            rows.append(row)
        return rows

    def _encode(self, text: str) -> list[int]:
        """``text`` as the tokenizer encodes a whole input: BOS (when it adds one) + its tokens."""
        return ([self.bos] if self.bos is not None else []) + list(
            self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _join(self, i: int, index: int, prefix: str, toks: list[int], cols: list[int], text: str) -> _Row:
        """How row ``i`` runs behind ``prefix`` (see :class:`ConditionedLM`, ``text_join``)."""
        full = self.prefix_ids(prefix)
        dropped = bool(full) and self.bos is not None and bool(toks) and toks[0] == self.bos
        body = toks[1:] if dropped else toks
        n = len(body)
        if self.seq2seq:
            if self.text_join and full:
                # the encoder's positions are never scored: it reads prefix + text as the tokenizer encodes it
                return _Row(i, index, (), list(self.tokenizer(prefix + text)["input_ids"]), cols, False, n, len(toks))
            return _Row(i, index, full, body, cols, dropped, n, len(toks))
        if self.text_join and full and n:
            base = self.prefix_ids(prefix.rstrip(" "))
            joint = self._encode(prefix + text)
            if joint[: len(base)] == list(base):
                rest = joint[len(base):]
                # the row's tokens as they are, or all but the tokens of its first word, re-encoded
                for kept in range(n, -1, -1):
                    if kept < n and any(c.isspace() for c in self.tokenizer.decode(body[: n - kept]).strip()):
                        break
                    if len(rest) >= kept + (kept < n) and rest[len(rest) - kept:] == body[n - kept:]:
                        return _Row(i, index, base, rest, cols, dropped, n, len(toks))
        return _Row(i, index, full, body, cols, dropped, n, len(toks))

    def _chunks(self, rows: list[_Row]) -> list[list[_Row]]:
        """Rows grouped by model and prefix (first-appearance order), each group cut into
        sub-batches of at most ``max_batch_tokens`` tokens (sorted by length, so little padding)."""
        chunks: list[list[_Row]] = []
        for key in dict.fromkeys((r.model, r.prefix) for r in rows):
            group = sorted((r for r in rows if (r.model, r.prefix) == key), key=lambda r: len(r.sequence))
            current: list[_Row] = []
            for row in group:
                width = max([len(row.sequence)] + [len(r.sequence) for r in current])
                if current and width * (len(current) + 1) > self.max_batch_tokens:
                    chunks.append(current)
                    current = []
                current.append(row)
            if current:
                chunks.append(current)
        return chunks

    def _count(self, rows: list[_Row]) -> None:
        self.context_rows += len(rows)
        self.context_tokens += sum(len(r.sequence) - r.own for r in rows)

    # ---------------------------------------------------------------- forward
    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad) if pad is not None else 0

    def _head_inputs(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, **kwargs) -> torch.Tensor:
        """The LM head's input ``[B, L, d]`` (the vocabulary projection is never computed)."""
        with CallRecorder(model, [], stop_at=arch_for(model).lm_head) as rec:
            model(input_ids=ids, attention_mask=mask, **kwargs)
        if rec.stopped_input is None:
            raise RuntimeError("the forward pass never reached the LM head")
        return rec.stopped_input

    def _can_share_prefix(self, model: nn.Module, rows: list[_Row]) -> bool:
        prefix = rows[0].prefix
        if self.seq2seq or not self.prefix_cache or not prefix or any(r.prefix != prefix for r in rows):
            return False
        window = getattr(model.config, "sliding_window", None)
        longest = max(len(r.sequence) for r in rows)
        return not (window and longest >= int(window))  # a sliding window would truncate the cache

    def _right_padded(self, rows: list[_Row]) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows' sequences right-padded into ``(input_ids, attention_mask)`` (CPU, at least one column)."""
        width = max(1, max(len(r.sequence) for r in rows))
        ids = torch.full((len(rows), width), self._pad_id(), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, : len(r.sequence)] = torch.tensor(r.sequence, dtype=torch.long)
            mask[j, : len(r.sequence)] = 1
        return ids, mask

    def _hidden_whole(self, model: nn.Module, rows: list[_Row]) -> list[torch.Tensor]:
        """Per row, the LM-head inputs at its real positions, running each row whole (right padding)."""
        device = next(model.parameters()).device
        ids, mask = self._right_padded(rows)
        hidden = self._head_inputs(model, ids.to(device), mask.to(device), use_cache=False)
        return [hidden[j, r.new_positions()] for j, r in enumerate(rows)]

    @staticmethod
    def _state_key(model: nn.Module) -> tuple:
        """Changes whenever the model's outputs may: parameter storage and in-place versions, hooks."""
        params = tuple((p.data_ptr(), p._version) for p in model.parameters())
        hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
        return params, hooks, model.training

    def _prefix_state(self, index: int, model: nn.Module, prefix: tuple[int, ...]):
        """The LM-head inputs ``[P, d]`` and per-layer keys/values of ``prefix`` run alone.

        Kept across calls (last :data:`_KV_ENTRIES` prefixes) while gradients are off and the
        model is unchanged (same parameter storage and versions, same hooks); recomputed otherwise.
        """
        keep = not torch.is_grad_enabled()
        key = (index, prefix)
        state_key = self._state_key(model) if keep else None
        hit = self._kv.get(key) if keep else None
        if hit is not None and hit[0] == state_key:
            self._kv.move_to_end(key)
            return hit[1], hit[2]
        device = next(model.parameters()).device
        ids = torch.tensor([prefix], dtype=torch.long, device=device)
        cache = DynamicCache(config=model.config)
        hidden = self._head_inputs(model, ids, torch.ones_like(ids), cache=cache, use_cache=True)[0]
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        if keep:
            self._kv[key] = (state_key, hidden, layers)
            while len(self._kv) > _KV_ENTRIES:
                self._kv.popitem(last=False)
        return hidden, layers

    def _hidden_shared(self, index: int, model: nn.Module, rows: list[_Row]) -> list[torch.Tensor]:
        """As :meth:`_hidden_whole` for rows sharing one prefix: the prefix runs once into a
        key/value cache (kept across calls, see :meth:`_prefix_state`), the rows' own tokens run
        against copies of it."""
        device = next(model.parameters()).device
        prefix_hidden, layers = self._prefix_state(index, model, rows[0].prefix)
        n_prefix = len(rows[0].prefix)
        width = max(len(r.tail) for r in rows)
        suffix_hidden = None
        if width > 0:
            ids = torch.full((len(rows), width), self._pad_id(), dtype=torch.long)
            mask = torch.zeros((len(rows), n_prefix + width), dtype=torch.long)
            mask[:, :n_prefix] = 1
            for j, r in enumerate(rows):
                ids[j, : len(r.tail)] = torch.tensor(r.tail, dtype=torch.long)
                mask[j, n_prefix: n_prefix + len(r.tail)] = 1
            rows_cache = _expanded_cache(model, layers, len(rows))
            positions = (n_prefix + torch.arange(width)).unsqueeze(0).expand(len(rows), width)
            suffix_hidden = self._head_inputs(model, ids.to(device), mask.to(device),
                                              position_ids=positions.to(device), cache=rows_cache, use_cache=True)
        out = []
        for j, r in enumerate(rows):
            parts = []
            for pos in r.new_positions():
                parts.append(prefix_hidden[pos] if pos < n_prefix else suffix_hidden[j, pos - n_prefix])
            out.append(torch.stack(parts) if parts else prefix_hidden[:0])
        return out

    def _hidden_seq2seq(self, model: nn.Module, rows: list[_Row], decoder_input_ids: torch.Tensor,
                        decoder_attention_mask: torch.Tensor | None) -> list[torch.Tensor]:
        """Per row, the LM-head inputs at its decoder columns: the encoder reads the prefixed row
        (right padding), the decoder the row's own decoder input."""
        device = next(model.parameters()).device
        ids, mask = self._right_padded(rows)
        index = torch.tensor([r.index for r in rows], dtype=torch.long, device=decoder_input_ids.device)
        dec_ids = decoder_input_ids.index_select(0, index).to(device)
        dec_mask = (None if decoder_attention_mask is None
                    else decoder_attention_mask.index_select(0, index.to(decoder_attention_mask.device)).to(device))
        hidden = self._head_inputs(model, ids.to(device), mask.to(device), decoder_input_ids=dec_ids,
                                   decoder_attention_mask=dec_mask, use_cache=False)
        return [hidden[j, r.columns] for j, r in enumerate(rows)]

    def _run(self, rows: list[_Row], decoder_input_ids: torch.Tensor | None,
             decoder_attention_mask: torch.Tensor | None):
        """``(chunk, hidden)`` per sub-batch of ``rows``: ``hidden[j]`` is ``[len(chunk[j].columns), d]``,
        the LM head's input at the row's columns, from the model the chunk is routed to."""
        for chunk in self._chunks(rows):
            model = self.models[chunk[0].model]
            if self.seq2seq:
                hidden = self._hidden_seq2seq(model, chunk, decoder_input_ids, decoder_attention_mask)
            elif self._can_share_prefix(model, chunk):
                hidden = self._hidden_shared(chunk[0].model, model, chunk)
            else:
                hidden = self._hidden_whole(model, chunk)
            yield chunk, hidden

    def _head(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Model ``index``'s LM head on ``[M, d]`` hidden states (float32 ``[M, V]``)."""
        vocab = int(self.get_output_embeddings().weight.shape[0])
        flat = head_logits(self.models[index], hidden)
        if flat.shape[-1] != vocab:
            raise ValueError(f"model {index} has a vocabulary of {flat.shape[-1]}, the base model {vocab}")
        return flat

    def _check_inputs(self, decoder_input_ids: torch.Tensor | None, kwargs: dict, name: str) -> None:
        if kwargs:
            raise TypeError(f"ConditionedLM.{name} does not take {sorted(kwargs)}")
        if self.seq2seq and decoder_input_ids is None:
            raise ValueError(f"ConditionedLM.{name} of an encoder-decoder model needs decoder_input_ids")
        if not self.seq2seq and decoder_input_ids is not None:
            raise TypeError(f"ConditionedLM.{name} of a decoder-only model does not take decoder_input_ids")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None, decoder_attention_mask: torch.Tensor | None = None,
                use_cache: bool | None = None, return_dict: bool | None = None,
                **kwargs) -> CausalLMOutput | Seq2SeqLMOutput:
        """Logits ``[N, L, V]`` (float32) aligned with ``input_ids`` (seq2seq: with
        ``decoder_input_ids``, ``[N, T, V]``); padded positions are zero.

        Row ``i``'s logits at its real positions are those the routed model gives the prefixed row
        there; ``use_cache`` is ignored (nothing is cached across calls).  Scoring a few positions?
        :meth:`logits_at` projects only those to the vocabulary.
        """
        self._check_inputs(decoder_input_ids, kwargs, "forward")
        rows = self._plan(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask)
        shape = tuple((decoder_input_ids if self.seq2seq else input_ids).shape)
        vocab = int(self.get_output_embeddings().weight.shape[0])
        logits = None
        for chunk, hidden in self._run([r for r in rows if r.columns], decoder_input_ids, decoder_attention_mask):
            flat = self._head(chunk[0].model, torch.cat(hidden, dim=0))
            if logits is None:
                logits = torch.zeros((*shape, vocab), dtype=flat.dtype, device=flat.device)
            row_idx = torch.cat([torch.full((len(r.columns),), r.index, dtype=torch.long) for r in chunk])
            col_idx = torch.cat([torch.tensor(r.columns, dtype=torch.long) for r in chunk])
            logits[row_idx.to(flat.device), col_idx.to(flat.device)] = flat
        if logits is None:
            logits = torch.zeros((*shape, vocab), dtype=torch.float32, device=input_ids.device)
        self._count(rows)
        return Seq2SeqLMOutput(logits=logits) if self.seq2seq else CausalLMOutput(logits=logits)

    def logits_at(self, rows: torch.Tensor, positions: torch.Tensor, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None = None, decoder_input_ids: torch.Tensor | None = None,
                  decoder_attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """``forward(...).logits[rows, positions]`` (float32 ``[M, V]``) without the ``[N, L, V]``
        tensor: the LM head runs only at the requested positions, and only rows with a requested
        position are run.  ``positions`` index the input's columns (seq2seq: the decoder input's)
        and must be real (unpadded) positions.
        """
        kwargs.pop("use_cache", None)
        self._check_inputs(decoder_input_ids, kwargs, "logits_at")
        rows_t, pos_t = torch.as_tensor(rows).flatten(), torch.as_tensor(positions).flatten()
        if rows_t.shape != pos_t.shape:
            raise ValueError(f"{rows_t.numel()} rows for {pos_t.numel()} positions")
        plan = self._plan(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask)
        wanted: dict[int, list[tuple[int, int]]] = {}
        for k, (row, col) in enumerate(zip(rows_t.tolist(), pos_t.tolist())):
            if not 0 <= row < len(plan):
                raise ValueError(f"row {row} is not in [0, {len(plan)})")
            wanted.setdefault(row, []).append((k, col))
        run = [r for r in plan if r.index in wanted]
        for r in run:
            real = set(r.columns)
            bad = [col for _, col in wanted[r.index] if col not in real]
            if bad:
                raise ValueError(f"position {bad[0]} of row {r.index} is padding, not a real token")
        vocab = int(self.get_output_embeddings().weight.shape[0])
        out = None
        for chunk, hidden in self._run(run, decoder_input_ids, decoder_attention_mask):
            parts, order = [], []
            for r, h in zip(chunk, hidden):
                where = {col: j for j, col in enumerate(r.columns)}
                parts.append(h[[where[col] for _, col in wanted[r.index]]])
                order.extend(k for k, _ in wanted[r.index])
            flat = self._head(chunk[0].model, torch.cat(parts, dim=0))
            if out is None:
                out = torch.zeros((rows_t.numel(), vocab), dtype=flat.dtype, device=flat.device)
            out[torch.tensor(order, dtype=torch.long, device=flat.device)] = flat
        if out is None:
            out = torch.zeros((0, vocab), dtype=torch.float32, device=next(self.base.parameters()).device)
        self._count(run)
        return out

    # --------------------------------------------------------------- generate
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int = 20, do_sample: bool = False, pad_token_id: int | None = None,
                 stopping_criteria: StoppingCriteriaList | None = None, **kwargs) -> torch.Tensor:
        """``[input_ids | new tokens]``, as Hugging Face ``generate`` returns it for decoder-only
        models; seq2seq: ``[decoder start | new tokens]``, as it returns it for encoder-decoder models.

        Each routed model generates for its prefixed rows with its own ``generate`` (left padding);
        new tokens of rows that finished early, or whose sub-batch finished early, are
        ``pad_token_id``.  ``stopping_criteria`` see ids in the returned frame (``[input_ids | new]``
        or ``[decoder start | new]``, all rows).  When rows run in several sub-batches (several models, or more tokens than
        ``max_batch_tokens``), each sub-batch consults a copy of the criteria, and the criteria
        themselves are then replayed over the combined output step by step (with ``scores=None``),
        so criteria with per-row state (e.g. the edit loop's answer stop) end in the state a single
        batch would have left.
        """
        pad = pad_token_id if pad_token_id is not None else self._pad_id()
        rows = self._plan(input_ids, attention_mask)
        for r in rows:
            if not r.sequence:
                raise ValueError(f"row {r.index} has no tokens to generate from")
        frame = input_ids  # what the returned ids (and the stopping criteria) start with
        if self.seq2seq:
            start = getattr(self.config, "decoder_start_token_id", None)
            start = pad if start is None else int(start)
            frame = torch.full((input_ids.shape[0], 1), start, dtype=input_ids.dtype, device=input_ids.device)
        chunks = self._chunks(rows)
        single = len(chunks) == 1
        results: dict[int, torch.Tensor] = {}
        for chunk in chunks:
            model = self.models[chunk[0].model]
            device = next(model.parameters()).device
            width = max(len(r.sequence) for r in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            cache = None
            if self._can_share_prefix(model, chunk) and all(r.tail for r in chunk):
                # [prefix | left padding | tail]: the prefix's keys/values come from its cache, the
                # padding is masked, and every tail token keeps the position it has in its own row
                n_prefix = len(chunk[0].prefix)
                _, layers = self._prefix_state(chunk[0].model, model, chunk[0].prefix)
                cache = _expanded_cache(model, layers, len(chunk))
                ids[:, :n_prefix] = torch.tensor(chunk[0].prefix, dtype=torch.long)
                mask[:, :n_prefix] = 1
                for j, r in enumerate(chunk):
                    ids[j, width - len(r.tail):] = torch.tensor(r.tail, dtype=torch.long)
                    mask[j, width - len(r.tail):] = 1
            else:
                for j, r in enumerate(chunk):
                    seq = r.sequence
                    ids[j, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
                    mask[j, width - len(seq):] = 1
            extra = dict(kwargs) if cache is None else dict(kwargs, cache=cache)
            criteria = None
            if stopping_criteria is not None:
                inner = stopping_criteria if single else copy.deepcopy(stopping_criteria)
                # seq2seq: the model's own ids are [decoder start | new]
                skip = 1 if self.seq2seq else width
                criteria = StoppingCriteriaList([_InputFrame(inner, frame, [r.index for r in chunk], skip, pad)])
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad,
                                 stopping_criteria=criteria, **extra)
            for j, r in enumerate(chunk):
                results[r.index] = out[j, (1 if self.seq2seq else width):]
        steps = max((t.shape[0] for t in results.values()), default=0)
        new = torch.full((input_ids.shape[0], steps), pad, dtype=input_ids.dtype, device=input_ids.device)
        for i, tokens in results.items():
            new[i, : tokens.shape[0]] = tokens.to(new.device)
        if stopping_criteria is not None and not single:
            for t in range(1, steps + 1):
                done = stopping_criteria(torch.cat([frame, new[:, :t]], dim=1), None)
                if bool(torch.as_tensor(done).all()):
                    break
        self._count(rows)
        return torch.cat([frame, new], dim=1)
