"""Edit-stream curves: metrics of all records edited so far against the number of edits.

The edit loop (:class:`editlab.lit.edit_eval.EditEvalModule` with ``eval_every``) collects one
point per checkpoint, ``{"edits": …, "batches": …, metric: value, …}``, metric names as in the
summary's keys after the stage (``reliability``, ``efficacy_score``,
``reliability@generation_em``, ``general_perplexity``, …); this module writes them as
``curves.csv`` (one row per checkpoint) and ``curves.png`` (matplotlib, optional: the ``plot``
extra; without it the plot is skipped with a warning).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["curve_columns", "plot_curves", "write_curves"]

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


def write_curves(points: list[dict[str, float]], output_dir: Path) -> None:
    """Write ``curves.csv`` and (when matplotlib is installed) ``curves.png`` into ``output_dir``."""
    columns = curve_columns(points)
    with open(output_dir / "curves.csv", "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for point in points:
            writer.writerow([_cell(c, point.get(c)) for c in columns])
    plot_curves(points, output_dir / "curves.png")


def _cell(column: str, value: float | None) -> str:
    if value is None:
        return ""
    return str(int(value)) if column in INDEX else repr(float(value))  # repr: exact round trip


def plot_curves(points: list[dict[str, float]], path: Path) -> bool:
    """Plot the curves against the number of edits into ``path``; False (and a warning) when
    matplotlib is not installed or there is nothing to plot."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'editlab[plot]'): %s not written", path)
        return False
    columns = curve_columns(points)
    scores = [c for c in columns if c not in INDEX and not c.startswith("general_")
              and not c.endswith("_magnitude") and c != "fluency"]
    panels = [("score (records edited so far)", scores)]
    panels += [(names[0], [n for n in names if n in columns]) for names in _GENERAL_PANELS if names[0] in columns]
    panels = [(label, names) for label, names in panels if names]
    if not panels or not points:
        return False
    edits = [p["edits"] for p in points]
    fig = Figure(figsize=(7, 3.2 * len(panels)))
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (label, names) in zip(axes, panels):
        for name in names:
            ax.plot(edits, [p.get(name, float("nan")) for p in points], marker="o", markersize=3, label=name)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    axes[-1].set_xlabel("edits")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True
