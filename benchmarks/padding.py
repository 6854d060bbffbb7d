"""Benchmark: grouping a batch by length before its forwards (UltraEdit's features, the result check).

A CounterFact batch of 100 edit prompts + targets is mostly padding when run as one padded batch
(SmolLM2: 9.5 tokens per pair on average, 15-17 in the longest).  Two places group pairs of similar
length into chunks instead:

* ``UltraEdit.features`` (one forward and backward over the batch's edit pairs): ``micro_batch``
  records per forward, grouped by length; ``--micro-batches`` lists the values timed (the batch
  size itself is one forward over all records in their order, as before);
* :func:`editlab.scoring.broken_pairs` (the result check of every edit, ``verify_outputs``): chunks
  of 32 pairs of similar length, timed against chunks of 32 consecutive pairs (each such chunk
  passed alone, which is what the function did before it sorted).

Every variant runs ``--repeats`` times, alternating, in one process on the same records and model,
so the ratios hold under the machine's load at that moment; the table gives medians and each
variant's time relative to the first row of its part.

    python benchmarks/padding.py                       # SmolLM2-135M, 100 counterfact-train records
    python benchmarks/padding.py --records 100 --repeats 5 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2_135m", help="an editlab/configs/model name")
    parser.add_argument("--data", default="counterfact/counterfact-train.json")
    parser.add_argument("--data-dir", default=None, help="the data folder (default: editlab's, ../shared/data)")
    parser.add_argument("--records", type=int, default=100)
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import hydra

    from editlab.data.loaders import load_counterfact_easyedit
    from editlab.edit import build_editor, compose
    from editlab.scoring import broken_pairs

    cfg = compose(args.model, f"ultraedit/{args.model}", [])
    editor = build_editor(cfg.method, None)
    bundle = hydra.utils.instantiate(cfg.model)
    model, tok = bundle.model, bundle.tokenizer
    records = load_counterfact_easyedit(args.data, limit=args.records, data_dir=args.data_dir)
    prompts, targets = [r.prompt for r in records], [r.target_new for r in records]

    def features(micro_batch: int) -> None:
        editor.micro_batch = micro_batch
        editor.features(model, tok, records)

    def check_in_order() -> None:
        for lo in range(0, len(prompts), 32):
            broken_pairs(model, tok, prompts[lo:lo + 32], targets[lo:lo + 32], blocks_of=model)

    def check_grouped() -> None:
        broken_pairs(model, tok, prompts, targets, blocks_of=model)

    parts = {
        "UltraEdit features": {f"one forward over {len(records)} (in order)": lambda: features(len(records)),
                               **{f"micro-batches of {m}, by length": (lambda m=m: features(m))
                                  for m in args.micro_batches}},
        "result check (broken_pairs)": {"chunks of 32 in order": check_in_order,
                                        "chunks of 32, by length": check_grouped},
    }
    for variants in parts.values():  # warm-up: first calls allocate
        for run in variants.values():
            run()
    times = {part: {name: [] for name in variants} for part, variants in parts.items()}
    for _ in range(args.repeats):
        for part, variants in parts.items():
            for name, run in variants.items():
                start = time.perf_counter()
                run()
                times[part][name].append(time.perf_counter() - start)

    load = os.getloadavg()[0]
    print(f"{args.model}, {len(records)} records of {args.data}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), {args.repeats} alternating repeats, load average {load:.2f}\n")
    print("| part | variant | median s | × first row |")
    print("|---|---|---|---|")
    for part, variants in times.items():
        base = None
        for name, values in variants.items():
            median = statistics.median(values)
            base = base or median
            print(f"| {part} | {name} | {median:.2f} | {median / base:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
