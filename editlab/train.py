"""Hydra entry point: ``python -m editlab.train experiment=ft_smollm2_counterfact``.

Composes ``editlab/configs/train.yaml`` (shipped in the package; ``hydra.searchpath`` adds a user's
folder), builds everything by ``_target_``, and runs the edit loop (``trainer.test``) with the
configured editor as a callback.  Prints (logs) the summary table and writes results under the
Hydra run directory in ``<paths.root_dir>/experiments/``: the resolved config as
``config.yaml`` there (the console gets one line naming the run folder).

What a user can get wrong is checked before the model loads (which takes minutes on a fresh cache):
the settings, the records of every split the run reads (:class:`~editlab.data.records.RecordError`
names the file, record and field) and the editor's arguments, named by their config key
(``method.lr must be > 0, got -1.0``: editors raise :class:`~editlab.errors.SettingError` under
their argument's name).  Such errors are printed as one line, ``error: ...``, without a traceback,
and the exit status is 1; ``HYDRA_FULL_ERROR=1`` shows the traceback.

Trainable editors (MEND, KE, SERAC): experiments that select a ``fit`` config (a training preset,
``override /fit: mend/smollm2_135m``, or the generic ``fit: editor``)
first train the editor (``trainer.fit`` with the ``fit.module`` LightningModule, the ``fit.callbacks``
and ``trainer`` updated with ``fit.trainer``), then test it in the same edit loop, with the best
checkpoint's weights (``fit.test_weights=best``) or the last ones.  ``ckpt_path=PATH`` skips
training and tests the editor saved in PATH (rebuilt from the config stored in it);
``fit.resume_from=PATH`` resumes an interrupted training run; ``fit.init_from=PATH`` starts a new run
from the editor weights saved in PATH (fresh optimizer and step count, this run's settings: e.g. a
lower learning rate for a trained editor, which a resume would not apply).  Whether fitting happens
is decided by the presence of the ``fit`` node alone, never by the method's name.

Edit streams (lifelong editing): ``stream.edits=N stream.batch_size=B stream.eval_every=K`` is
shorthand for the settings it implies (:func:`apply_stream`): the first N test records
(``data.test.limit``) in batches of B (``data.batch_size``), edits accumulating
(``edit.sequential``), every edited record scored after the whole stream
(``module.score_after_stream``) and, every K batches, all records edited so far
(``module.eval_every``: ``curves.csv`` / ``curves.png``).  A stream writes a stream checkpoint
(:mod:`editlab.lit.stream`) every ``stream.checkpoint_every`` batches; ``stream.resume=true
hydra.run.dir=<run folder>`` continues a killed stream from its latest one.  A stream is one model's history: a
sequential run on more than one process (``trainer.devices`` x ``trainer.num_nodes``) is refused.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from editlab.entry import settings_of, user_error
from editlab.errors import SettingError
from editlab.evaluation.scorer import ScoringSettings
from editlab.lit.callbacks import EditorCallback, refuse_split_stream
from editlab.lit.checkpoint import check_editor_checkpoint, load_editor, read_editor_checkpoint, training_order
from editlab.lit.results import format_summary
from editlab.lit.stream import read_stream_checkpoint, resolve_resume
from editlab.models.arch import arch_for

log = logging.getLogger(__name__)


def _instantiate_group(group: DictConfig | None) -> list:
    """Instantiate every entry of a config group dict (callbacks, loggers) that has a ``_target_``."""
    if not group:
        return []
    return [hydra.utils.instantiate(node) for node in group.values() if node is not None and "_target_" in node]


def _container(node: DictConfig | None) -> dict:
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


def fit_editor(cfg: DictConfig, bundle, editor, datamodule, loggers: list):
    """Train ``editor`` as ``cfg.fit`` says; return the editor holding the weights to test."""
    fit = cfg.fit
    # called here, not by Hydra: editor_config is a `_target_` config to keep (in checkpoints), not to build
    make_module = hydra.utils.instantiate(fit.module, _partial_=True)
    module = make_module(model=bundle, editor=editor, editor_config=_container(cfg.method))
    callbacks = _instantiate_group(fit.get("callbacks"))
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                                 **_container(fit.get("trainer")))
    resume, init = fit.get("resume_from"), fit.get("init_from")
    if resume:
        log.info("resuming editor training from %s", resume)
    if init:
        # weights (and buffers) only: a fresh optimizer with this run's learning rates, step 0
        log.info("starting editor training from the editor weights of %s", init)
        module.load_editor_weights(init)
        _warn_repeated_order(init, datamodule)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume or None)
    checkpoint = next((c for c in trainer.checkpoint_callbacks if c.monitor), None)  # not checkpoint_last
    best = checkpoint.best_model_path if checkpoint is not None else ""
    if fit.get("test_weights", "best") == "best" and best:
        score = checkpoint.best_model_score
        log.info("testing the best checkpoint's editor: %s (%s = %s)", best, checkpoint.monitor,
                 f"{float(score):.4f}" if score is not None else "n/a")
        module.load_editor_weights(best)
    else:
        log.info("testing the editor as training left it")
    return module.editor


def _warn_repeated_order(init: str, datamodule) -> None:
    """A run started with ``fit.init_from`` begins its training order at its first record; when
    the source run used the same order (seed), the new run first re-reads records the editor was
    already trained on.  Say so."""
    order = training_order(init)
    seed = getattr(datamodule, "seed", None)
    if order is None or seed is None or order["seed"] != seed:
        return
    log.warning("%s was trained on this run's training order (seed %d) up to batch %d of epoch %d; this "
                "run starts that order from its first record again, so it re-reads those records first. "
                "Pass another seed= to train on other records first.", init, seed, order["batches"],
                order["epoch"])


def build_editor(cfg: DictConfig):
    """The configured editor, built before the model (editors take the model when they edit), or
    None: no ``method``, or ``ckpt_path`` (that editor is rebuilt from its checkpoint, which needs
    the model: :func:`finish_editor`).  Bad constructor arguments are named by their config key."""
    if cfg.get("ckpt_path") or cfg.get("method") is None:
        return None
    with settings_of("method"):
        return hydra.utils.instantiate(cfg.method)


def check_scoring(cfg: DictConfig) -> ScoringSettings | None:
    """Build ``module.scoring`` once before the model loads, so a bad scoring setting is named by its
    config key (``module.scoring.generation_margin must be >= 0``) at no cost; return it (None when
    the module has no scoring node).  The judge is left out here: a judge node may load a model; it
    is built with the module."""
    node = OmegaConf.select(cfg, "module.scoring")
    if not OmegaConf.is_dict(node) or "_target_" not in node:
        return None
    probe = OmegaConf.create(OmegaConf.to_container(node, resolve=True))
    if "judge" in probe:
        probe.judge = None
    with settings_of("module.scoring"):
        return hydra.utils.instantiate(probe)


def check_lengths(datamodule, bundle, scoring: ScoringSettings | None) -> None:
    """Refuse, before anything is trained or edited, a record of any loaded split with a text
    longer than the model takes (a RecordError naming the record, the field and the lengths)."""
    scoring = scoring if isinstance(scoring, ScoringSettings) else ScoringSettings()
    limit = arch_for(bundle.model).max_positions(bundle.model)
    for dataset in datamodule.datasets.values():
        scoring.check_lengths(dataset.records, bundle.tokenizer, limit, model_name=bundle.name or "the model")


def finish_editor(cfg: DictConfig, editor, bundle, datamodule, loggers: list):
    """The editor to test: the one saved in ``ckpt_path``, ``editor`` trained here (``fit``), or
    ``editor`` as built."""
    if cfg.get("ckpt_path"):
        # the editor is rebuilt from the config stored with its weights; cfg.method is not used
        return load_editor(cfg.ckpt_path, bundle)
    if editor is not None and cfg.get("fit") is not None:
        editor = fit_editor(cfg, bundle, editor, datamodule, loggers)
    return editor


STREAM_KEYS = ("edits", "batch_size", "eval_every", "eval_sample", "sample_only", "checkpoint_every", "resume")
CHECKPOINT_EVERY = 10
"""Batches between stream checkpoints of a stream without ``eval_every`` (``stream.checkpoint_every=null``)."""


def apply_stream(cfg: DictConfig) -> None:
    """Expand a ``stream`` node (any field set) into the data / edit / module settings it stands for.

    ``edits`` → ``data.test.limit``, ``batch_size`` → ``data.batch_size`` (unset: the data config's
    own values), ``edit.sequential=true``, ``module.score_after_stream=true``, ``eval_every`` →
    ``module.eval_every`` (unset: no curves), ``eval_sample`` → ``module.eval_sample`` (unset: every
    record edited so far at each curve point), ``sample_only`` → ``module.sample_only`` (true: only
    the ``eval_sample`` records are ever scored, before, after their edit and after the stream),
    ``checkpoint_every`` → ``module.checkpoint_every``
    (null: at every curve point, ``eval_every``, or every :data:`CHECKPOINT_EVERY` batches without
    curves; 0: no stream checkpoints) and ``resume`` (true: the latest stream checkpoint of this
    run folder, ``paths.output_dir``; a path: that checkpoint, or the latest in that folder) →
    ``module.resume_from``.  Those settings are overwritten, so the stream node is the one place a
    stream is described.
    """
    stream = cfg.get("stream")
    if not stream or all(v is None or v is False for v in stream.values()):
        return
    unknown = set(stream) - set(STREAM_KEYS)
    if unknown:
        raise SettingError("stream", f"has unknown settings {sorted(unknown)}: use {', '.join(STREAM_KEYS)}")
    for key in ("edits", "batch_size", "eval_every", "eval_sample"):
        value = stream.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise SettingError(f"stream.{key}", "must be a positive integer or null", value)
    sample_only = stream.get("sample_only")
    if sample_only is not None and not isinstance(sample_only, bool):
        raise SettingError("stream.sample_only", "must be true or false", sample_only)
    if sample_only and stream.get("eval_sample") is None:
        raise SettingError("stream.sample_only", "scores the eval_sample records only: set stream.eval_sample too")
    every = stream.get("checkpoint_every")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 0):
        raise SettingError("stream.checkpoint_every", "must be an integer >= 0 (0: no stream checkpoints) or null",
                           every)
    if every is None:
        every = stream.get("eval_every") or CHECKPOINT_EVERY
    resume = stream.get("resume")
    if resume is not None and not isinstance(resume, (bool, str)):
        raise SettingError("stream.resume", "must be true, false or the path of a stream checkpoint", resume)
    if resume:
        try:
            resume = str(resolve_resume(resume, cfg.paths.output_dir))
        except FileNotFoundError as err:
            raise SettingError("stream.resume", str(err)) from None
    with open_dict(cfg):
        if stream.get("edits") is not None:
            cfg.data.test.limit = stream.edits
        if stream.get("batch_size") is not None:
            cfg.data.batch_size = stream.batch_size
        cfg.edit.sequential = True
        cfg.module.score_after_stream = True
        cfg.module.eval_every = stream.get("eval_every")
        cfg.module.eval_sample = stream.get("eval_sample")
        cfg.module.sample_only = bool(sample_only)
        cfg.module.checkpoint_every = every
        cfg.module.resume_from = resume or None
    log.info("edit stream: %s edits in batches of %s, sequential, scored after the stream%s%s",
             cfg.data.test.get("limit"), cfg.data.get("batch_size"),
             f", curves every {cfg.module.eval_every} batches" if cfg.module.eval_every else "",
             f", checkpoints every {every} batches" if every else "")


_VOLATILE = {"output_dir", "data_dir", "cache_dir", "checkpoint_every", "resume_from"}


def run_fingerprint(cfg: DictConfig) -> dict[str, Any]:
    """The settings a stream's results depend on (resolved; folders and checkpoint settings left
    out): stored in its stream checkpoints, compared when it is resumed."""
    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in _VOLATILE}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    keys = ("model", "data", "method", "edit", "module", "seed", "ckpt_path")
    return {key: strip(_container(cfg.get(key)) if OmegaConf.is_config(cfg.get(key)) else cfg.get(key))
            for key in keys}


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def check_resume(cfg: DictConfig) -> None:
    """Refuse a stream resume that cannot give the stream's results: a checkpoint that cannot be
    read, or one written under other settings (the differing keys are named), or a run that would
    train its editor again (``fit`` without ``ckpt_path``).

    A stream whose run trained its editor first (``fit``, no ``ckpt_path``) resumes with
    ``ckpt_path`` = the checkpoint that run tested: the one editor checkpoint its monitored
    checkpoint callback kept in ``<run folder>/checkpoints/`` (``fit.test_weights=best``)."""
    path = OmegaConf.select(cfg, "module.resume_from")
    if not path:
        return
    if cfg.get("fit") is not None and not cfg.get("ckpt_path"):
        raise SettingError("stream.resume", "would train the editor again (fit): resume a stream of a trained "
                           "editor with ckpt_path=<its checkpoint>"
                           + _trained_here_hint(cfg))
    stored = read_stream_checkpoint(path, mmap=True).get("config")
    if stored is None:
        return
    old, new = _flat(stored), _flat(run_fingerprint(cfg))
    if old.get("ckpt_path", "<unset>") is None and new.get("ckpt_path") and cfg.get("fit") is not None:
        _check_trained_here(cfg)  # the editor this run trained, so the setting is the same
        new["ckpt_path"] = None
    differ = differing_settings(old, new)
    if differ:
        shown = "; ".join(f"{k}: {old.get(k, '<unset>')!r} there, {new.get(k, '<unset>')!r} here" for k in differ[:5])
        raise SettingError("stream.resume", f"{path} was written by a run with other settings ({shown}"
                           f"{' ...' if len(differ) > 5 else ''}): resume a stream with its own settings")


def _trained_editor_checkpoints(cfg: DictConfig) -> list[Path]:
    """The editor checkpoints a run that trained its editor kept in ``<run folder>/checkpoints/``
    (``last.ckpt``, the resume point of training, left out)."""
    folder = Path(str(cfg.paths.output_dir)) / "checkpoints"
    return sorted(p for p in folder.glob("*.ckpt") if p.name != "last.ckpt") if folder.is_dir() else []


def _trained_here_hint(cfg: DictConfig) -> str:
    kept = _trained_editor_checkpoints(cfg)
    return f" (the editor this run trained and tested: ckpt_path={kept[0]})" if len(kept) == 1 else ""


def _check_trained_here(cfg: DictConfig) -> None:
    """``ckpt_path`` must name the editor the resumed run trained and tested; else a SettingError."""
    if str(OmegaConf.select(cfg, "fit.test_weights", default="best")) != "best":
        raise SettingError("stream.resume", "this stream tested the weights its training ended with "
                           "(fit.test_weights=last), which no checkpoint holds exactly: it cannot be resumed")
    kept = _trained_editor_checkpoints(cfg)
    given = Path(str(cfg.ckpt_path)).expanduser().resolve()
    if len(kept) != 1 or given != kept[0].resolve():
        found = ", ".join(str(p) for p in kept) or "none"
        raise SettingError("ckpt_path", "must be the editor checkpoint the resumed run trained and tested "
                           f"(its run folder keeps: {found})", cfg.ckpt_path)


def differing_settings(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The flat keys whose values differ between a stream checkpoint's settings (``old``) and this
    run's.  A key the checkpoint lacks and this run has off (None or false) is not a difference:
    a setting added to editlab after the checkpoint was written, left at the value that does what
    the older version did."""
    return [k for k in sorted(set(old) | set(new))
            if old.get(k, "<unset>") != new.get(k, "<unset>") and not (k not in old and new[k] in (None, False))]


def trainer_processes(trainer: DictConfig | None) -> int | None:
    """How many processes the ``trainer`` config starts (``devices`` x ``num_nodes``), or None when
    that is not known before the Trainer is built (``devices=auto`` on an accelerator other than the
    CPU or CUDA).  ``devices``: an int, ``"N"``, a list or ``"0,1"`` of device ids, ``auto`` / -1
    (the CPU: 1; CUDA, or ``accelerator=auto`` with CUDA present: every visible GPU)."""
    if trainer is None:
        return 1
    devices, nodes = trainer.get("devices", "auto"), trainer.get("num_nodes", 1) or 1
    accelerator = str(trainer.get("accelerator", "auto")).lower()
    if OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)):
        count = len(devices)
    elif isinstance(devices, str) and "," in devices:
        count = len([d for d in devices.split(",") if d.strip()])
    elif isinstance(devices, int) or (isinstance(devices, str) and devices.strip().lstrip("-").isdigit()):
        count = int(devices)
    else:
        count = -1 if str(devices).strip().lower() == "auto" else None
    if count is None:
        return None
    if count < 0:  # every device of the accelerator
        if accelerator == "cpu":
            count = 1
        elif accelerator in ("gpu", "cuda", "auto"):
            import torch

            count = torch.cuda.device_count() or (1 if accelerator == "auto" else 0)
        else:
            return None
    return max(count, 1) * int(nodes)


def check_config(cfg: DictConfig) -> None:
    """Check the settings that no constructor checks, and the files they name, before anything is
    built: a mistake here costs nothing yet."""
    apply_stream(cfg)
    check_resume(cfg)
    if cfg.get("edit", {}).get("sequential"):
        # (the edit loop refuses it too, EditorCallback.setup, for a launch this cannot see)
        trainer = cfg.get("trainer")
        processes = trainer_processes(trainer)
        if processes is not None and processes > 1:
            refuse_split_stream(processes, f"trainer.devices={trainer.get('devices', 'auto')} x "
                                           f"trainer.num_nodes={trainer.get('num_nodes', 1) or 1}")
    fit = cfg.get("fit")
    if fit is not None:
        if fit.get("resume_from") and fit.get("init_from"):
            raise SettingError("fit.resume_from", "and fit.init_from are both set: set resume_from to continue a run "
                               "(editor, optimizer, step) or init_from to start a new run from an editor's "
                               "weights, not both")
        which = fit.get("test_weights", "best")
        if which not in ("best", "last"):
            raise SettingError("fit.test_weights", "must be 'best' or 'last'", which)
    paths = {"ckpt_path": cfg.get("ckpt_path")}
    if fit is not None:
        paths.update({"fit.resume_from": fit.get("resume_from"), "fit.init_from": fit.get("init_from")})
    for key, path in paths.items():
        if path and not Path(str(path)).expanduser().is_file():
            raise SettingError(key, "names no file", str(path))
    # a checkpoint is read (memory-mapped) before the model loads: a truncated file, a pickle
    # payload or a stored config that names anything but an editlab editor is refused here
    if paths["ckpt_path"]:
        check_editor_checkpoint(Path(str(paths["ckpt_path"])).expanduser())
    for key in ("fit.resume_from", "fit.init_from"):
        if paths.get(key):
            read_editor_checkpoint(Path(str(paths[key])).expanduser(), mmap=True)


def load_records(cfg: DictConfig):
    """The data module with its records read and validated: the test split, and the train / val
    splits for a run that trains an editor (``fit``)."""
    with settings_of("data"):
        datamodule = hydra.utils.instantiate(cfg.data)
    stages = ("fit", "test") if cfg.get("fit") is not None and not cfg.get("ckpt_path") else ("test",)
    if "fit" in stages and cfg.data.get("train") is None:
        raise SettingError("data.train", "must be set: this run trains an editor (fit) on it")
    counts = datamodule.load(*stages)
    log.info("records: %s", ", ".join(f"{n} {split}" for split, n in counts.items()))
    return datamodule


@rank_zero_only
def save_config(cfg: DictConfig) -> None:
    """Write the resolved config (``stream`` expanded, interpolations filled in) to the run folder as
    ``config.yaml``, beside Hydra's ``.hydra/`` (the config as composed, with its overrides)."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Hydra's own node stays in .hydra/hydra.yaml
    resolved = {key: OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
                for key, value in cfg.items() if key != "hydra"}
    (out / "config.yaml").write_text(OmegaConf.to_yaml(resolved), encoding="utf-8")


def run(cfg: DictConfig) -> dict[str, float]:
    """Build and run one experiment from a composed config; return the summary metrics.

    Everything a user can get wrong is checked before the model is loaded (which can take minutes):
    the settings, the records of every split the run reads, and the editor's arguments."""
    check_config(cfg)
    save_config(cfg)
    log.info("%s: run folder %s (resolved config: config.yaml)", cfg.get("experiment_name", ""), cfg.paths.output_dir)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = load_records(cfg)
    editor = build_editor(cfg)
    scoring = check_scoring(cfg)
    bundle = hydra.utils.instantiate(cfg.model)
    check_lengths(datamodule, bundle, scoring)
    loggers = _instantiate_group(cfg.get("logger"))
    editor = finish_editor(cfg, editor, bundle, datamodule, loggers)
    callbacks = _instantiate_group(cfg.get("callbacks"))
    if editor is not None:
        callbacks.append(EditorCallback(editor, **cfg.get("edit", {})))
    with settings_of("module"):
        module = hydra.utils.instantiate(cfg.module, model=bundle)
    if OmegaConf.select(cfg, "module.checkpoint_every") or OmegaConf.select(cfg, "module.resume_from"):
        # stored in stream checkpoints (check_resume compares it); set here, not passed to
        # instantiate, which would build the `_target_`s it names
        module.run_config = run_fingerprint(cfg)
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    trainer.test(module, datamodule=datamodule, verbose=False)
    if trainer.is_global_zero:
        log.info("summary (%s):\n%s", cfg.get("experiment_name", ""), format_summary(module.summary))
    return module.summary


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except Exception as exc:
        err = user_error(exc)
        if err is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {err}", file=sys.stderr)
        _log_to_files(logging.ERROR, str(err))
        sys.exit(1)


def _log_to_files(level: int, message: str) -> None:
    """Write ``message`` to the log files only (the run folder's ``train.log``): the console
    already has it, without the log format."""
    record = log.makeRecord(log.name, level, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


if __name__ == "__main__":
    main()
