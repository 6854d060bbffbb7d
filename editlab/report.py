"""Results → a Table-1-shaped markdown report (Yao et al. 2023, "Editing Large Language Models").

``python -m editlab.report`` collects the edit-loop runs under a runs folder (``summary.json``
plus Hydra's ``.hydra/config.yaml`` in each run folder; the latest run of each experiment wins)
and writes one markdown table:

* **columns**: one group per scoring mode, one column per method inside a group —
  ``TF`` (teacher-forced token accuracy), ``PC`` (CounterFact probability comparison: efficacy /
  paraphrase / neighbourhood score in the reliability / generalization / locality rows) and one
  group per generation framing found in the runs (``GEN`` plain, ``GEN-QA`` question-answer,
  ``GEN-CHAT`` chat template;
  the score shown is chosen with ``--generation-score``: exact match after normalisation, token
  F1, containment or judge);
* **rows**: data file × metric (reliability, generalization, locality, portability), then the
  median seconds per edit and the number of records scored.

Locality is agreement with the unedited model (EasyEdit's definition) in TF and GEN, and the
neighbourhood score in PC.  A cell is empty when the run has no such number.  The stage is
``post`` (each record scored right after its own edit) unless ``--stage final`` asks for the
scores after a whole sequential stream.

``--run EXP [EXP ...]`` first runs the named experiments that have no finished run yet
(``python -m editlab.train experiment=EXP``, one after another), so one command reproduces the
table from nothing::

    python -m editlab.report --run ft_smollm2_zsre rome_smollm2_zsre --out experiments/table1.md
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from editlab.metrics.keys import (
    GENERATION_KINDS, generation_metric, join, parse_generation_metric, parse_key, time_key,
)

__all__ = ["Run", "collect_runs", "format_table", "main"]

log = logging.getLogger(__name__)

METRICS = ("reliability", "generalization", "locality", "portability")
PC_KEYS = {"reliability": "efficacy_score", "generalization": "paraphrase_score", "locality": "neighborhood_score"}
GENERATION_SCORES = GENERATION_KINDS
MODE_TITLES = {"teacher_forced": "TF", "probability_comparison": "PC", "generation": "GEN", "generation_qa": "GEN-QA",
               "generation_chat": "GEN-CHAT"}


@dataclass
class Run:
    """One finished edit-loop run: where it is, what it edited with, on which data, and its summary."""

    path: Path
    experiment: str
    method: str
    dataset: str
    model: str
    summary: dict[str, float]
    records: int = 0
    batch_size: int = 1

    @property
    def seconds_per_edit(self) -> float | None:
        """Median edit time per record: a batch's time over its size (one call edits the batch)."""
        value = self.summary.get(time_key("edit"))
        return None if value is None else float(value) / self.batch_size

    def value(self, stage: str, mode: str, metric: str, generation_score: str = "em") -> float | None:
        """The run's number for (stage, scoring mode, metric), or None when it has none."""
        if mode == "teacher_forced":
            key = join(stage, metric)
        elif mode == "probability_comparison":
            if metric not in PC_KEYS:
                return None
            key = join(stage, PC_KEYS[metric])
        else:
            key = join(stage, generation_metric(metric, mode, generation_score))
        value = self.summary.get(key)
        return None if value is None or not math.isfinite(value) else float(value)

    def modes(self) -> list[str]:
        found = []
        metrics = [key.metric for key in map(parse_key, self.summary) if key.stage]
        if any(m in METRICS for m in metrics):
            found.append("teacher_forced")
        if "efficacy_score" in metrics:
            found.append("probability_comparison")
        for metric in metrics:
            parts = parse_generation_metric(metric)
            if parts is not None and parts.label not in found:
                found.append(parts.label)
        return found


def _class_name(target: str | None) -> str:
    return (target or "?").rsplit(".", 1)[-1]


def _load_run(folder: Path) -> Run | None:
    summary_path = folder / "summary.json"
    config_path = folder / ".hydra" / "config.yaml"
    if not summary_path.is_file() or not config_path.is_file():
        return None
    with open(config_path, encoding="utf-8") as fh:
        config = yaml.safe_load(fh) or {}
    with open(summary_path, encoding="utf-8") as fh:
        summary = json.load(fh)
    method = config.get("method") or {}
    data = config.get("data") or {}
    test = data.get("test") or {}
    if not method.get("_target_") or not test:
        return None  # not an edit-loop run (e.g. causal tracing)
    model = config.get("model") or {}
    name = model.get("name") or model.get("name_or_path") or _class_name(model.get("_target_"))
    dataset = str(test.get("path", "?"))
    if test.get("offset"):
        dataset += f" [{test['offset']}:]"
    records = 0
    if (folder / "records.jsonl").is_file():
        with open(folder / "records.jsonl", encoding="utf-8") as fh:
            records = sum(1 for line in fh if line.strip())
    return Run(folder, str(config.get("experiment_name", folder.parent.name)), _class_name(method.get("_target_")),
               dataset, str(name), summary, records, int(data.get("batch_size") or 1))


def collect_runs(root: str | Path, experiments: Sequence[str] | None = None, model: str | None = None) -> list[Run]:
    """The latest finished run of each experiment under ``root`` (``root/<experiment>/<time>/``),
    optionally only the named experiments and only runs whose model name contains ``model``."""
    root = Path(root)
    runs = []
    for exp_dir in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        if experiments is not None and exp_dir.name not in experiments:
            continue
        for folder in sorted((p for p in exp_dir.iterdir() if p.is_dir()), reverse=True):
            run = _load_run(folder)
            if run is None:
                continue
            if model is None or model.lower() in run.model.lower():
                runs.append(run)
            break
    return runs


def _fmt(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def format_table(runs: Sequence[Run], stage: str = "post", generation_score: str = "em", digits: int = 3) -> str:
    """The markdown table of ``runs`` (see the module docstring)."""
    if not runs:
        raise ValueError("no finished runs to report")
    if generation_score not in GENERATION_SCORES:
        raise ValueError(f"generation_score must be one of {GENERATION_SCORES}, got {generation_score!r}")
    methods = list(dict.fromkeys(r.method for r in runs))
    datasets = list(dict.fromkeys(r.dataset for r in runs))
    by_key: dict[tuple[str, str], Run] = {}
    for run in runs:
        if (run.method, run.dataset) in by_key:
            log.warning("two runs of %s on %s: keeping %s, ignoring %s", run.method, run.dataset,
                        by_key[run.method, run.dataset].path, run.path)
            continue
        by_key[run.method, run.dataset] = run
    modes = [m for m in MODE_TITLES if any(m in r.modes() for r in runs)]
    columns = [(mode, method) for mode in modes for method in methods]
    header = ["data", "metric", *(f"{MODE_TITLES[mode]}: {method}" for mode, method in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for dataset in datasets:
        for metric in METRICS:
            cells = []
            for mode, method in columns:
                run = by_key.get((method, dataset))
                cells.append(_fmt(run.value(stage, mode, metric, generation_score) if run else None, digits))
            if any(cells):
                lines.append("| " + " | ".join([dataset, metric, *cells]) + " |")
        first = [by_key.get((m, dataset)) if mode == modes[0] else None for mode, m in columns]
        lines.append("| " + " | ".join([dataset, "s/edit (median)", *(
            _fmt(r.seconds_per_edit if r else None, 2) for r in first)]) + " |")
        lines.append("| " + " | ".join([dataset, "records", *(str(r.records) if r else "" for r in first)]) + " |")
    notes = [
        "",
        f"Stage `{stage}`. TF = teacher-forced token accuracy; PC = probability comparison (efficacy, paraphrase, "
        "neighbourhood score); GEN = greedy generation"
        f" scored by `{generation_score}`. Locality = agreement with the unedited model (TF, GEN), "
        "neighbourhood score (PC). s/edit: median edit time per record (a batch edit's time over its size), "
        "in the first column group only.",
        "",
        "Runs: " + "; ".join(f"{r.experiment} ({r.model}) → `{r.path}`" for r in runs),
    ]
    return "\n".join(lines + notes) + "\n"


def _run_missing(experiments: Sequence[str], root: Path, overrides: Sequence[str]) -> None:
    have = {r.experiment for r in collect_runs(root, experiments)}
    for exp in experiments:
        if exp in have:
            log.info("%s: a finished run exists, not rerun", exp)
            continue
        cmd = [sys.executable, "-m", "editlab.train", f"experiment={exp}", *overrides]
        log.info("running %s", " ".join(cmd))
        subprocess.run(cmd, check=True)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m editlab.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="experiments/runs", help="folder holding <experiment>/<time>/ runs")
    parser.add_argument("--experiments", nargs="*", help="only these experiments (default: all with a summary)")
    parser.add_argument("--run", nargs="*", default=None, metavar="EXP",
                        help="run these experiments first when they have no finished run (and report only them)")
    parser.add_argument("--override", nargs="*", default=[], help="Hydra overrides passed to every --run")
    parser.add_argument("--model", default=None, help="only runs whose model name contains this")
    parser.add_argument("--stage", default="post", choices=["pre", "post", "final"])
    parser.add_argument("--generation-score", default="em", choices=GENERATION_SCORES)
    parser.add_argument("--out", default=None, help="write the table here (markdown) as well as to stdout")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = Path(args.runs)
    experiments = args.experiments
    if args.run:
        _run_missing(args.run, root, args.override)
        experiments = list(args.run) + list(experiments or [])
    table = format_table(collect_runs(root, experiments, args.model), args.stage, args.generation_score)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table, encoding="utf-8")
        log.info("wrote %s", args.out)
    sys.stdout.write(table)
    return table


if __name__ == "__main__":
    main()
