"""Second-moment statistics of MLP keys over a text corpus, cached on disk.

ROME and MEMIT (Meng et al. 2022, 2023) precondition their rank-one / least-squares updates with
the uncentred second moment ``C = E[k kᵀ]`` of the keys ``k`` — the inputs of an MLP output
projection — over a large text corpus.  The statistic follows ``rome/layer_stats.py`` and
``util/runningstats.SecondMoment`` of kmeng01/rome (defaults there: Wikipedia, 100,000 documents,
float32); the way it is gathered differs:

* **Packing** (:func:`editlab.data.corpora.pack_rows`).  ROME truncates and pads each document.
  Here documents are tokenized without special tokens, joined with the tokenizer's EOS token in
  between (when it has one) and cut into rows of exactly ``max_seq_len`` tokens; rows attend
  across document boundaries, as in packed pre-training.  Every position is a real token, so ``count`` is the number of corpus tokens
  (EOS separators included) or ``n_tokens`` when capped.  The final row may be shorter: it runs
  alone, as a batch of one row.
* **One stopped forward.**  All requested layers' modules are traced in the same forward, which
  stops (:class:`~editlab.tracing.Trace` ``stop=True``) right after the highest one has run.
* **Float64 sums by blocks.**  ``Σ kᵀk`` is accumulated in float64 over the upper block triangle
  only (a blocked symmetric rank-k update), then mirrored: ~58% of the work of ``k.T @ k`` for
  d = 1536.
* **Disk cache.**  One file per (model identity, tokenizer, role, layer, corpus, ``n_tokens``,
  ``max_seq_len``, dtype); the model identity is ``config._name_or_path`` plus a hash of the
  embedding and of the first and last blocks' ``mlp_out`` weights.  Layers already cached are
  loaded; the others are computed together in one pass.  The statistic describes the model it was
  computed on: the hash does not see in-place edits of other layers (compute it before editing).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from editlab.data.corpora import Corpus, WikipediaSample, batch_rows, pack_rows
from editlab.models.arch import arch_for, get_module, is_encoder_decoder
from editlab.tracing import Trace

__all__ = [
    "SecondMoment",
    "is_cached",
    "layer_stats",
    "effective_seq_len",
    "model_identity",
    "stats_cache_root",
]

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
_BLOCK = 256  # column block of the symmetric rank-k update
_HASH_ELEMENTS = 1 << 20  # elements sampled (evenly strided) from each fingerprinted tensor


# ---------------------------------------------------------------------------------- sequence length
def effective_seq_len(model: nn.Module, max_seq_len: int) -> int:
    """``max_seq_len``, clipped to the model's number of positions."""
    config = model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is not None and max_seq_len > int(limit):
        log.info("max_seq_len %d > the model's %d positions; using %d", max_seq_len, limit, limit)
        return int(limit)
    return max_seq_len


# ------------------------------------------------------------------------------------ the statistic
@dataclass
class SecondMoment:
    """``mom2 = Σ k kᵀ / count`` (float64, ``[d, d]``) over ``count`` key vectors; ``path``: the
    cache file."""

    mom2: torch.Tensor
    count: int
    path: Path | None = None


class _GramSum:
    """Running ``Σ kᵀk`` in float64 over the upper block triangle (blocked symmetric rank-k update)."""

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device, block: int = _BLOCK) -> None:
        self.dim = dim
        self.dtype = dtype
        self.block = block
        self.total = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def add(self, keys: torch.Tensor) -> None:
        k = keys.reshape(-1, self.dim).to(self.dtype)
        for start in range(0, self.dim, self.block):
            stop = min(start + self.block, self.dim)
            target = self.total[start:stop, start:]
            if self.dtype == torch.float64:
                target.addmm_(k[:, start:stop].T, k[:, start:])
            else:
                target += k[:, start:stop].T @ k[:, start:]

    def full(self) -> torch.Tensor:
        return torch.triu(self.total) + torch.triu(self.total, 1).T


def _gather(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    paths: dict[int, str],
    corpus: Corpus,
    *,
    n_tokens: int | None,
    seq_len: int,
    batch_tokens: int,
    dtype: torch.dtype,
    progress: bool,
) -> tuple[dict[int, torch.Tensor], int]:
    """One pass over the packed corpus: ``{layer: Σ kᵀk}`` and the number of keys."""
    device = next(model.parameters()).device
    rows = pack_rows(tokenizer, corpus.texts(), seq_len, n_tokens)
    batches = batch_rows(rows, max(1, batch_tokens // seq_len))
    trace_paths = list(paths.values())
    sums: dict[int, _GramSum] = {}
    count = 0
    modes = {module: module.training for module in model.modules()}
    model.eval()
    bar = tqdm(total=n_tokens, unit="tok", unit_scale=True, disable=not progress,
               desc=f"mom2 layers {sorted(paths)}")
    try:
        with torch.no_grad():
            for ids in batches:
                ids = ids.to(device)
                with Trace(model, trace_paths, retain_input=True, stop=True) as trace:
                    model(input_ids=ids, use_cache=False)
                for layer, path in paths.items():
                    keys = trace.inputs.get(path)
                    if keys is None or keys.numel() // keys.shape[-1] != ids.numel():
                        raise RuntimeError(f"{path} did not receive one key per token")
                    if layer not in sums:
                        sums[layer] = _GramSum(keys.shape[-1], dtype, keys.device)
                    sums[layer].add(keys)
                del trace
                count += ids.numel()
                bar.update(ids.numel())
    finally:
        bar.close()
        for module, training in modes.items():
            module.training = training
    if count == 0:
        raise ValueError(f"corpus {corpus.key!r} yielded no tokens")
    return {layer: total.full() for layer, total in sums.items()}, count


# ------------------------------------------------------------------------------------------ cache
def stats_cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir``, else ``$EDITLAB_CACHE/stats``, else ``~/.cache/editlab/stats``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("EDITLAB_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "editlab") / "stats"


def _tensor_digest(digest: Any, tensor: torch.Tensor) -> None:
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // _HASH_ELEMENTS)
    sample = flat[::step].contiguous().cpu()
    digest.update(f"{tuple(tensor.shape)}|{tensor.dtype}|".encode())
    digest.update(sample.view(torch.uint8).numpy().tobytes())


def model_identity(model: nn.Module) -> str:
    """``<name>-<hash>``: ``config._name_or_path`` (last component) and a 12-hex hash of the
    embedding and the first and last blocks' ``mlp_out`` weights (evenly strided samples)."""
    spec = arch_for(model)
    name = str(getattr(model.config, "_name_or_path", "") or model.config.model_type)
    digest = hashlib.sha256(f"{name}|{model.config.model_type}|".encode())
    last = spec.num_layers(model) - 1
    mlp_outs = [spec.module_path(model, "mlp_out", layer) for layer in (0, last)]
    for path in (spec.embeddings, *mlp_outs):
        _tensor_digest(digest, get_module(model, path).weight)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name.rstrip("/")).name or name)[:60]
    return f"{slug}-{digest.hexdigest()[:12]}"


_PROBE = "Probe: The Eiffel Tower (Paris) opened in 1889; naïve café, 東京, ελληνικά, x² ≤ 42."


def _tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of the vocabulary size, EOS id and the encoding of a fixed multilingual probe."""
    probe = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    text = json.dumps([type(tokenizer).__name__, len(tokenizer), tokenizer.eos_token_id, probe])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _cache_file(folder: Path, role: str, layer: int, key: dict[str, Any]) -> Path:
    corpus = re.sub(r"[^A-Za-z0-9._-]+", "_", key["corpus"])[:40]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return folder / f"{role}-L{layer}-{corpus}-{digest}.pt"


def _load(path: Path, key: dict[str, Any]) -> SecondMoment | None:
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        log.warning("unreadable stats cache file %s (%s); recomputing", path, err)
        return None
    if not isinstance(saved, dict) or saved.get("key") != json.dumps(key, sort_keys=True):
        log.warning("stats cache file %s holds another statistic; recomputing", path)
        return None
    return SecondMoment(mom2=saved["mom2"], count=int(saved["count"]), path=path)


def _save(path: Path, stat: SecondMoment, key: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            payload = {"mom2": stat.mom2, "count": stat.count, "key": json.dumps(key, sort_keys=True)}
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _cache_entries(model: nn.Module, tokenizer: PreTrainedTokenizerBase, layers: Sequence[int],
                   corpus: Corpus, role: str, n_tokens: int | None, max_seq_len: int, dtype: torch.dtype,
                   cache_dir: str | os.PathLike[str] | None):
    """The arguments of :func:`layer_stats` checked, and per layer its module path, cache key and
    cache file: ``(layers, paths, folder, keys, files)``."""
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, not {dtype}")
    if n_tokens is not None and n_tokens < 1:
        raise ValueError("n_tokens must be positive (or None for the whole corpus)")
    wanted = list(dict.fromkeys(int(layer) for layer in layers))
    if not wanted:
        raise ValueError("layer_stats needs at least one layer")
    if is_encoder_decoder(model):
        raise ValueError("layer_stats supports decoder-only models")
    spec = arch_for(model)
    count_layers = spec.num_layers(model)
    for layer in wanted:
        if not 0 <= layer < count_layers:
            raise ValueError(f"layer {layer} out of range: the model has {count_layers} blocks")
    paths = {layer: spec.module_path(model, role, layer) for layer in wanted}
    seq_len = effective_seq_len(model, max_seq_len)
    folder = stats_cache_root(cache_dir) / model_identity(model)
    base_key: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "model": folder.name,
        "tokenizer": _tokenizer_identity(tokenizer),
        "role": role,
        "corpus": corpus.key,
        "n_tokens": n_tokens,
        "max_seq_len": seq_len,
        "dtype": str(dtype).removeprefix("torch."),
    }
    keys = {layer: {**base_key, "layer": layer, "path": paths[layer]} for layer in wanted}
    files = {layer: _cache_file(folder, role, layer, keys[layer]) for layer in wanted}
    return wanted, paths, folder, keys, files


def _holds(path: Path, key: dict[str, Any]) -> bool:
    """Whether ``path`` is a readable cache file of the statistic ``key`` (its tensors are memory-mapped,
    not read)."""
    if not path.is_file():
        return False
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError):
        return False
    return isinstance(saved, dict) and saved.get("key") == json.dumps(key, sort_keys=True) and "mom2" in saved


# -------------------------------------------------------------------------------------------- API
def layer_stats(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    layers: Sequence[int],
    corpus: Corpus = WikipediaSample(),
    *,
    role: str = "mlp_out",
    n_tokens: int | None = None,
    max_seq_len: int = 256,
    batch_tokens: int = 4096,
    dtype: torch.dtype = torch.float64,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> dict[int, SecondMoment]:
    """``E[k kᵀ]`` of the inputs ``k`` of module ``role`` in each of ``layers`` (ROME's ``mom2``).

    Args:
        model, tokenizer: a decoder-only model in the architecture table; never modified.
        layers: block indices; all missing ones are computed in one forward pass over the corpus,
            stopped after the highest one.
        corpus: a :mod:`editlab.data.corpora` corpus: :class:`~editlab.data.corpora.WikipediaSample`
            (offline default), :class:`~editlab.data.corpora.TextFile` or
            :class:`~editlab.data.corpora.HFDataset`.
        role: the module whose inputs are the keys (``mlp_out``: the MLP key space).
        n_tokens: cap on the number of key vectors (None: the whole corpus).
        max_seq_len: packed row length (clipped to the model's positions).
        batch_tokens: tokens per forward batch (``batch_tokens // max_seq_len`` rows).
        dtype: precision of ``kᵀk`` per batch: float64 (exact sums) or float32 (ROME's default
            ``mom2_dtype``; faster); the running sum and ``mom2`` are float64 either way.
        cache_dir: cache root (default ``$EDITLAB_CACHE/stats`` or ``~/.cache/editlab/stats``).
        progress: show a tqdm bar of tokens.

    Returns:
        ``{layer: SecondMoment}`` in the order of ``layers``.
    """
    start = time.perf_counter()
    wanted, paths, folder, keys, files = _cache_entries(model, tokenizer, layers, corpus, role, n_tokens,
                                                        max_seq_len, dtype, cache_dir)
    seq_len = keys[wanted[0]]["max_seq_len"]
    result: dict[int, SecondMoment] = {}
    for layer in wanted:
        cached = _load(files[layer], keys[layer])
        if cached is not None:
            result[layer] = cached
    missing = [layer for layer in wanted if layer not in result]
    if result:
        log.info("layer_stats: layers %s loaded from %s in %.2f s", sorted(result), folder,
                 time.perf_counter() - start)
    if missing:
        # the pass can take many minutes on a CPU (once per model and layer): say so before it starts
        log.info("layer_stats: computing layers %s over %s (once; cached in %s)", missing, corpus.key, folder)
        begin = time.perf_counter()
        sums, count = _gather(
            model, tokenizer, {layer: paths[layer] for layer in missing}, corpus,
            n_tokens=n_tokens, seq_len=seq_len, batch_tokens=batch_tokens, dtype=dtype, progress=progress,
        )
        seconds = time.perf_counter() - begin
        log.info("layer_stats: layers %s over %d tokens of %s in %.1f s (%.0f tokens/s)",
                 missing, count, corpus.key, seconds, count / seconds)
        if n_tokens is not None and count < n_tokens:
            log.warning("corpus %s has only %d tokens (n_tokens=%d)", corpus.key, count, n_tokens)
        for layer in missing:
            stat = SecondMoment(mom2=(sums[layer] / count).cpu(), count=count, path=files[layer])
            _save(files[layer], stat, keys[layer])
            result[layer] = stat
    return {layer: result[layer] for layer in wanted}


def is_cached(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    layers: Sequence[int],
    corpus: Corpus = WikipediaSample(),
    *,
    role: str = "mlp_out",
    n_tokens: int | None = None,
    max_seq_len: int = 256,
    dtype: torch.dtype = torch.float64,
    cache_dir: str | os.PathLike[str] | None = None,
) -> bool:
    """Whether :func:`layer_stats` with these arguments would load every one of ``layers`` from the
    cache (no pass over the corpus).  Nothing is computed or written; the arguments are checked as
    :func:`layer_stats` checks them."""
    wanted, _, _, keys, files = _cache_entries(model, tokenizer, layers, corpus, role, n_tokens, max_seq_len,
                                               dtype, cache_dir)
    return all(_holds(files[layer], keys[layer]) for layer in wanted)
