"""Models: loading (hub, local, packaged offline GGUF, tiny random) and the architecture table."""

from editlab.models.arch import (
    ARCHITECTURES,
    ArchSpec,
    UnknownArchitecture,
    arch_for,
    get_module,
    get_parameter,
)
from editlab.models.loading import ModelBundle, ModelLoadError, from_pretrained, prepare_tokenizer
from editlab.models.packaged import (
    GEMMA3_270M,
    SMOLLM2_135M,
    PackagedGGUF,
    ensure_converted,
    gemma3_270m,
    load_packaged,
    smollm2_135m,
)
from editlab.models.tiny import tiny_model, tiny_tokenizer

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "UnknownArchitecture",
    "arch_for",
    "get_module",
    "get_parameter",
    "ModelBundle",
    "ModelLoadError",
    "from_pretrained",
    "prepare_tokenizer",
    "PackagedGGUF",
    "SMOLLM2_135M",
    "GEMMA3_270M",
    "ensure_converted",
    "load_packaged",
    "smollm2_135m",
    "gemma3_270m",
    "tiny_model",
    "tiny_tokenizer",
]
