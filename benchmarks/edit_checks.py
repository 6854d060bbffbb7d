"""Benchmark: what the result checks of an edit cost, against the edit itself, on SmolLM2-135M.

Every edit the session installs is checked after it is written (editlab/methods/base.py): the
edited weights must be finite, and :func:`~editlab.methods.base.verify_outputs` runs one
teacher-forced forward over the batch's edit prompts (finite logits, a residual stream whose mean
square does not overflow).  This prints, per batch size, the median seconds of that check and of
an FT-L edit of the same batch (editlab's SmolLM2 preset, records from
``counterfact/counterfact-val.json``), and their ratio, measured in one run.

    python benchmarks/edit_checks.py                 # batches of 1, 10, 100
    python benchmarks/edit_checks.py --batches 1 --repeats 3

Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()

    from editlab.data.loaders import load_counterfact_easyedit, resolve_data_dir
    from editlab.methods.base import WeightEditSession, verify_outputs
    from editlab.methods.ft import FTL
    from editlab.models.packaged import smollm2_135m

    torch.manual_seed(0)
    bundle = smollm2_135m()
    data_dir = resolve_data_dir(args.data_dir)
    records = load_counterfact_easyedit(os.path.join(data_dir, "counterfact", "counterfact-val.json"),
                               limit=max(args.batches))
    editor = FTL(layers=[5], num_steps=25)
    print(f"{'batch':>6} {'edit s':>9} {'check s':>9} {'check/edit':>11}  (medians of {args.repeats}; "
          f"loadavg {os.getloadavg()[0]:.2f})")
    for n in args.batches:
        batch = records[:n]
        edit_s, check_s = [], []
        for _ in range(args.repeats):
            session = WeightEditSession(bundle.model)
            start = time.perf_counter()
            edit = editor.edit_in(session, bundle.tokenizer, batch)
            session.apply(edit)
            edit_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            verify_outputs(session, bundle.tokenizer, batch)
            check_s.append(time.perf_counter() - start)
            session.restore()
        e, c = statistics.median(edit_s), statistics.median(check_s)
        print(f"{n:>6} {e:>9.3f} {c:>9.3f} {c / e:>11.3f}")


if __name__ == "__main__":
    main()
