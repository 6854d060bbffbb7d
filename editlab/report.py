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

**Sweeps.**  Given a Hydra multirun folder (``python -m editlab.train -m ...`` writes
``experiments/multiruns/<experiment>/<time>/`` with one numbered folder per job), the report is one
row per job instead: the job, the swept settings (the overrides whose values differ between the
jobs) and the metrics of the stage (``post/...``), then seconds per edit and records scored.  A job
that has not finished has a row with its records so far and no metrics.  Given
``multiruns/<experiment>/``, the latest sweep is reported::

    python -m editlab.train -m experiment=ft_smollm2_counterfact method.lr=1e-4,5e-4,1e-3
    python -m editlab.report --runs experiments/multiruns/ft_smollm2_counterfact --out lr.csv

Records are counted in ``records.jsonl`` and, for a run that was killed before its DDP ranks'
files were merged into it, in the ``records.rank<N>.jsonl`` files beside it (each record once).
``--out FILE`` writes the table to FILE as well as to stdout: CSV when FILE ends in ``.csv``
(a sweep's metrics at full precision), markdown otherwise.

**Curves.**  ``--curves RUN [RUN ...]`` compares edit streams instead (the methods of a
comparison): one figure per metric (reliability, locality, ...) with every run's curve against the
number of edits, read from each run's ``curves.csv`` (a run folder, or the file), written as
``<stem>_<metric>.png`` for ``--out <stem>.png`` (default ``curves.png``: ``curves_<metric>.png``
in the current folder).  A run is labelled by its method's class (and its folder when two runs
share one)::

    python -m editlab.report --curves experiments/runs/ft_smollm2_stream/<t1> experiments/runs/memit_stream/<t2> \
        --out cmp/stream.png

``--run EXP [EXP ...]`` first runs the named experiments that have no finished run yet
(``python -m editlab.train experiment=EXP``, one after another), so one command reproduces the
table from nothing::

    python -m editlab.report --run ft_smollm2_zsre rome_smollm2_zsre --out experiments/table1.md
"""

from __future__ import annotations

import argparse
import csv
import io
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

__all__ = ["Run", "Job", "collect_runs", "collect_sweep", "is_sweep", "format_table", "format_sweep", "main"]

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


def count_records(folder: Path) -> int:
    """The records a run wrote: ``records.jsonl`` and any ``records.rank<N>.jsonl`` beside it (a DDP
    run killed before rank 0 merged them), each record once (by its source file and index)."""
    files = [folder / "records.jsonl", *sorted(folder.glob("records.rank*.jsonl"))]
    seen: set[tuple] = set()
    anonymous = 0
    for path in files:
        if not path.is_file():
            continue
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
                if isinstance(record, dict) and "index" in record:
                    seen.add((record.get("source"), record["index"]))
                else:
                    anonymous += 1
    return len(seen) + anonymous


def _load_run(folder: Path, finished: bool = True) -> Run | None:
    """The edit-loop run in ``folder``; None when it is not one, or (``finished``) has no summary."""
    summary_path = folder / "summary.json"
    config_path = folder / ".hydra" / "config.yaml"
    if not config_path.is_file() or (finished and not summary_path.is_file()):
        return None
    with open(config_path, encoding="utf-8") as fh:
        config = yaml.safe_load(fh) or {}
    summary = {}
    if summary_path.is_file():
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
    return Run(folder, str(config.get("experiment_name", folder.parent.name)), _class_name(method.get("_target_")),
               dataset, str(name), summary, count_records(folder), int(data.get("batch_size") or 1))


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


@dataclass
class Job:
    """One job of a Hydra sweep: its folder name (the job number), its overrides and its run."""

    name: str
    overrides: dict[str, str]
    run: Run

    @property
    def finished(self) -> bool:
        return bool(self.run.summary)


def is_sweep(folder: str | Path) -> bool:
    """Whether ``folder`` is one Hydra multirun: Hydra writes ``multirun.yaml`` there when it starts."""
    return (Path(folder) / "multirun.yaml").is_file()


def _sweep_folder(folder: Path) -> Path | None:
    """``folder`` when it is a sweep, the latest sweep in it when it holds sweeps
    (``multiruns/<experiment>/``), else None."""
    if is_sweep(folder):
        return folder
    if not folder.is_dir():
        return None
    sweeps = sorted(p for p in folder.iterdir() if p.is_dir() and is_sweep(p))
    return sweeps[-1] if sweeps else None


def _parse_overrides(path: Path) -> dict[str, str]:
    """Hydra's ``overrides.yaml`` (``key=value`` lines, ``+``/``++`` prefixes, ``~key`` deletions)
    as ``{key: value}``; a deleted key's value is ``~``."""
    with open(path, encoding="utf-8") as fh:
        lines = yaml.safe_load(fh) or []
    out = {}
    for line in lines:
        line = str(line)
        if line.startswith("~"):
            out[line[1:].split("=", 1)[0]] = "~"
            continue
        key, _, value = line.lstrip("+").partition("=")
        out[key] = value
    return out


def _job_order(folder: Path) -> tuple:
    return (0, int(folder.name), "") if folder.name.isdigit() else (1, 0, folder.name)


def collect_sweep(folder: str | Path) -> list[Job]:
    """Every edit-loop job of the sweep ``folder`` (or of the latest sweep in it), finished or not,
    in job order."""
    folder = Path(folder)
    sweep = _sweep_folder(folder)
    if sweep is None:
        raise ValueError(f"{folder} is not a sweep folder (multiruns/<experiment>/<time>/ with one folder per job)")
    jobs = []
    for job_dir in sorted((p for p in sweep.iterdir() if p.is_dir()), key=_job_order):
        overrides = job_dir / ".hydra" / "overrides.yaml"
        run = _load_run(job_dir, finished=False) if overrides.is_file() else None
        if run is not None:
            jobs.append(Job(job_dir.name, _parse_overrides(overrides), run))
    return jobs


def swept_keys(jobs: Sequence[Job]) -> list[str]:
    """The override keys whose values differ between ``jobs``, in the order they are first given."""
    keys = list(dict.fromkeys(k for job in jobs for k in job.overrides))
    return [k for k in keys if len({job.overrides.get(k) for job in jobs}) > 1]


def sweep_table(jobs: Sequence[Job], stage: str = "post") -> tuple[list[str], list[list]]:
    """The header and rows of a sweep's table: job, swept settings, the metrics of ``stage``
    (summary keys ``<stage>/<metric>``, in the order the runs list them), seconds per edit and
    records.  Metric cells are floats (None: the job has no such number)."""
    if not jobs:
        raise ValueError("no jobs to report in this sweep")
    keys = swept_keys(jobs)
    prefix = f"{stage}/"
    metrics = list(dict.fromkeys(k[len(prefix):] for job in jobs for k in job.run.summary if k.startswith(prefix)))
    header = ["job", *keys, *metrics, "s/edit (median)", "records"]
    rows = []
    for job in jobs:
        values = [job.run.summary.get(prefix + m) for m in metrics]
        values = [float(v) if v is not None and math.isfinite(v) else None for v in values]
        rows.append([job.name, *(job.overrides.get(k, "") for k in keys), *values, job.run.seconds_per_edit,
                     job.run.records])
    return header, rows


def format_sweep(jobs: Sequence[Job], stage: str = "post", digits: int = 3) -> str:
    """The markdown table of a sweep (see the module docstring), with what the jobs share below it."""
    header, rows = sweep_table(jobs, stage)

    def cell(value) -> str:
        if isinstance(value, float):
            return _fmt(value, digits)
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    swept = set(swept_keys(jobs))
    shared = [f"{k}={v}" for k, v in jobs[0].overrides.items() if k not in swept]
    first = jobs[0].run
    unfinished = [job.name for job in jobs if not job.finished]
    notes = [
        "",
        f"Sweep of {first.experiment} ({first.method}, {first.model}, {first.dataset}): {len(jobs)} jobs in "
        f"`{first.path.parent}`. Stage `{stage}`; s/edit: median edit time per record.",
        "",
        "Every job: " + (" ".join(f"`{o}`" for o in shared) if shared else "(no other overrides)"),
    ]
    if unfinished:
        notes += ["", "Not finished (no summary yet): job " + ", ".join(unfinished)]
    return "\n".join(lines + notes) + "\n"


def to_csv(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """``header`` and ``rows`` as CSV (numbers at full precision, None as an empty cell)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    return buffer.getvalue()


def _markdown_rows(table: str) -> tuple[list[str], list[list[str]]]:
    """The header and rows of the first markdown table in ``table`` (for its CSV form)."""
    lines = [line for line in table.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines if not line.startswith("|---")]
    return cells[0], cells[1:]


def _run_missing(experiments: Sequence[str], root: Path, overrides: Sequence[str]) -> None:
    have = {r.experiment for r in collect_runs(root, experiments)}
    for exp in experiments:
        if exp in have:
            log.info("%s: a finished run exists, not rerun", exp)
            continue
        cmd = [sys.executable, "-m", "editlab.train", f"experiment={exp}", *overrides]
        log.info("running %s", " ".join(cmd))
        subprocess.run(cmd, check=True)


def _curves_file(run: str | Path) -> Path:
    path = Path(run)
    found = path / "curves.csv" if path.is_dir() else path
    if not found.is_file():
        raise ValueError(f"{run}: no curves.csv (a stream run with stream.eval_every writes one)")
    return found


def _method_label(folder: Path) -> str:
    for config in (folder / "config.yaml", folder / ".hydra" / "config.yaml"):
        if config.is_file():
            method = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("method") or {}
            if isinstance(method, dict) and method.get("_target_"):
                return _class_name(method["_target_"])
    return folder.name


def compare_curves(runs: Sequence[str | Path], out: str | Path = "curves.png") -> list[Path]:
    """One PNG per metric with every run's stream curve (:func:`editlab.lit.curves.plot_comparison`);
    the files written."""
    from editlab.lit.curves import plot_comparison, read_curves_csv

    files = [_curves_file(run) for run in runs]
    labels = [_method_label(f.parent) for f in files]
    curves: dict[str, list[dict[str, float]]] = {}
    for f, label in zip(files, labels):
        if labels.count(label) > 1:
            label = f"{label} ({f.parent.name})"
        while label in curves:
            label += "'"
        curves[label] = read_curves_csv(f)
    try:
        return plot_comparison(curves, Path(out))
    except ImportError as err:
        raise ValueError("--curves needs matplotlib (pip install 'editlab[plot]')") from err


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m editlab.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="experiments/runs",
                        help="folder holding <experiment>/<time>/ runs, or a sweep folder "
                             "(multiruns/<experiment>/<time>/, or multiruns/<experiment>/ for its latest sweep): "
                             "one row per job")
    parser.add_argument("--experiments", nargs="*", help="only these experiments (default: all with a summary)")
    parser.add_argument("--run", nargs="*", default=None, metavar="EXP",
                        help="run these experiments first when they have no finished run (and report only them)")
    parser.add_argument("--override", nargs="*", default=[], help="Hydra overrides passed to every --run")
    parser.add_argument("--model", default=None, help="only runs whose model name contains this")
    parser.add_argument("--stage", default="post", choices=["pre", "post", "final"])
    parser.add_argument("--generation-score", default="em", choices=GENERATION_SCORES)
    parser.add_argument("--out", default=None,
                        help="write the table here as well as to stdout: CSV when the name ends in .csv, else markdown; "
                             "with --curves: <stem>.png gives <stem>_<metric>.png (default curves.png)")
    parser.add_argument("--curves", nargs="+", default=None, metavar="RUN",
                        help="compare stream runs instead: one PNG per metric with every run's curve (curves.csv)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.curves:
        written = compare_curves(args.curves, args.out or "curves.png")
        text = "".join(f"{path}\n" for path in written)
        sys.stdout.write(text)
        return text
    root = Path(args.runs)
    if _sweep_folder(root) is not None:
        if args.run or args.experiments or args.model:
            parser.error(f"{root} is a sweep: --run, --experiments and --model select runs of a runs folder")
        jobs = collect_sweep(root)
        table = format_sweep(jobs, args.stage)
        csv_text = to_csv(*sweep_table(jobs, args.stage))
    else:
        experiments = args.experiments
        if args.run:
            _run_missing(args.run, root, args.override)
            experiments = list(args.run) + list(experiments or [])
        runs = collect_runs(root, experiments, args.model)
        if not runs:
            raise ValueError(f"no finished runs to report in {root} (a folder of <experiment>/<time>/ runs, or "
                             "a sweep folder multiruns/<experiment>/<time>/)")
        table = format_table(runs, args.stage, args.generation_score)
        csv_text = to_csv(*_markdown_rows(table))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(csv_text if out.suffix.lower() == ".csv" else table, encoding="utf-8")
        log.info("wrote %s", out)
    sys.stdout.write(table)
    return table


if __name__ == "__main__":
    main()
