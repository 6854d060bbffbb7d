"""One markdown table for several edit-stream runs: what is left after the whole stream.

For each run folder (``python -m editlab.train experiment=…`` with ``stream.*``) it reads
``summary.json`` and ``config.yaml`` and prints one row: the method, the stream (edits, batch size),
the ``final/…`` scores (every edited record scored after the whole stream), the unedited model's
scores of the same records (``pre/…``) and general ability before and after the stream, and the
median seconds per edit.

    python experiments/lifelong_table.py experiments/runs/alphaedit_smollm2_counterfact/<time> \
        experiments/runs/memit_smollm2_stream500/<time> --mode pc
    python experiments/lifelong_table.py RUN... --mode tf          # teacher-forced columns
    python experiments/lifelong_table.py RUN... --mode generation  # free generation (exact match)

Scoring modes: ``pc`` = CounterFact probability comparison (efficacy / paraphrase / neighbourhood
score: the share of prompts where the new target is likelier than the true one, and for neighbours
the true one likelier than the new one); ``tf`` = teacher-forced token accuracy (reliability,
generalization; locality = argmax agreement with the unedited model); ``generation`` = greedy
generation, exact match with the target (``…@generation_em``, or ``…@generation_chat_em`` /
``…@generation_qa_em`` for a run that framed its prompts as a chat or a question; the run must have
scored that mode).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import yaml

MODES = {
    "pc": (("efficacy", "efficacy_score"), ("paraphrase", "paraphrase_score"),
           ("neighbourhood", "neighborhood_score")),
    "tf": (("reliability", "reliability"), ("generalization", "generalization"), ("locality", "locality")),
    "generation": (("reliability", "reliability@{label}_em"),
                   ("generalization", "generalization@{label}_em"),
                   ("locality", "locality@{label}_em")),
}
GENERATION_LABELS = ("generation", "generation_qa", "generation_chat")  # plain, question-answer, chat framing


def generation_label(summary: dict) -> str:
    """The generation framing a run scored (its metric keys' label); the plain one if none."""
    found = [label for label in GENERATION_LABELS if f"final/reliability@{label}_em" in summary]
    return found[-1] if found else "generation"


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def row(run: Path, mode: str) -> list[str]:
    summary_path = run / "summary.json"
    if not summary_path.is_file():
        raise SystemExit(f"{run}: no summary.json (the run has not finished)")
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    method = config["method"]["_target_"].rpartition(".")[2]
    if config["method"].get("r_rome"):
        method = "r-ROME"
    batch = int(config["data"].get("batch_size") or 1)
    edits = sum(1 for line in (run / "records.jsonl").read_text(encoding="utf-8").splitlines() if line.strip())
    keys = [key.format(label=generation_label(summary)) for _, key in MODES[mode]]
    cells = [method, f"{edits} ({edits // batch} × {batch})"]
    for key in keys:
        cells.append(_fmt(summary.get(f"final/{key}")))
    cells.append(_fmt(summary.get(f"pre/{keys[2]}")))
    ppl_pre, ppl = summary.get("pre/general_perplexity"), summary.get("final/general_perplexity")
    cells.append(f"{_fmt(ppl, 2)} ({_fmt(ppl / ppl_pre if ppl and ppl_pre else None, 3)}×)")
    cells.append(f"{_fmt(summary.get('final/general_piqa_acc'))} / {_fmt(summary.get('pre/general_piqa_acc'))}")
    seconds = summary.get("time/edit_seconds_median")
    cells.append(_fmt(seconds / batch if seconds is not None else None, 3))
    return cells


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--mode", choices=sorted(MODES), default="pc")
    args = parser.parse_args(argv)
    names = [name for name, _ in MODES[args.mode]]
    header = ["method", "edits (batches × size)", *(f"final {n} ({args.mode.upper()})" for n in names),
              f"unedited {names[2]} ({args.mode.upper()})", "perplexity after (× unedited)",
              "PIQA acc after / unedited", "s/edit (median)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row(run, args.mode)) + " |" for run in args.runs]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
