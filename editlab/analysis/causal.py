"""Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", §2.1).

For one prompt that ends where the model states a fact ("Vinson Massif is located in the
continent of" → " Antarctica"):

1. **clean run** — the model's own next-token prediction at the last position is the *answer*
   (ROME measures the token the model actually predicts, not the dataset's attribute) and its
   probability is the ``high`` score; every hidden state of interest is kept.
2. **corrupted runs** — Gaussian noise ``N(0, noise²)`` is added to the subject tokens' input
   embeddings, ``samples`` times with different draws; the mean answer probability over the draws
   is the ``low`` score.
3. **corrupted-with-restoration runs** — in the same corrupted runs (the *same* noise draws for
   every restoration of one prompt, as in ROME, whose noise generator is re-seeded for every
   patched run), the clean value of one state is put back and the mean answer probability is the
   score of that state.  Three kinds of state:

   * ``hidden``: the residual stream after block ``l`` (the block output) at token ``t``;
   * ``mlp``: the MLP output at token ``t`` in the ``window`` layers centred on ``l``
     (``[l - window//2, l + ceil(window/2))``, clipped to the network — ROME's window);
   * ``attn``: the same with the attention output.

   ``score - low`` is the *indirect effect* of the state; ``high - low`` the total effect.

**Where the noise goes.**  ROME adds the noise to the output of the token-embedding module
(``transformer.wte`` for GPT-2/GPT-J, ``gpt_neox.embed_in``) and measures the noise level as the
standard deviation of that same output over the subjects' tokens (``collect_embedding_std``,
tokenising each subject on its own), times 3 in the paper.  editlab does the same through the
architecture table's ``embeddings`` path.  What the first block sees differs from that output only
by operations that are linear in it (GPT-2 adds position embeddings; Gemma multiplies by
``sqrt(d)`` — inside the embedding module in transformers ≥ 5, after it in older releases), so
measuring the std and adding the noise at the same place gives the same signal-to-noise ratio at
the first block either way.

**How it is computed fast** (the result is that of one patched forward per restoration):

* one corrupted forward of ``rows = tokens × samples`` rows records every block's call
  (:class:`~editlab.tracing.CallRecorder`); a restoration that starts at layer ``lo`` leaves every
  layer below unchanged, so it *replays* only blocks ``lo..L-1``
  (:func:`~editlab.tracing.replay_layers`) from the recorded corrupted input of block ``lo``,
  with the clean values written in by :class:`~editlab.tracing.Trace` ``edit_output`` hooks —
  for one layer, all restored tokens × all samples are rows of one batch;
* the vocabulary projection is computed at the last position only (``head_logits``);
* tokens before the first subject token are never corrupted (causal attention), so restoring them
  changes nothing: their scores are ``low`` without a forward;
* gradients are never computed; the corrupted forward is shared by all kinds of one prompt.

:func:`restore_probability` is the plain version (one full patched forward for any set of
``(token, layer, kind)`` states, like ROME's ``trace_with_patch``), used by the tests as the
reference.

Decoder-only models only (every causal entry of :mod:`editlab.models.arch`); encoder-decoder
models raise ``ValueError``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from editlab.data.collate import encode_pairs, subject_span
from editlab.models.arch import ArchSpec, arch_for, get_module, is_encoder_decoder
from editlab.scoring import head_logits
from editlab.tracing import CallRecorder, Trace, replay_layers

__all__ = [
    "KINDS",
    "CATEGORIES",
    "CATEGORY_LABELS",
    "TraceResult",
    "noise_std",
    "layer_window",
    "next_token",
    "first_answer_token",
    "trace_prompt",
    "restore_probability",
    "token_categories",
    "average_indirect_effects",
]

log = logging.getLogger(__name__)

KINDS = ("hidden", "mlp", "attn")
# kind -> architecture-table role of the module whose output is restored
_ROLE = {"hidden": "residual", "mlp": "mlp_out", "attn": "attn_out"}
# ROME's token categories (Figure 2 / notebooks/average_causal_effects.ipynb)
CATEGORIES = (
    "first_subject", "middle_subject", "last_subject", "first_subsequent", "further", "last",
)
CATEGORY_LABELS = {
    "first_subject": "First subject token",
    "middle_subject": "Middle subject tokens",
    "last_subject": "Last subject token",
    "first_subsequent": "First subsequent token",
    "further": "Further tokens",
    "last": "Last token",
}


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def _causal_spec(model: nn.Module) -> ArchSpec:
    if is_encoder_decoder(model):
        raise ValueError(
            f"causal tracing needs a decoder-only model; {type(model).__name__} "
            f"(model_type {model.config.model_type!r}) is encoder-decoder")
    return arch_for(model)


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def layer_window(layer: int, num_layers: int, window: int) -> range:
    """The layers restored for the window centred on ``layer``: ``[layer - window//2,
    layer + ceil(window/2))`` clipped to ``[0, num_layers)`` (ROME's ``trace_important_window``)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    return range(max(0, layer - window // 2), min(num_layers, layer + (window + 1) // 2))


def _kind_window(kind: str, window: int) -> int:
    if kind not in _ROLE:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    return 1 if kind == "hidden" else window


@torch.no_grad()
def noise_std(model: nn.Module, tokenizer, subjects: Iterable[str]) -> float:
    """Standard deviation (over all elements) of the token-embedding module's output for the
    subjects' tokens, each subject tokenised on its own without special tokens — ROME's
    ``collect_embedding_std``.  Multiply by 3 for the paper's noise level."""
    spec = _causal_spec(model)
    embed = get_module(model, spec.embeddings)
    ids = [i for s in subjects for i in tokenizer(s, add_special_tokens=False)["input_ids"]]
    if not ids:
        raise ValueError("noise_std needs at least one subject token")
    vectors = embed(torch.tensor([ids], device=_device(model)))
    return float(vectors.float().std().item())


def _encode(tokenizer, prompt: str, device: torch.device) -> torch.Tensor:
    ids = tokenizer(prompt, add_special_tokens=True, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise ValueError(f"prompt {prompt!r} tokenises to nothing")
    return ids.to(device)


def _last_logits(model: nn.Module, spec: ArchSpec, **inputs) -> torch.Tensor:
    """Logits at the last position of every row, without the full-sequence vocabulary projection."""
    with CallRecorder(model, [], stop_at=spec.lm_head) as rec:
        model(**inputs, use_cache=False)
    if rec.stopped_input is None:
        raise RuntimeError("the forward pass never reached the LM head")
    return head_logits(model, rec.stopped_input[:, -1])


@torch.no_grad()
def next_token(model: nn.Module, tokenizer, prompts: Sequence[str], batch_size: int = 32) -> list[tuple[int, float]]:
    """The model's greedy next token after each prompt and its probability: ``[(id, p), ...]``."""
    spec = _causal_spec(model)
    device = _device(model)
    out: list[tuple[int, float]] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for lo in range(0, len(prompts), batch_size):
        rows = tokenizer(list(prompts[lo: lo + batch_size]), add_special_tokens=True)["input_ids"]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # right padding: every real token keeps its position
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        ids, mask = ids.to(device), mask.to(device)
        with CallRecorder(model, [], stop_at=spec.lm_head) as rec:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        last = mask.sum(dim=1) - 1
        hidden = rec.stopped_input[torch.arange(len(rows), device=device), last]
        probs = torch.softmax(head_logits(model, hidden), dim=-1)
        p, idx = probs.max(dim=-1)
        out.extend(zip(idx.tolist(), p.tolist()))
    return out


def first_answer_token(tokenizer, prompt: str, answer: str) -> int:
    """The first token of ``answer`` as it follows ``prompt`` (with one leading space, tokenised in
    context as editlab's teacher-forced scoring does)."""
    batch = encode_pairs(tokenizer, [prompt], [answer])
    return int(batch.target_ids[0, 0])


def _subject_noise(samples: int, n_tokens: int, dim: int, std: float, seed: int) -> torch.Tensor:
    """``[samples, n_tokens, dim]`` Gaussian noise, drawn on the CPU from a generator seeded with
    ``seed`` (so the draw is the same on every device and for every restoration)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(samples, n_tokens, dim, generator=gen) * std


@dataclass
class _Prepared:
    spec: ArchSpec
    input_ids: torch.Tensor        # [1, T]
    span: tuple[int, int]
    answer_id: int
    high: float
    clean: dict[str, torch.Tensor]  # module path -> clean output [1, T, d]
    noise: torch.Tensor             # [S, n_subject, d] on the model's device and dtype


def _prepare(model, tokenizer, prompt, subject, *, paths, noise, samples, seed, answer) -> _Prepared:
    spec = _causal_spec(model)
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    device = _device(model)
    input_ids = _encode(tokenizer, prompt, device)
    span = subject_span(tokenizer, prompt, subject)
    if span[1] > input_ids.shape[1]:
        raise ValueError(f"subject span {span} lies outside the {input_ids.shape[1]} prompt tokens")
    with Trace(model, paths, retain_output=True, clone=True) as tr:
        logits = _last_logits(model, spec, input_ids=input_ids)
    probs = torch.softmax(logits[0], dim=-1)
    if answer is None:
        answer_id = int(probs.argmax())
    elif isinstance(answer, str):
        answer_id = first_answer_token(tokenizer, prompt, answer)
    else:
        answer_id = int(answer)
    embed_dtype = get_module(model, spec.embeddings).weight.dtype
    dim = get_module(model, spec.embeddings).weight.shape[1]
    draws = _subject_noise(samples, span[1] - span[0], dim, noise, seed).to(device=device, dtype=embed_dtype)
    return _Prepared(spec, input_ids, span, answer_id, float(probs[answer_id]), dict(tr.outputs), draws)


def _noise_hook(noise: torch.Tensor, span: tuple[int, int], repeats: int):
    """``edit_output`` that adds ``noise`` (tiled ``repeats`` times along the rows) to the subject
    tokens of the embedding output."""
    a, b = span
    tiled = noise.repeat(repeats, 1, 1)

    def edit(path: str, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[:, a:b] += tiled.to(out.dtype)
        return out

    return edit


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------

@dataclass
class TraceResult:
    """Causal trace of one prompt for one kind of state.

    Attributes:
        scores: ``[tokens, layers]`` mean probability of ``answer`` with the state restored
            (for ``mlp``/``attn``: the window of ``window`` layers centred on the column's layer).
        low: mean probability of ``answer`` in the corrupted runs, nothing restored.
        high: probability of ``answer`` in the clean run.
        tokens: the prompt's tokens (decoded one by one), special tokens included.
        subject_range: ``(start, end)`` token indices of the subject (end exclusive).
        answer / answer_id: the answer token (the clean run's prediction unless one was given).
        seconds: wall time spent on this kind's restorations (the shared clean and corrupted
            forwards are in ``shared_seconds``).
    """

    kind: str
    scores: np.ndarray
    low: float
    high: float
    tokens: list[str]
    input_ids: list[int]
    subject_range: tuple[int, int]
    answer: str
    answer_id: int
    prompt: str
    subject: str
    window: int
    noise: float
    samples: int
    seconds: float = 0.0
    shared_seconds: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def indirect_effect(self) -> np.ndarray:
        """``scores - low``: the indirect effect of each restored state."""
        return self.scores - self.low


# --------------------------------------------------------------------------------------------
# The batched trace
# --------------------------------------------------------------------------------------------

def trace_prompt(
    model: nn.Module,
    tokenizer,
    prompt: str,
    subject: str,
    *,
    noise: float,
    kinds: Sequence[str] = KINDS,
    samples: int = 10,
    window: int = 10,
    seed: int = 1,
    answer: int | str | None = None,
    max_rows: int | None = None,
) -> dict[str, TraceResult]:
    """Causal trace of ``prompt`` with ``subject`` corrupted, for each of ``kinds``.

    Args:
        noise: the standard deviation of the Gaussian noise added to the subject's embeddings
            (ROME: 3 × :func:`noise_std`).  0 corrupts nothing.
        kinds: any of ``"hidden"``, ``"mlp"``, ``"attn"``.
        samples: noise draws (rows) per restoration; scores are means over them.
        window: layers restored together for ``mlp``/``attn`` (``hidden`` restores one layer).
        seed: seed of the noise generator; the same draws are used for every restoration.
        answer: the token whose probability is measured: ``None`` for the clean run's prediction
            (ROME), a token id, or a string whose first token (after the prompt) is used.
        max_rows: at most this many rows (tokens × samples) per forward; ``None`` = every restored
            token of one layer in one batch.

    Returns: ``{kind: TraceResult}``.
    """
    spec = _causal_spec(model)
    kinds = list(dict.fromkeys(kinds))
    for kind in kinds:
        _kind_window(kind, window)
    num_layers = spec.num_layers(model)
    paths = {k: [spec.module_path(model, _ROLE[k], l) for l in range(num_layers)] for k in kinds}
    blocks = [spec.layer_path(l) for l in range(num_layers)]
    final_norm = get_module(model, spec.final_norm)
    start = time.perf_counter()
    with torch.no_grad():
        prep = _prepare(model, tokenizer, prompt, subject, paths=[p for k in kinds for p in paths[k]],
                        noise=noise, samples=samples, seed=seed, answer=answer)
        T = prep.input_ids.shape[1]
        a = prep.span[0]
        # tokens before the subject are never corrupted: their restorations change nothing
        run_tokens = list(range(a, T))
        per_chunk = len(run_tokens) if not max_rows else max(1, max_rows // samples)
        scores = {k: torch.full((T, num_layers), float("nan")) for k in kinds}
        seconds = dict.fromkeys(kinds, 0.0)
        low: float | None = None
        shared = time.perf_counter() - start
        for c0 in range(0, len(run_tokens), per_chunk):
            toks = torch.tensor(run_tokens[c0: c0 + per_chunk], device=prep.input_ids.device)
            rows = len(toks) * samples
            t0 = time.perf_counter()
            # one corrupted forward, every block's call recorded (shared by all kinds and layers)
            ids = prep.input_ids.expand(rows, T)
            with Trace(model, [spec.embeddings], edit_output=_noise_hook(prep.noise, prep.span, len(toks))), \
                    CallRecorder(model, blocks, stop_at=spec.lm_head) as rec:
                model(input_ids=ids, use_cache=False)
            if rec.stopped_input is None or len(rec.calls) != num_layers:
                raise RuntimeError("the corrupted forward did not run every block up to the LM head")
            if low is None:
                p = torch.softmax(head_logits(model, rec.stopped_input[:samples, -1]), dim=-1)
                low = float(p[:, prep.answer_id].mean())
            shared += time.perf_counter() - t0
            row_tok = toks.repeat_interleave(samples)           # the token each row restores
            row_idx = torch.arange(rows, device=toks.device)
            for kind in kinds:
                t1 = time.perf_counter()
                for layer in range(num_layers):
                    restored = layer_window(layer, num_layers, _kind_window(kind, window))
                    restore_paths = [paths[kind][j] for j in restored]

                    def edit(path: str, out: torch.Tensor) -> torch.Tensor:
                        out = out.clone()
                        out[row_idx, row_tok] = prep.clean[path][0, row_tok].to(out.dtype)
                        return out

                    lo = restored.start
                    with Trace(model, restore_paths, edit_output=edit):
                        h = replay_layers(model, blocks[lo:], rec.calls, rec.calls[blocks[lo]].hidden)
                    logits = head_logits(model, final_norm(h[:, -1:])[:, 0])
                    p = torch.softmax(logits, dim=-1)[:, prep.answer_id]
                    scores[kind][toks.cpu(), layer] = p.view(len(toks), samples).mean(dim=1).float().cpu()
                seconds[kind] += time.perf_counter() - t1
            del rec
    assert low is not None  # subject_span never returns an empty span, so some token was run
    tokens = [tokenizer.decode([i]) for i in prep.input_ids[0].tolist()]
    results = {}
    for kind in kinds:
        s = scores[kind]
        s[:a] = low
        results[kind] = TraceResult(
            kind=kind, scores=s.numpy().astype(np.float64), low=low, high=prep.high, tokens=tokens,
            input_ids=prep.input_ids[0].tolist(), subject_range=prep.span, answer=tokenizer.decode([prep.answer_id]),
            answer_id=prep.answer_id, prompt=prompt, subject=subject, window=_kind_window(kind, window),
            noise=float(noise), samples=samples, seconds=seconds[kind], shared_seconds=shared,
        )
    return results


# --------------------------------------------------------------------------------------------
# The plain version: one patched forward
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def restore_probability(
    model: nn.Module,
    tokenizer,
    prompt: str,
    subject: str,
    states: Iterable[tuple[int, int, str]],
    *,
    noise: float,
    samples: int = 10,
    seed: int = 1,
    answer: int | str | None = None,
) -> tuple[float, float, float]:
    """One corrupted forward of ``samples`` rows with the clean values of ``states`` (``(token,
    layer, kind)`` triples) restored; returns ``(score, low, high)`` for the answer token.

    The reference implementation (ROME's ``trace_with_patch``): full forwards, no replay.  Uses the
    same noise draws as :func:`trace_prompt` for the same ``seed``.
    """
    spec = _causal_spec(model)
    states = list(states)
    restore: dict[str, list[int]] = {}
    for token, layer, kind in states:
        _kind_window(kind, 1)
        restore.setdefault(spec.module_path(model, _ROLE[kind], layer), []).append(token)
    paths = list(restore) or [spec.layer_path(0)]
    prep = _prepare(model, tokenizer, prompt, subject, paths=paths, noise=noise, samples=samples, seed=seed,
                    answer=answer)
    ids = prep.input_ids.expand(samples, -1)
    add_noise = _noise_hook(prep.noise, prep.span, 1)

    def run(restore_map: Mapping[str, list[int]]) -> float:
        def edit(path: str, out: torch.Tensor) -> torch.Tensor:
            if path == spec.embeddings:
                return add_noise(path, out)
            out = out.clone()
            toks = restore_map[path]
            out[:, toks] = prep.clean[path][:, toks].to(out.dtype)
            return out

        with Trace(model, [spec.embeddings, *restore_map], edit_output=edit):
            logits = _last_logits(model, spec, input_ids=ids)
        return float(torch.softmax(logits, dim=-1)[:, prep.answer_id].mean())

    low = run({})
    score = run(restore) if restore else low
    return score, low, prep.high


# --------------------------------------------------------------------------------------------
# Averages over prompts (ROME's Figure 2)
# --------------------------------------------------------------------------------------------

def token_categories(subject_range: tuple[int, int], num_tokens: int) -> dict[str, list[int]]:
    """Token indices of ROME's six categories for one prompt.

    First/middle/last subject token, the first token after the subject, the further tokens between
    it and the last token, and the last token (ROME's ``average_causal_effects`` notebook: a
    one-token subject is both first and last subject token; a token that is both first subsequent
    and last counts for both).  A category with no token (subject at the very end) is empty.
    """
    a, b = subject_range
    last_e, first_a, last_a = b - 1, b, num_tokens - 1
    return {
        "first_subject": [a],
        "middle_subject": list(range(a + 1, last_e)),
        "last_subject": [last_e],
        "first_subsequent": [first_a] if first_a < num_tokens else [],
        "further": list(range(first_a + 1, last_a)),
        "last": [last_a],
    }


def average_indirect_effects(results: Sequence[TraceResult]) -> dict[str, dict[str, Any]]:
    """Average indirect effect (``score - low`` of each prompt) per layer for each category, pooled
    like ROME (every middle / further token is one sample).

    Returns ``{category: {"mean": [L], "std": [L], "n": int}}`` for the results of one kind.
    ROME subtracts the mean low score of all prompts from the mean score; here each prompt's own
    low score is subtracted, which is the same for the one-token-per-prompt categories.
    """
    pooled: dict[str, list[np.ndarray]] = {c: [] for c in CATEGORIES}
    for r in results:
        ie = r.indirect_effect
        for cat, idx in token_categories(r.subject_range, ie.shape[0]).items():
            pooled[cat].extend(ie[i] for i in idx)
    out: dict[str, Any] = {}
    for cat, rows in pooled.items():
        if rows:
            arr = np.stack(rows)
            out[cat] = {"mean": arr.mean(axis=0), "std": arr.std(axis=0), "n": len(rows)}
        else:
            out[cat] = {"mean": None, "std": None, "n": 0}
    return out
