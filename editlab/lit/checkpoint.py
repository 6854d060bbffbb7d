"""Reading editor checkpoints, and rebuilding a trained editor from one without running its code.

A checkpoint written by :class:`~editlab.lit.editor_train.EditorTrainModule` holds the editor's
tensors, the name of its base model and the editor's config (``checkpoint["editor"]["config"]``,
``_target_`` + keyword arguments).  Every read uses ``torch.load(weights_only=True)``: tensors
and plain data only, no pickled objects.

The stored config is data from a file that may come from anyone, so it is *not* handed to
``hydra.utils.instantiate``, which would call whatever ``_target_`` names (``builtins.open``,
``pathlib.Path.write_text``, ...).  :func:`editor_spec` checks it first, calling nothing:

* the top-level ``_target_`` must be one of editlab's trained editor classes (a subclass of
  :class:`~editlab.methods.hyper.LearnedEditor` defined in a module of ``editlab.methods``);
* every other key must be an argument the class's constructor declares;
* values are plain data (``None``, bools, numbers, strings, lists and dicts of them), except a
  nested ``_target_`` that is one of :data:`NESTED_BUILDERS` (editlab's model and encoder loaders,
  with the arguments listed there: none of them can write outside editlab's cache or run a
  model's remote code), optionally with ``_partial_: true``;
* nothing else that Hydra would interpret (``_args_``, ``_recursive_``, ``_convert_``,
  interpolations) is given a meaning: keys starting with ``_`` are refused, strings are passed
  as they are.

Only then does :func:`build_editor` call the class (and the nested builders) itself.  Anything
else is refused with a :class:`CheckpointError` naming the checkpoint and the offending key.
A file that cannot be read (truncated, corrupt, a pickle payload) is a :class:`CheckpointError`
naming the file too.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import pickle
import pkgutil
import zipfile
from pathlib import Path
from typing import Any

import torch

from editlab.errors import UserError
from editlab.methods.hyper import LearnedEditor
from editlab.models.loading import ModelBundle

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointError", "NESTED_BUILDERS", "read_checkpoint", "read_editor_checkpoint", "training_order",
    "editor_state", "check_base_model", "editor_spec", "build_editor", "check_editor_checkpoint", "load_editor",
    "trained_editor_classes", "EDITOR_PREFIX",
]

EDITOR_PREFIX = "editor."

NESTED_BUILDERS: dict[str, tuple[str, ...]] = {
    # SERAC's counterfactual model as a packaged model (converted into editlab's own cache)
    "editlab.models.packaged.smollm2_135m": ("dtype", "device"),
    "editlab.models.packaged.gemma3_270m": ("dtype", "device"),
    # a hub id or local folder, never with trust_remote_code
    "editlab.models.loading.from_pretrained": ("name_or_path", "dtype", "device", "seq2seq", "revision"),
    # SERAC's sentence encoder
    "editlab.models.encoder.SentenceEncoder.from_pretrained": ("name_or_path", "device", "max_length"),
    "editlab.models.encoder.SentenceEncoder.tiny": ("seed", "hidden_size"),  # a small random encoder (tests)
}
"""The callables a checkpoint's config may name below the editor, with the arguments it may pass."""

_MAX_DEPTH = 16


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read, or whose stored config may not be built."""


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

def read_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``, with a :class:`CheckpointError` naming the file
    when it is missing, truncated or corrupt, or holds pickled objects (which could run code)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() or "weights_only" in str(err):
            raise CheckpointError(
                f"{path}: refused: the checkpoint holds pickled objects, not only tensors and plain data "
                "(loading them could run code); editlab checkpoints never do") from err
        raise CheckpointError(f"{path}: cannot read the checkpoint: the file is truncated or corrupt ({err})") from err
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile, KeyError, IndexError) as err:
        raise CheckpointError(f"{path}: cannot read the checkpoint: the file is truncated or corrupt "
                              f"({type(err).__name__}: {err})") from err
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: not a checkpoint: it holds a {type(checkpoint).__name__}, not a dict")
    return checkpoint


def read_editor_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint written by :class:`~editlab.lit.editor_train.EditorTrainModule`."""
    checkpoint = read_checkpoint(path, mmap=mmap)
    if not isinstance(checkpoint.get("editor"), dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{path} is not an editor checkpoint (written by python -m editlab.train): "
                              "it has no 'editor' and 'state_dict' sections")
    return checkpoint


def training_order(path: str | Path) -> dict[str, int] | None:
    """Where checkpoint ``path``'s run was in its training order (``seed``, ``epoch`` and
    ``batches`` served, as :class:`~editlab.data.datamodule.ResumableDataLoader` saves them), or
    None when the checkpoint does not record it.  Reads the file memory-mapped."""
    checkpoint = read_checkpoint(path, mmap=True)
    loops = checkpoint.get("loops")
    loaders = None
    if isinstance(loops, dict):
        loaders = loops.get("fit_loop", {}).get("state_dict", {}).get("combined_loader")
    if not loaders or not isinstance(loaders[0], dict) or not {"seed", "epoch", "batches"} <= set(loaders[0]):
        return None
    return {k: int(loaders[0][k]) for k in ("seed", "epoch", "batches")}


def editor_state(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The editor's own state dict from a checkpoint."""
    state = checkpoint["state_dict"]
    return {k[len(EDITOR_PREFIX):]: v for k, v in state.items() if k.startswith(EDITOR_PREFIX)}


def check_base_model(checkpoint: dict[str, Any], name: str) -> None:
    """Refuse a checkpoint trained for another base model than ``name``."""
    trained_for = checkpoint.get("editor", {}).get("base_model")
    if trained_for is not None and trained_for != name:
        raise CheckpointError(f"the editor checkpoint was trained for base model {trained_for!r}, not {name!r}; "
                              f"load {trained_for!r} (model=...) to use it")


# --------------------------------------------------------------------------------------------
# Rebuilding the editor from the stored config, calling nothing it names until it is checked
# --------------------------------------------------------------------------------------------

def trained_editor_classes() -> dict[str, type[LearnedEditor]]:
    """editlab's trained editor classes by dotted name (every :class:`LearnedEditor` subclass
    defined in a module of ``editlab.methods``)."""
    import editlab.methods as methods

    found: dict[str, type[LearnedEditor]] = {}
    for info in pkgutil.iter_modules(methods.__path__):
        module = importlib.import_module(f"editlab.methods.{info.name}")
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, LearnedEditor) and obj.__module__ == module.__name__
                    and not inspect.isabstract(obj) and obj.__init__ is not LearnedEditor.__init__):
                found[f"{module.__name__}.{name}"] = obj
    return found


def _editor_class(target: Any, where: str) -> type[LearnedEditor]:
    classes = trained_editor_classes()
    if isinstance(target, str) and target in classes:
        return classes[target]
    raise CheckpointError(f"{where}: refused _target_ {target!r}: a checkpoint may only build one of editlab's "
                          f"trained editors ({', '.join(sorted(classes))})")


def _declared(cls: type, where: str) -> set[str]:
    params = inspect.signature(cls.__init__).parameters
    return {n for n, p in params.items() if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _check_value(value: Any, where: str, depth: int = 0) -> None:
    """Plain data, or a nested builder of :data:`NESTED_BUILDERS` with its declared arguments."""
    if depth > _MAX_DEPTH:
        raise CheckpointError(f"{where}: refused: nested deeper than {_MAX_DEPTH} levels")
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_value(item, f"{where}[{i}]", depth + 1)
        return
    if isinstance(value, dict):
        if "_target_" in value:
            target = value["_target_"]
            if not isinstance(target, str) or target not in NESTED_BUILDERS:
                raise CheckpointError(f"{where}: refused _target_ {target!r}: below the editor a checkpoint may only "
                                      f"name editlab's model loaders ({', '.join(sorted(NESTED_BUILDERS))})")
            allowed = set(NESTED_BUILDERS[target])
            for key, item in value.items():
                if key == "_target_":
                    continue
                if key == "_partial_":
                    if not isinstance(item, bool):
                        raise CheckpointError(f"{where}._partial_: refused: must be true or false, got {item!r}")
                    continue
                if key not in allowed:
                    raise CheckpointError(f"{where}.{key}: refused: {target} may only be given "
                                          f"{', '.join(sorted(allowed))} from a checkpoint")
                _check_value(item, f"{where}.{key}", depth + 1)
            return
        for key, item in value.items():
            if not isinstance(key, str) or key.startswith("_"):
                raise CheckpointError(f"{where}: refused key {key!r}")
            _check_value(item, f"{where}.{key}", depth + 1)
        return
    raise CheckpointError(f"{where}: refused: a {type(value).__name__} is not plain data")


def editor_spec(config: Any, source: str | Path) -> tuple[type[LearnedEditor], dict[str, Any]]:
    """The editor class and keyword arguments a checkpoint's stored ``config`` asks for, checked as
    the module docstring says; nothing is called.  ``source`` names the checkpoint in errors."""
    where = f"{source}: editor.config"
    if not isinstance(config, dict) or not config:
        raise CheckpointError(f"{where}: the checkpoint stores no editor config; pass the editor to load into")
    cls = _editor_class(config.get("_target_"), f"{where}._target_")
    declared = _declared(cls, where)
    kwargs: dict[str, Any] = {}
    for key, value in config.items():
        if key == "_target_":
            continue
        if not isinstance(key, str) or key not in declared:
            raise CheckpointError(f"{where}.{key}: refused: {cls.__name__} declares no argument {key!r}")
        _check_value(value, f"{where}.{key}")
        kwargs[key] = value
    return cls, kwargs


def _resolve(dotted: str) -> Any:
    module_name, _, rest = dotted.rpartition(".")
    parts = [rest]
    while module_name:  # e.g. editlab.models.encoder.SentenceEncoder.from_pretrained
        try:
            obj = importlib.import_module(module_name)
            break
        except ModuleNotFoundError:
            module_name, _, last = module_name.rpartition(".")
            parts.insert(0, last)
    for part in parts:
        obj = getattr(obj, part)
    return obj


def _build(value: Any) -> Any:
    """Build a value :func:`_check_value` accepted: nested builders are called (or made partial)."""
    if isinstance(value, list):
        return [_build(v) for v in value]
    if isinstance(value, dict):
        if "_target_" in value:
            fn = _resolve(value["_target_"])
            kwargs = {k: _build(v) for k, v in value.items() if k not in ("_target_", "_partial_")}
            return functools.partial(fn, **kwargs) if value.get("_partial_") else fn(**kwargs)
        return {k: _build(v) for k, v in value.items()}
    return value


def build_editor(config: Any, source: str | Path) -> LearnedEditor:
    """The editor a checkpoint's stored config describes, built once :func:`editor_spec` has
    accepted it (see the module docstring)."""
    cls, kwargs = editor_spec(config, source)
    return cls(**{k: _build(v) for k, v in kwargs.items()})


def check_editor_checkpoint(path: str | Path) -> None:
    """Read ``path`` (memory-mapped) and check its stored editor config, without building anything
    or loading a model: what ``ckpt_path=`` is checked with before the model loads."""
    checkpoint = read_editor_checkpoint(path, mmap=True)
    editor_spec(checkpoint["editor"].get("config"), path)


def load_editor(path: str | Path, model: ModelBundle, editor: LearnedEditor | None = None) -> LearnedEditor:
    """The trained editor of checkpoint ``path``, bound to ``model`` (which must be the base model
    the checkpoint names), on the model's device, in eval mode.

    ``editor``: an untrained editor to load the weights into; None builds it from the config stored
    in the checkpoint, checked first (:func:`build_editor`).
    """
    checkpoint = read_editor_checkpoint(path)
    check_base_model(checkpoint, model.name)
    info = checkpoint["editor"]
    if editor is None:
        editor = build_editor(info.get("config"), path)
    editor.bind(model.model, model.tokenizer)
    try:
        editor.load_state_dict(editor_state(checkpoint))
    except RuntimeError as err:
        raise CheckpointError(f"{path}: its editor weights do not fit {type(editor).__name__} "
                              f"as configured: {err}") from err
    if editor.base_model is None:
        editor.base_model = info.get("base_model")
    editor.to(model.device)
    editor.eval()
    log.info("loaded %s trained for %s from %s", type(editor).__name__, info.get("base_model"), path)
    return editor
