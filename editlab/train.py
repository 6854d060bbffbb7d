"""Hydra entry point: ``python -m editlab.train experiment=ft_smollm2_counterfact``.

Composes ``configs/train.yaml``, builds everything by ``_target_``, and runs the edit loop
(``trainer.test``) with the configured editor as a callback.  Prints (logs) the summary table and
writes results under the Hydra run directory in ``experiments/``.

Trainable editors (MEND, KE): experiments that select a ``fit`` config (``override /fit: editor``)
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
(``module.eval_every``: ``curves.csv`` / ``curves.png``).
"""

from __future__ import annotations

import logging

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from editlab.lit.callbacks import EditorCallback
from editlab.lit.edit_eval import format_summary
from editlab.lit.editor_train import load_editor, training_order

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
    if resume and init:
        raise ValueError("set fit.resume_from (continue a run: editor, optimizer, step) or fit.init_from "
                         "(start a new run from an editor's weights), not both")
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
    which = fit.get("test_weights", "best")
    if which not in ("best", "last"):
        raise ValueError(f"fit.test_weights must be 'best' or 'last', got {which!r}")
    if which == "best" and best:
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


def build_editor(cfg: DictConfig, bundle, datamodule, loggers: list):
    """The editor to test: none, a configured one, one trained here (``fit``), or a saved one
    (``ckpt_path``)."""
    if cfg.get("ckpt_path"):
        # the editor is rebuilt from the config stored with its weights; cfg.method is not used
        return load_editor(cfg.ckpt_path, bundle)
    if cfg.get("method") is None:
        return None
    editor = hydra.utils.instantiate(cfg.method)
    if cfg.get("fit") is not None:
        editor = fit_editor(cfg, bundle, editor, datamodule, loggers)
    return editor


def apply_stream(cfg: DictConfig) -> None:
    """Expand a ``stream`` node (any field set) into the data / edit / module settings it stands for.

    ``edits`` → ``data.test.limit``, ``batch_size`` → ``data.batch_size`` (unset: the data config's
    own values), ``edit.sequential=true``, ``module.score_after_stream=true`` and ``eval_every`` →
    ``module.eval_every`` (unset: no curves).  Those settings are overwritten, so the stream node is
    the one place a stream is described.
    """
    stream = cfg.get("stream")
    if not stream or all(v is None for v in stream.values()):
        return
    unknown = set(stream) - {"edits", "batch_size", "eval_every"}
    if unknown:
        raise ValueError(f"unknown stream settings {sorted(unknown)}: use edits, batch_size, eval_every")
    for key in ("edits", "batch_size", "eval_every"):
        value = stream.get(key)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"stream.{key} must be a positive integer or null, got {value!r}")
    with open_dict(cfg):
        if stream.get("edits") is not None:
            cfg.data.test.limit = stream.edits
        if stream.get("batch_size") is not None:
            cfg.data.batch_size = stream.batch_size
        cfg.edit.sequential = True
        cfg.module.score_after_stream = True
        cfg.module.eval_every = stream.get("eval_every")
    log.info("edit stream: %s edits in batches of %s, sequential, scored after the stream%s",
             cfg.data.test.get("limit"), cfg.data.get("batch_size"),
             f", curves every {cfg.module.eval_every} batches" if cfg.module.eval_every else "")


def run(cfg: DictConfig) -> dict[str, float]:
    """Build and run one experiment from a composed config; return the summary metrics."""
    apply_stream(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    log.info("config:\n%s", OmegaConf.to_yaml({k: v for k, v in cfg.items() if k != "hydra"}))
    bundle = hydra.utils.instantiate(cfg.model)
    datamodule = hydra.utils.instantiate(cfg.data)
    loggers = _instantiate_group(cfg.get("logger"))
    editor = build_editor(cfg, bundle, datamodule, loggers)
    callbacks = _instantiate_group(cfg.get("callbacks"))
    if editor is not None:
        callbacks.append(EditorCallback(editor, **cfg.get("edit", {})))
    module = hydra.utils.instantiate(cfg.module, model=bundle)
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    trainer.test(module, datamodule=datamodule, verbose=False)
    if trainer.is_global_zero:
        log.info("summary (%s):\n%s", cfg.get("experiment_name", ""), format_summary(module.summary))
    return module.summary


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
