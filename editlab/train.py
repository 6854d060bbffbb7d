"""Hydra entry point: ``python -m editlab.train experiment=ft_smollm2_counterfact``.

Composes ``configs/train.yaml``, builds everything by ``_target_``, and runs the edit loop
(``trainer.test``) with the configured editor as a callback.  Prints (logs) the summary table and
writes results under the Hydra run directory in ``experiments/``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from editlab.lit.callbacks import EditorCallback
from editlab.lit.edit_eval import format_summary

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("EDITLAB_ROOT", str(ROOT))


def _instantiate_group(group: DictConfig | None) -> list:
    """Instantiate every entry of a config group dict (callbacks, loggers) that has a ``_target_``."""
    if not group:
        return []
    return [hydra.utils.instantiate(node) for node in group.values() if node is not None and "_target_" in node]


def run(cfg: DictConfig) -> dict[str, float]:
    """Build and run one experiment from a composed config; return the summary metrics."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    log.info("config:\n%s", OmegaConf.to_yaml({k: v for k, v in cfg.items() if k != "hydra"}))
    bundle = hydra.utils.instantiate(cfg.model)
    datamodule = hydra.utils.instantiate(cfg.data)
    callbacks = _instantiate_group(cfg.get("callbacks"))
    if cfg.get("method") is not None:
        editor = hydra.utils.instantiate(cfg.method)
        callbacks.append(EditorCallback(editor, **cfg.get("edit", {})))
    loggers = _instantiate_group(cfg.get("logger"))
    module = hydra.utils.instantiate(cfg.module, model=bundle)
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    trainer.test(module, datamodule=datamodule, verbose=False)
    if trainer.is_global_zero:
        log.info("summary (%s):\n%s", cfg.get("experiment_name", ""), format_summary(module.summary))
    return module.summary


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
