"""Curves: edit-stream metrics against the number of edits, and training curves of a fit.

**Edit streams.** The edit loop (:class:`editlab.lit.edit_eval.EditEvalModule` with
``eval_every``) collects one point per checkpoint, ``{"edits": …, "batches": …, metric: value, …}``,
metric names as in the summary's keys after the stage (``reliability``, ``efficacy_score``,
``reliability@generation_em``, ``general_perplexity``, …); this module writes them as
``curves.csv`` (one row per checkpoint) and ``curves.png`` (matplotlib, optional: the ``plot``
extra; without it the plot is skipped with a warning); :class:`editlab.lit.results.ResultsWriter`
calls them.

**Training.** :class:`TrainingCurves`, a callback of the fit stage, keeps the mean of every
``train/*`` value over each window of ``every`` optimizer steps and every ``val/*`` value at each
validation, and writes them at the end of the fit as ``training_curves.csv`` (one row per step
that has a value) and ``training_curves.png`` (losses on a log scale, scores and accuracies below,
then the learning rate).  Its points travel in checkpoints, so a resumed run's curves start at step 0 too.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L

from editlab.metrics.keys import is_general

log = logging.getLogger(__name__)

__all__ = ["TrainingCurves", "curve_columns", "plot_comparison", "plot_curves", "plot_training_curves",
           "read_curves_csv", "write_curves", "write_curves_csv", "write_training_curves"]

INDEX = ("edits", "batches")
# general ability gets panels of its own (other scales); fluency (n-gram entropy) and the
# probability-comparison magnitudes are left out of the score panel (CSV only)
_GENERAL_PANELS = (("general_perplexity",), ("general_piqa_acc", "general_piqa_acc_norm"))


def curve_columns(points: list[dict[str, float]]) -> list[str]:
    """``edits``, ``batches``, then every metric in the order the points first name it."""
    names = list(INDEX)
    for point in points:
        names.extend(k for k in point if k not in names)
    return names


def write_curves_csv(points: list[dict[str, float]], output_dir: Path) -> None:
    """Write ``curves.csv`` (one row per point) into ``output_dir``."""
    columns = curve_columns(points)
    with open(output_dir / "curves.csv", "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for point in points:
            writer.writerow([_cell(point.get(c), integer=c in INDEX) for c in columns])


def write_curves(points: list[dict[str, float]], output_dir: Path) -> None:
    """Write ``curves.csv`` and (when matplotlib is installed) ``curves.png`` into ``output_dir``."""
    write_curves_csv(points, output_dir)
    plot_curves(points, output_dir / "curves.png")


def _cell(value: float | None, integer: bool) -> str:
    if value is None:
        return ""
    return str(int(value)) if integer else repr(float(value))  # repr: exact round trip


def _plot_panels(path: Path, panels: list[tuple[str, list[str]]], x_label: str,
                 draw: Callable[[Any, str, list[str]], None]) -> bool:
    """One panel per ``(y label, names)`` stacked in one figure; ``draw(ax, label, names)`` plots a
    panel's lines.  False (and a warning) without matplotlib, False without panels."""
    panels = [(label, names) for label, names in panels if names]
    if not panels:
        return False
    try:
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'editlab[plot]'): %s not written", path)
        return False
    fig = Figure(figsize=(7, 3.2 * len(panels)))
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (label, names) in zip(axes, panels):
        draw(ax, label, names)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    axes[-1].set_xlabel(x_label)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def plot_curves(points: list[dict[str, float]], path: Path) -> bool:
    """Plot the curves against the number of edits into ``path``; False (and a warning) when
    matplotlib is not installed or there is nothing to plot."""
    if not points:
        return False
    columns = curve_columns(points)
    scores = [c for c in columns if c not in INDEX and not is_general(c)
              and not c.endswith("_magnitude") and c != "fluency"]
    panels = [("score (records edited so far)", scores)]
    panels += [(names[0], [n for n in names if n in columns])
               for names in _GENERAL_PANELS if names[0] in columns]
    edits = [p["edits"] for p in points]

    def draw(ax: Any, label: str, names: list[str]) -> None:
        for name in names:
            ax.plot(edits, [p.get(name, float("nan")) for p in points], marker="o", markersize=3, label=name)

    return _plot_panels(path, panels, "edits", draw)


def read_curves_csv(path: Path) -> list[dict[str, float]]:
    """The points of a ``curves.csv`` (:func:`write_curves_csv`); empty cells are left out."""
    with open(path, encoding="utf-8", newline="") as fh:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]


def plot_comparison(runs: dict[str, list[dict[str, float]]], out: Path) -> list[Path]:
    """One figure per metric with every run's curve on it (against the number of edits): written
    as ``<out stem>_<metric>.png`` beside ``out``; the files written.  Needs matplotlib."""
    from matplotlib.figure import Figure

    metrics = curve_columns([p for points in runs.values() for p in points])[len(INDEX):]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for metric in metrics:
        fig = Figure(figsize=(6, 3.6))
        ax = fig.subplots()
        for label, points in runs.items():
            shown = [p for p in points if metric in p]
            if shown:
                ax.plot([p["edits"] for p in shown], [p[metric] for p in shown], marker="o", markersize=3, label=label)
        ax.set_xlabel("edits")
        ax.set_ylabel(metric)
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out.with_name(f"{out.stem}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', metric)}.png")
        fig.savefig(path, dpi=120)
        written.append(path)
    return written


# ------------------------------------------------------------------------------ training curves
STEP = "step"


def write_training_curves(points: list[dict[str, float]], output_dir: Path,
                          name: str = "training_curves") -> None:
    """``{name}.csv`` (rows by step, points of one step merged) and ``{name}.png`` in ``output_dir``."""
    rows: dict[int, dict[str, float]] = {}
    for point in points:
        rows.setdefault(int(point[STEP]), {}).update(point)
    merged = [rows[step] for step in sorted(rows)]
    columns = [STEP] + sorted({k for row in merged for k in row if k != STEP})
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / f"{name}.csv", "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for row in merged:
            writer.writerow([_cell(row.get(c), integer=c == STEP) for c in columns])
    plot_training_curves(merged, output_dir / f"{name}.png")


def plot_training_curves(points: list[dict[str, float]], path: Path) -> bool:
    """Losses (``*loss*``, log scale) above the scores and accuracies, train solid and val dashed,
    and the learning rate (``train/lr``, log scale) at the bottom, against the optimizer step;
    False (and a warning) without matplotlib or points."""
    names = sorted({k for p in points for k in p if k != STEP})
    losses = [n for n in names if "loss" in n.split("/")[-1]]
    rates = [n for n in names if n.split("/")[-1] == "lr"]
    scores = [n for n in names if n not in losses and n not in rates]  # train solid, val dashed

    def draw(ax: Any, label: str, group: list[str]) -> None:
        for name in group:
            xy = [(p[STEP], p[name]) for p in points if p.get(name) is not None and math.isfinite(p[name])]
            if not xy:
                continue
            style = {"linestyle": "--", "marker": "o", "markersize": 3} if name.startswith("val/") else {}
            ax.plot([x for x, _ in xy], [y for _, y in xy], label=name, **style)
        if label != "score" and all(p[n] > 0 for p in points for n in group if p.get(n) is not None):
            ax.set_yscale("log")

    panels = [("loss", losses), ("score", scores), ("learning rate", rates)]
    return _plot_panels(path, panels, "optimizer step", draw)


class TrainingCurves(L.Callback):
    """Record the curves of a fit and write them when it ends (see the module docstring).

    Args:
        output_dir: where ``{name}.csv`` / ``{name}.png`` go (rank 0 writes).
        every: optimizer steps per training point (the mean of the window's batches); default the
            trainer's ``log_every_n_steps``.
        name: file stem.
    """

    def __init__(self, output_dir: str | Path, every: int | None = None,
                 name: str = "training_curves") -> None:
        if every is not None and every < 1:
            raise ValueError(f"TrainingCurves: every must be >= 1, got {every}")
        self.output_dir = Path(output_dir)
        self.every = every
        self.name = name
        self.points: list[dict[str, float]] = []
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._last_step = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        for key, value in trainer.callback_metrics.items():
            if key.startswith("train/"):
                self._sums[key] = self._sums.get(key, 0.0) + float(value)
                self._counts[key] = self._counts.get(key, 0) + 1
        step = trainer.global_step
        if step != self._last_step and step % (self.every or trainer.log_every_n_steps or 1) == 0:
            self._flush(step)

    def _flush(self, step: int) -> None:
        if self._counts:
            self.points.append({STEP: step, **{k: self._sums[k] / n for k, n in self._counts.items()}})
        self._sums, self._counts, self._last_step = {}, {}, step

    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if values:
            self.points.append({STEP: trainer.global_step, **values})

    def on_fit_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.global_step != self._last_step:
            self._flush(trainer.global_step)  # the last, partial window
        if trainer.is_global_zero and self.points:
            write_training_curves(self.points, self.output_dir, self.name)
            log.info("training curves: %s", self.output_dir / f"{self.name}.csv")

    def state_dict(self) -> dict[str, Any]:
        return {"points": [dict(p) for p in self.points], "sums": dict(self._sums),
                "counts": dict(self._counts), "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.points = [dict(p) for p in state_dict["points"]]
        self._sums = dict(state_dict["sums"])
        self._counts = dict(state_dict["counts"])
        self._last_step = int(state_dict["last_step"])
