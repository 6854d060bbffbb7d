"""Load a Hugging Face model and its tokenizer into a frozen :class:`ModelBundle`.

Every loader in editlab (hub / local directory here, packaged GGUF models in
:mod:`editlab.models.packaged`, tiny random models in :mod:`editlab.models.tiny`) returns a
:class:`ModelBundle` whose model is in eval mode with ``requires_grad`` off: the base model is
never trained, editors create their own trainable tensors.  All of them pass the tokenizer through
:func:`prepare_tokenizer`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from editlab.models.arch import is_encoder_decoder

__all__ = [
    "ModelBundle",
    "ModelLoadError",
    "from_pretrained",
    "prepare_tokenizer",
    "resolve_device",
    "local_rank",
    "resolve_dtype",
    "freeze",
]

log = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_TRUE = {"1", "on", "yes", "true"}


class ModelLoadError(OSError):
    """A model or tokenizer could not be loaded; the message says what to do about it."""


@dataclass
class ModelBundle:
    """A frozen model, its tokenizer, and the name it was loaded under."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str

    @property
    def model_type(self) -> str:
        return str(self.model.config.model_type)

    @property
    def device(self) -> torch.device:
        param = next(self.model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Make a tokenizer batch-ready, in place: right padding, and a pad token.

    Tokenizers without a pad token (GPT-2, GPT-J, Llama...) get ``pad_token = eos_token``.  Padded
    positions are always masked by the attention mask, so the choice of id does not change any
    result; but code that turns ``input_ids == pad_token_id`` into a mask would also hide real EOS
    tokens, so build masks from ``attention_mask``, never from the pad id.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{type(tokenizer).__name__} has neither a pad token nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """Put ``model`` in eval mode and turn off gradients of all its parameters (in place)."""
    model.eval()
    model.requires_grad_(False)
    return model


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """``"float32" | "bfloat16" | "float16" | "auto"`` (or a ``torch.dtype``) -> what HF accepts."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = dtype.lower().removeprefix("torch.")
    if key == "auto":
        return "auto"
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16, auto")
    return _DTYPES[key]


def local_rank() -> int:
    """This process's index on its node under a distributed launcher (Lightning's and torchrun's
    ``LOCAL_RANK``, SLURM's ``SLURM_LOCALID``), 0 otherwise."""
    for var in ("LOCAL_RANK", "SLURM_LOCALID"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


def resolve_device(device: str | torch.device) -> torch.device:
    """``"cpu" | "cuda" | "cuda:N" | "auto"`` -> a ``torch.device`` ("auto": cuda if available).

    ``"auto"`` and ``"cuda"`` (no index) name this process's GPU: ``cuda:<local rank>`` under a
    distributed launcher (:func:`local_rank`), so DDP processes do not all load onto GPU 0."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", local_rank() % torch.cuda.device_count())
    return resolved


def _looks_like_path(name: str) -> bool:
    """True for names that cannot be hub ids (``org/name``): absolute, ``./``, ``~``, deeper paths."""
    if name.startswith(("/", "./", "../", "~", ".\\", "..\\")) or "\\" in name or name in (".", ".."):
        return True
    return name.count("/") > 1


def _offline() -> bool:
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except ImportError:
        pass
    return any(os.environ.get(var, "").lower() in _TRUE for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_error(name: str, err: Exception) -> ModelLoadError:
    if _offline():
        hint = (
            f"HF_HUB_OFFLINE is set and {name!r} is not in the Hugging Face cache. Download it once "
            f"with internet (`hf download {name}`) or copy a cache in (HF_HOME), pass a local "
            "directory instead, or use a packaged offline model (editlab.models.packaged)."
        )
    else:
        hint = (
            f"{name!r} is neither an existing local directory nor a loadable Hugging Face Hub model "
            "(no network, a misspelt id, or a gated repository that needs `hf auth login`). Pass a "
            "local directory, or use a packaged offline model (editlab.models.packaged)."
        )
    return ModelLoadError(f"could not load {name!r}: {hint} Original error: {' '.join(str(err).split())}")


def from_pretrained(
    name_or_path: str,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    seq2seq: bool | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    gguf_file: str | None = None,
    cache_dir: str | None = None,
) -> ModelBundle:
    """Load a hub model (``"gpt2"``, ``"org/name"``) or a local directory as a frozen bundle.

    Args:
        name_or_path: hub id or local directory.
        dtype: ``float32`` | ``bfloat16`` | ``float16`` | ``auto`` (the checkpoint's own dtype).
        device: ``cpu`` | ``cuda`` | ``cuda:N`` | ``auto`` (cuda when available, else cpu).
        seq2seq: force encoder-decoder (True) or causal (False) loading; by default the config's
            ``is_encoder_decoder`` decides.
        revision, trust_remote_code, gguf_file, cache_dir: passed to Hugging Face.

    Raises:
        FileNotFoundError: ``name_or_path`` looks like a path but does not exist.
        ModelLoadError: a hub id could not be loaded (offline and not cached, no network, ...).
    """
    name = str(name_or_path)
    expanded = os.path.expanduser(name)
    local = Path(expanded).is_dir()
    if not local and (_looks_like_path(name) or Path(expanded).exists()):
        raise FileNotFoundError(
            f"model directory {name!r} does not exist (or is not a directory); give a directory "
            "written by save_pretrained, or a Hugging Face Hub id like 'gpt2' or 'org/name'"
        )
    source = expanded if local else name
    torch_dtype = resolve_dtype(dtype)
    target = resolve_device(device)
    hf_kwargs = {
        "revision": revision,
        "trust_remote_code": trust_remote_code,
        "cache_dir": cache_dir,
    }
    if gguf_file is not None:
        hf_kwargs["gguf_file"] = gguf_file

    try:
        config = AutoConfig.from_pretrained(source, **hf_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **hf_kwargs)
        seq2seq = is_encoder_decoder(config) if seq2seq is None else seq2seq
        auto_cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
        model = auto_cls.from_pretrained(source, config=config, dtype=torch_dtype, **hf_kwargs)
    except OSError as err:
        if local:
            raise
        raise _hub_error(name, err) from err

    model = freeze(model.to(target))
    prepare_tokenizer(tokenizer)
    log.info(
        "loaded %s (%s, %s, %s) on %s", name, config.model_type, type(model).__name__, model.dtype, target
    )
    return ModelBundle(model=model, tokenizer=tokenizer, name=name)
