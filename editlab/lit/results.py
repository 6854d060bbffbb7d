"""Writing the edit loop's results: a callback, so the LightningModule only computes them.

:class:`ResultsWriter` writes into ``output_dir``:

* ``records.jsonl``: one line per record (every metric per stage, edit time, generated answers),
  appended and flushed as soon as a batch is scored, so a run that dies keeps every finished
  batch; a resumed stream (:mod:`editlab.lit.stream`) starts it again from its checkpoint's rows
  (the rows of later batches a kill left are dropped: those batches run again).  Under DDP each
  rank appends to ``records.rank{r}.jsonl`` while running; at the end the
  ranks' rows are gathered to rank 0 over the process group (each node may have its own disk),
  which writes ``records.jsonl``, ordered by record index, and every rank removes its file.  At the
  end the file is rewritten once with the stages scored after the stream (``final``);
* ``summary.json`` and ``summary.csv`` (one row per metric, a column per stage) at the end;
* ``curves.csv`` (rewritten at each stream checkpoint) and ``curves.png`` (at the end) for edit
  streams with checkpoints.

The module it serves (:class:`editlab.lit.edit_eval.EditEvalModule`) adds it itself when given an
``output_dir`` (``configure_callbacks``), so results are written whatever the callbacks config.
The interface is small and explicit: ``test_step`` returns the batch's record rows (a list of
dicts, handed to ``on_test_batch_end`` as ``outputs``) and the module's :attr:`results`
(:class:`EvalResults`) holds every row, the summary and the curve points.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import lightning as L

from editlab.lit.curves import write_curves, write_curves_csv
from editlab.metrics.keys import STAGES, parse_key

log = logging.getLogger(__name__)

__all__ = ["RECORDS", "EvalResults", "ResultsWriter", "format_summary", "merge_record_files", "merge_rows",
           "rank_file", "stage_rows", "write_summary"]

RECORDS = "records.jsonl"


@dataclass
class EvalResults:
    """What an edit-loop run produced on this process: record rows (``records.jsonl`` lines, in the
    order scored), the summary (``{stage}/{metric}`` → value, reduced over processes) and the
    stream's curve points."""

    records: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, float] = field(default_factory=dict)
    curves: list[dict[str, float]] = field(default_factory=list)

    def clear(self) -> None:
        self.records.clear()
        self.summary.clear()
        self.curves.clear()


def rank_file(output_dir: Path, rank: int) -> Path:
    """The records file rank ``rank`` appends to while a multi-process run goes on."""
    return output_dir / f"records.rank{rank}.jsonl"


def _dump(row: dict[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False) + "\n"


def merge_rows(per_rank: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The record rows of every rank in one list, ordered by record index.  Records without an
    index (built in code, index -1) keep the distributed sampler's order: record ``i`` is row
    ``i // W`` of rank ``i % W``, so ties are ordered by row, then rank."""
    keyed = [((math.inf if row.get("index") is None else float(row["index"]), n, rank), row)
             for rank, rows in enumerate(per_rank) for n, row in enumerate(rows)]
    return [row for _, row in sorted(keyed, key=lambda item: item[0])]


def _write_records(rows: list[dict[str, Any]], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(_dump(row) for row in rows)
    os.replace(tmp, path)


def merge_record_files(output_dir: Path, world_size: int) -> int:
    """Merge ``records.rank{r}.jsonl`` (r < world_size) into ``records.jsonl`` (:func:`merge_rows`'
    order) and remove the rank files; the number of records."""
    per_rank = []
    for rank in range(world_size):
        with open(rank_file(output_dir, rank), encoding="utf-8") as fh:
            per_rank.append([json.loads(line) for line in fh if line.strip()])
    rows = merge_rows(per_rank)
    _write_records(rows, output_dir / RECORDS)
    for rank in range(world_size):
        rank_file(output_dir, rank).unlink()
    return len(rows)


def stage_rows(summary: dict[str, float]) -> list[tuple[str, float | None, float | None, float | None]]:
    """``(metric, pre, post, final)`` rows of a summary, metrics in the order they first appear."""
    names: list[str] = []
    for key in summary:
        parts = parse_key(key)
        if parts.stage in STAGES and parts.metric not in names:
            names.append(parts.metric)
    return [(m, summary.get(f"pre/{m}"), summary.get(f"post/{m}"), summary.get(f"final/{m}")) for m in names]


def _has_final(summary: dict[str, float]) -> bool:
    return any(parse_key(k).stage == "final" for k in summary)


def write_summary(summary: dict[str, float], output_dir: Path) -> None:
    """``summary.json`` (every key) and ``summary.csv`` (``metric, pre, post[, final]`` rows)."""
    with open(output_dir / "summary.json", "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2, sort_keys=True)
    with open(output_dir / "summary.csv", "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        final = _has_final(summary)
        writer.writerow(["metric", "pre", "post"] + (["final"] if final else []))
        for metric, *values in stage_rows(summary):
            cells = ["" if v is None else f"{v:.6f}" for v in (values if final else values[:2])]
            writer.writerow([metric, *cells])


def format_summary(summary: dict[str, float]) -> str:
    """A fixed-width table of the stages' metrics followed by the other values (timings, …)."""
    final = _has_final(summary)
    rows = stage_rows(summary)
    name = max([24] + [len(r[0]) for r in rows])
    width = name + (27 if final else 18)
    lines = [f"{'metric':<{name}} {'pre':>8} {'post':>8}" + (f" {'final':>8}" if final else ""), "-" * width]
    for metric, pre, post, after in rows:
        fmt = lambda v: f"{v:8.4f}" if v is not None else f"{'-':>8}"  # noqa: E731
        lines.append(f"{metric:<{name}} {fmt(pre)} {fmt(post)}" + (f" {fmt(after)}" if final else ""))
    extra = {k: v for k, v in summary.items() if parse_key(k).stage not in STAGES}
    if extra:
        lines.append("-" * width)
        lines.extend(f"{k:<33} {v:8.4f}" for k, v in extra.items())
    return "\n".join(lines)


class ResultsWriter(L.Callback):
    """Write the edit loop's results into ``output_dir`` as they come (see the module docstring)."""

    def __init__(self, output_dir: str | os.PathLike[str]) -> None:
        self.output_dir = Path(output_dir)
        self._file: IO[str] | None = None
        self._path: Path | None = None
        self._curve_points = 0

    def on_test_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        rank, world = trainer.global_rank, trainer.world_size
        self._path = self.output_dir / RECORDS if world == 1 else rank_file(self.output_dir, rank)
        self._curve_points = 0
        resumed = getattr(pl_module, "resumed_rows", None)
        if resumed is not None:
            # a resumed stream: the rows of its checkpoint, and none of the batches a kill may have
            # left after it (they are scored again)
            _write_records(resumed, self._path)
            self._file = open(self._path, "a", encoding="utf-8")
            return
        self._file = open(self._path, "w", encoding="utf-8")  # a fresh run: no lines of an older one

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                          dataloader_idx: int = 0) -> None:
        if self._file is None:
            return
        if not isinstance(outputs, list):
            raise TypeError(f"ResultsWriter expects test_step to return the batch's record rows (a list of dicts), "
                            f"got {type(outputs).__name__}")
        self._file.writelines(_dump(row) for row in outputs)
        self._file.flush()
        curves = pl_module.results.curves
        if trainer.is_global_zero and len(curves) != self._curve_points:
            self._curve_points = len(curves)
            write_curves_csv(curves, self.output_dir)

    def on_test_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self._file is None:
            return
        results: EvalResults = pl_module.results
        self._close()
        # rewritten whole: rows gained the stages scored after the stream (final)
        _write_records(results.records, self._path)
        if trainer.world_size > 1:
            # the rows travel to rank 0 over the process group, not through the file system: on
            # several nodes each rank's output_dir is on its own machine
            import torch.distributed as dist

            gathered = [None] * trainer.world_size if trainer.is_global_zero else None
            dist.gather_object(results.records, gathered, dst=0)
            if trainer.is_global_zero:
                rows = merge_rows(gathered)
                _write_records(rows, self.output_dir / RECORDS)
                log.info("merged the records of %d processes: %d records", trainer.world_size, len(rows))
            trainer.strategy.barrier("records")
            self._path.unlink(missing_ok=True)  # this rank's rows are in rank 0's records.jsonl
        if not trainer.is_global_zero:
            return
        write_summary(results.summary, self.output_dir)
        if results.curves:
            write_curves(results.curves, self.output_dir)
        log.info("results: %s", self.output_dir)

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:
        # every finished batch is on disk already (flushed); keep it, write nothing partial
        if self._file is not None:
            log.warning("run stopped (%s): %s keeps the records of the finished batches", type(exception).__name__,
                        self._path)
        self._close()

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
