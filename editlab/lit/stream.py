"""Stream checkpoints: an edit stream that survives a kill.

A sequential edit stream (``python -m editlab.train`` with a ``stream`` node) writes, every
``stream.checkpoint_every`` batches, a *stream checkpoint* into ``<run dir>/stream/``:
``batch_<NNNNNN>.pt``, named by the number of batches done, written to a temporary file and moved
into place (``os.replace``), after which the older ones are removed.  ``stream.resume=true``
continues the run from the latest one (``stream.resume=PATH``: a checkpoint file, or a folder
holding them).  It holds, as tensors and plain data only (read with
``torch.load(weights_only=True)``, so reading one runs no code):

* ``session``: the edit state of the :class:`~editlab.methods.base.WeightEditSession`: the summed
  deltas and the edited values of every touched parameter (the originals are the freshly loaded
  model's own weights), the added modules (patches) as ``(host path, class, constructor
  arguments, state dict)`` in attachment order, the memory (records as plain dicts) and a
  stateful editor's stream state (with the device of each of its tensors);
* ``loop``: the edit loop's state (:class:`~editlab.lit.edit_eval.EditEvalModule`): the
  torchmetrics states of every stage, the record rows and curve points so far, the records edited
  so far, general-ability values, timings, failures, and the pre-edit cache of the unedited model;
* ``rng``: the torch (and CUDA), numpy and Python random states;
* ``batches`` / ``rows``: batches done and record rows written; ``config``: the run's settings
  (:func:`editlab.train.run_fingerprint`), so a resume with other settings is refused.

A patch is rebuilt only when its class is one of editlab's patch classes (:func:`patch_classes`:
an ``nn.Module`` defined in a module of ``editlab.methods`` with a ``stream_args()`` method
returning its constructor's keyword arguments, as :class:`~editlab.methods.patches.FFNPatch`);
anything else in a checkpoint is refused with a :class:`~editlab.lit.checkpoint.CheckpointError`.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import os
import pkgutil
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchmetrics import MetricCollection

from editlab.data.records import EditRecord, Probe
from editlab.lit.checkpoint import CheckpointError, read_checkpoint
from editlab.methods.base import EditError, WeightEditSession
from editlab.models.arch import get_module

log = logging.getLogger(__name__)

__all__ = ["FORMAT", "STREAM_DIR", "checkpoint_path", "latest_checkpoint", "load_metric_states", "metric_states",
           "patch_classes", "read_stream_checkpoint", "record_from_dict", "record_to_dict", "reinstall_session",
           "resolve_resume", "rng_state", "session_snapshot", "set_rng_state", "write_stream_checkpoint"]

FORMAT = "editlab-stream-checkpoint/1"
STREAM_DIR = "stream"
_NAME = re.compile(r"^batch_(\d+)\.pt$")


# ------------------------------------------------------------------------------- plain data
def check_plain(value: Any, where: str) -> None:
    """Raise TypeError unless ``value`` is tensors and plain data (None, bools, numbers, strings,
    lists, tuples and dicts of them with string or int keys): what ``weights_only`` reads back."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: a stream checkpoint holds dicts with string or int keys, got key {key!r}")
            check_plain(item, f"{where}[{key!r}]")
        return
    raise TypeError(f"{where} is a {type(value).__name__}: a stream checkpoint holds tensors and plain data only "
                    "(None, bools, numbers, strings, lists, tuples, dicts)")


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors of a plain-data tree, in a fixed (depth-first) order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    return []


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, list):
        return [_map_tensors(item, fn) for item in value]
    if isinstance(value, tuple):
        return tuple(_map_tensors(item, fn) for item in value)
    if isinstance(value, dict):
        return {key: _map_tensors(item, fn) for key, item in value.items()}
    return value


# ---------------------------------------------------------------------------------- records
def record_to_dict(record: EditRecord) -> dict[str, Any]:
    """An :class:`EditRecord` as plain data (probes as dicts, tuples as lists)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        if f.name in ("locality", "portability"):
            value = [{"prompt": p.prompt, "target": p.target, "group": p.group, "aliases": list(p.aliases)}
                     for p in value]
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    check_plain(out["extra"], f"record {record.record_id!r}: extra")
    return out


def record_from_dict(data: dict[str, Any]) -> EditRecord:
    """The :class:`EditRecord` :func:`record_to_dict` wrote (checked again by its constructor)."""
    fields = {f.name for f in dataclasses.fields(EditRecord)}
    unknown = set(data) - fields
    if unknown:
        raise CheckpointError(f"a stored record has unknown fields {sorted(unknown)}")
    kwargs = dict(data)
    for name in ("locality", "portability"):
        kwargs[name] = tuple(Probe(p["prompt"], p["target"], p.get("group", ""), tuple(p.get("aliases", ())))
                             for p in kwargs.get(name, ()))
    for name in ("rephrase_prompts", "neighborhood_prompts", "attribute_prompts", "generation_prompts"):
        kwargs[name] = tuple(kwargs.get(name, ()))
    kwargs["extra"] = dict(kwargs.get("extra") or {})
    return EditRecord(**kwargs)


# ---------------------------------------------------------------------------------- patches
def patch_classes() -> dict[str, type[nn.Module]]:
    """editlab's patch classes by dotted name: every ``nn.Module`` subclass defined in a module of
    ``editlab.methods`` that has a ``stream_args`` method.  Only these are rebuilt from a checkpoint.
    A class whose constructor takes ``host`` (an adapter that reads its host module's weights) is
    given the module at the patch's path; ``stream_args`` leaves it out."""
    import editlab.methods as methods

    found: dict[str, type[nn.Module]] = {}
    for info in pkgutil.iter_modules(methods.__path__):
        module = importlib.import_module(f"editlab.methods.{info.name}")
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, nn.Module) and obj.__module__ == module.__name__
                    and callable(getattr(obj, "stream_args", None))):
                found[f"{module.__name__}.{name}"] = obj
    return found


def _save_patch(path: str, patch: nn.Module) -> dict[str, Any]:
    cls = type(patch)
    dotted = f"{cls.__module__}.{cls.__qualname__}"
    if dotted not in patch_classes():
        raise TypeError(f"the patch at {path!r} is a {dotted}, which a stream checkpoint cannot rebuild: a patch "
                        "class needs a stream_args() method returning its constructor's keyword arguments and must "
                        "be defined in a module of editlab.methods")
    args = dict(patch.stream_args())
    check_plain(args, f"{dotted}.stream_args()")
    return {"host": path, "class": dotted, "args": args, "state": dict(patch.state_dict())}


def _build_patch(entry: dict[str, Any], source: Path, device: torch.device,
                 model: nn.Module) -> tuple[str, nn.Module]:
    classes = patch_classes()
    dotted = entry.get("class")
    if dotted not in classes:
        raise CheckpointError(f"{source}: refused patch class {dotted!r}: a stream checkpoint may only rebuild "
                              f"editlab's patch classes ({', '.join(sorted(classes))})")
    cls = classes[dotted]
    args = entry.get("args")
    params = inspect.signature(cls.__init__).parameters
    if not isinstance(args, dict) or any(not isinstance(k, str) or k not in params or k == "self" for k in args):
        raise CheckpointError(f"{source}: the stored arguments of a {dotted} are not its constructor's: "
                              f"{sorted(args) if isinstance(args, dict) else args!r}")
    if "host" in params and "host" not in args:
        # a patch that reads its host module (GRACE's, WISE's adapters) gets the module at its path
        try:
            args = {**args, "host": get_module(model, str(entry.get("host")))}
        except (AttributeError, IndexError, KeyError) as err:
            raise CheckpointError(f"{source}: the {dotted} sits at {entry.get('host')!r}, which this model lacks") from err
    try:
        patch = cls(**args)
        patch.load_state_dict(entry["state"])
    except (TypeError, ValueError, RuntimeError, KeyError) as err:
        raise CheckpointError(f"{source}: cannot rebuild the {dotted} at {entry.get('host')!r}: {err}") from err
    return str(entry["host"]), patch.to(device)


# ---------------------------------------------------------------------------------- session
def session_snapshot(session: WeightEditSession) -> dict[str, Any]:
    """The session's edit state as tensors and plain data (see the module docstring)."""
    named = dict(session.model.named_parameters())
    state = session.stream_state
    check_plain(state, "the editor's stream state")
    return {
        "deltas": {name: delta.detach().cpu() for name, delta in session.deltas.items()},
        "weights": {name: named[name].detach().cpu().clone() for name in session.touched},
        "patches": [_save_patch(path, patch) for path, patch in session.installed_patches],
        "memory": [record_to_dict(r) for r in session.memory],
        "state": _map_tensors(state, lambda t: t.detach().cpu()),
        "state_devices": [str(t.device) for t in _tensors(state)],
    }


def _device(name: str, fallback: torch.device) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        return fallback
    return device


def reinstall_session(session: WeightEditSession, snapshot: dict[str, Any], editor: Any, tokenizer: Any,
                      source: Path) -> None:
    """Put ``snapshot`` (:func:`session_snapshot`) back on ``session`` (an unedited model):
    through :meth:`WeightEditSession.reinstall`.  A memory's wrapper comes from ``editor``: its
    ``compute_edit`` on the stored memory (IKE, SERAC: the records as memory and the wrapper)."""
    device = next(session.model.parameters()).device
    memory = [record_from_dict(r) for r in snapshot["memory"]]
    wrap = None
    if memory:
        if editor is None:
            raise CheckpointError(f"{source}: the stream holds a memory, but this run has no editor to wrap the "
                                  "model with it")
        wrap = editor.compute_edit(session.model, tokenizer, memory).wrap
    patches = [_build_patch(entry, source, device, session.model) for entry in snapshot["patches"]]
    devices = iter(snapshot.get("state_devices", []))
    state = _map_tensors(snapshot["state"], lambda t: t.to(_device(next(devices, str(device)), device)))
    try:
        session.reinstall(snapshot["deltas"], snapshot["weights"], patches, memory, wrap, state)
    except EditError as err:
        raise CheckpointError(f"{source}: the stream's edits do not fit this model: {err}") from err


# -------------------------------------------------------------------------------------- rng
def rng_state() -> dict[str, Any]:
    """The torch (CPU and every CUDA device), numpy and Python random states."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": list(_lists(random.getstate())),
    }


def _lists(value: Any) -> Any:
    return [_lists(v) for v in value] if isinstance(value, (list, tuple)) else value


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(_tuples(state["python"]))


# ---------------------------------------------------------------------------------- metrics
def metric_states(collection: MetricCollection) -> dict[str, Any]:
    """Every member's torchmetrics state (tensors, or lists of tensors) and update count."""
    out = {}
    for name, metric in collection.items(keep_base=True):
        states = {key: (value.detach().cpu().clone() if isinstance(value, torch.Tensor)
                        else [v.detach().cpu().clone() for v in value])
                  for key, value in metric.metric_state.items()}
        out[str(name)] = {"states": states, "updates": int(metric._update_count)}
    return out


def load_metric_states(collection: MetricCollection, saved: dict[str, Any], source: Path) -> None:
    members = dict(collection.items(keep_base=True))
    if set(members) != set(saved):
        raise CheckpointError(f"{source}: the stream was scored with other metrics ({sorted(saved)}) than this run "
                              f"({sorted(members)}): resume with the run's scoring settings")
    for name, metric in members.items():
        for key, value in saved[name]["states"].items():
            current = getattr(metric, key)
            if isinstance(current, torch.Tensor):
                value = value.to(device=current.device, dtype=current.dtype)
            else:
                value = [v.to(metric.device) for v in value]
            setattr(metric, key, value)
        metric._update_count = int(saved[name]["updates"])
        metric._computed = None


# ------------------------------------------------------------------------------------ files
def checkpoint_path(folder: Path, batches: int) -> Path:
    return Path(folder) / f"batch_{batches:06d}.pt"


def write_stream_checkpoint(checkpoint: dict[str, Any], folder: Path) -> Path:
    """Write ``checkpoint`` atomically as ``folder/batch_<batches>.pt`` and remove the older ones."""
    check_plain(checkpoint, "the stream checkpoint")  # what weights_only could not read back is refused now
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(folder, int(checkpoint["batches"]))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(checkpoint, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    for old in folder.iterdir():
        if old != path and _NAME.match(old.name):
            old.unlink(missing_ok=True)
    return path


def latest_checkpoint(folder: Path) -> Path | None:
    """The stream checkpoint of ``folder`` with the most batches done, or None."""
    folder = Path(folder)
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))] if folder.is_dir() else []
    return max(found)[1] if found else None


def resolve_resume(value: Any, output_dir: str | Path) -> Path:
    """The checkpoint ``stream.resume`` names: ``true`` → the latest in ``<output_dir>/stream/``;
    a path → that file, or the latest in that folder (a run folder or its ``stream/``)."""
    if value is True:
        where = Path(output_dir) / STREAM_DIR
        found = latest_checkpoint(where)
        if found is None:
            raise FileNotFoundError(f"no stream checkpoint in {where}: stream.resume=true continues the stream of "
                                    "the run folder given by hydra.run.dir=<run folder>")
        return found
    path = Path(str(value)).expanduser()
    if path.is_file():
        return path
    for folder in (path / STREAM_DIR, path):
        found = latest_checkpoint(folder)
        if found is not None:
            return found
    raise FileNotFoundError(f"{path}: neither a stream checkpoint nor a folder holding one")


def read_stream_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """A stream checkpoint, read with ``weights_only=True``; a CheckpointError names the file when
    it is something else."""
    checkpoint = read_checkpoint(path, mmap=mmap)
    if checkpoint.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a stream checkpoint ({FORMAT})")
    for key in ("batches", "rows", "session", "loop", "rng"):
        if key not in checkpoint:
            raise CheckpointError(f"{path}: the stream checkpoint has no {key!r}")
    return checkpoint
