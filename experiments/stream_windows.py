"""Per-window scores of an edit stream: how edits early and late in a stream fare.

Reads a run directory's ``records.jsonl`` (written by the edit loop) and prints, for consecutive
windows of records in stream order, the mean of each metric at each stage: ``pre`` (unedited
model), ``post`` (right after the record's own edit, earlier edits applied) and ``final`` (after
the whole stream; present when the run set ``module.score_after_stream=true``).  A record's
``final`` efficacy below its ``post`` efficacy is an edit that later edits overwrote.

    python experiments/stream_windows.py experiments/runs/rome_smollm2_sequential/<time> --window 50
    python experiments/stream_windows.py RUN --window 50 --metrics efficacy_score,reliability --markdown

Scoring modes: ``*_score`` / ``*_magnitude`` are CounterFact probability comparisons; the other
metrics are teacher-forced token accuracies (``locality``: argmax agreement with the unedited model).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

DEFAULT_METRICS = ("efficacy_score", "paraphrase_score", "neighborhood_score", "reliability", "generalization",
                   "locality")
STAGES = ("pre", "post", "final")


def load_rows(run: Path) -> list[dict]:
    path = run / "records.jsonl" if run.is_dir() else run
    if not path.is_file():
        raise FileNotFoundError(f"no records.jsonl at {path}")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return sorted(rows, key=lambda r: (r.get("batch", 0), r.get("index", 0)))


def mean(values: list[float]) -> float:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return sum(present) / len(present) if present else math.nan


def window_table(rows: list[dict], window: int, metrics: tuple[str, ...]) -> list[dict]:
    """One entry per window (and one for all records): ``{"records": "1-50", "stage/metric": mean}``."""
    spans = [(f"{i + 1}-{min(i + window, len(rows))}", i, min(i + window, len(rows))) for i in range(0, len(rows), window)]
    if len(spans) > 1:
        spans.append(("all", 0, len(rows)))
    out = []
    for label, lo, hi in spans:
        entry: dict = {"records": label}
        for metric in metrics:
            for stage in STAGES:
                entry[f"{stage}/{metric}"] = mean([(r.get(stage) or {}).get(metric) for r in rows[lo:hi]])
        out.append(entry)
    return out


def render(table: list[dict], metrics: tuple[str, ...], markdown: bool) -> str:
    stages = [s for s in STAGES if any(not math.isnan(e[f"{s}/{m}"]) for e in table for m in metrics)]
    head = ["records"] + [f"{m} {s}" for m in metrics for s in stages]
    body = [[e["records"]] + [f"{e[f'{s}/{m}']:.3f}" for m in metrics for s in stages] for e in table]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in [head] + body)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="run directory (or its records.jsonl)")
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--metrics", default=",".join(DEFAULT_METRICS))
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    if args.window < 1:
        parser.error("--window must be at least 1")
    metrics = tuple(m for m in args.metrics.split(",") if m)
    rows = load_rows(args.run)
    sys.stdout.write(render(window_table(rows, args.window, metrics), metrics, args.markdown) + "\n")


if __name__ == "__main__":
    main()
