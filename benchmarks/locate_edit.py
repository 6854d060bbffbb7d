"""Benchmark: ROME, MEMIT and KN on SmolLM2-135M — seconds per edit, peak memory, edit quality.

The settings are those of the EasyEdit comparison in issue 9 (SmolLM2-135M fp32, first records of
``counterfact/counterfact-val.json``, EasyEdit's llama-7b hyperparameters otherwise):

* ROME: layer 5 down projection, 25 value steps, lr 0.5, 21 context templates, ``mom2_adjustment``
  on (statistics cached beforehand, not timed); ``--rome-edits`` edits one at a time;
* MEMIT: layers 3-7, ``--memit-edits`` requests in one batch (time per edit = call time / n),
  λ = ``--memit-lambda`` (editlab's SmolLM2 setting, 2000; EasyEdit's llama setting is 15000 —
  the time does not depend on it);
* KN: ``--kn-edits`` edits one at a time.

Each method runs in its own process (a fresh peak RSS).  Quality is EasyEdit's: rewrite and
rephrase accuracy are teacher-forced token accuracies of the new target, locality is the share of
locality-answer tokens whose argmax prediction is unchanged by the edit.  Layer statistics are
benchmarked by ``benchmarks/layer_stats.py`` (tokens/s against the truncated-forward ceiling).

    python benchmarks/locate_edit.py                       # all three (minutes)
    python benchmarks/locate_edit.py --methods rome --rome-edits 10

Run it with nothing else on the machine (two cores are easily shared); load averages are printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings

import torch

# EasyEdit, same model and kind of machine, measured alone (figures given in issue 9)
EASYEDIT = {
    "rome": {"s_per_edit": 22.4, "rss_gb": 2.1, "rewrite": 1.0, "rephrase": 0.40, "locality": 0.80},
    "memit": {"s_per_edit": 9.6, "rss_gb": 2.3, "rewrite": 0.30},
    "kn": {"s_per_edit": 11.9},
}
TARGET = {"rome": 6.0, "memit": 2.0, "kn": 3.0}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _quality(model, tok, records, edit_ctx) -> dict[str, float]:
    from editlab.evaluation.teacher_forced import score_pairs

    def acc(scores):
        hits = (scores.pred == scores.target) & scores.mask
        return (hits.sum(1).float() / scores.mask.sum(1).clamp(min=1)).tolist()

    loc = [(r.locality[0].prompt, r.locality[0].target) for r in records if r.locality]
    pre_loc = score_pairs(model, tok, [p for p, _ in loc], [t for _, t in loc]) if loc else None
    rewrite, rephrase, locality = [], [], []
    for group in edit_ctx:
        recs = group["records"]
        with group["apply"]():
            rewrite += acc(score_pairs(model, tok, [r.prompt for r in recs], [r.target_new for r in recs]))
            reph = [(r.rephrase_prompts[0], r.target_new) for r in recs if r.rephrase_prompts]
            if reph:
                rephrase += acc(score_pairs(model, tok, [p for p, _ in reph], [t for _, t in reph]))
            if pre_loc is not None:
                idx = [i for i, r in enumerate(records) if r.locality and r in recs]
                post = score_pairs(model, tok, [loc[i][0] for i in range(len(loc)) if i in idx],
                                   [loc[i][1] for i in range(len(loc)) if i in idx])
                same = (post.pred == pre_loc.pred[idx]) & post.mask
                locality += (same.sum(1).float() / post.mask.sum(1).clamp(min=1)).tolist()
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {"rewrite": mean(rewrite), "rephrase": mean(rephrase), "locality": mean(locality)}


def run_child(args: argparse.Namespace) -> dict:
    from editlab.data.loaders import load_counterfact_easyedit
    from editlab.methods.base import applied
    from editlab.models.packaged import smollm2_135m

    bundle = smollm2_135m()
    model, tok = bundle.model, bundle.tokenizer
    method = args.child
    if method == "rome":
        from editlab.methods.rome import ROME

        editor = ROME(layers=[5], v_num_grad_steps=25, v_lr=0.5, v_weight_decay=1e-3, clamp_norm_factor=4.0,
                      kl_factor=0.0625, mom2_adjustment=True)
        n = args.rome_edits
    elif method == "memit":
        from editlab.methods.memit import MEMIT

        editor = MEMIT(layers=[3, 4, 5, 6, 7], v_num_grad_steps=25, v_lr=0.5, v_weight_decay=1e-3,
                       clamp_norm_factor=4.0, kl_factor=0.0625, mom2_update_weight=args.memit_lambda)
        n = args.memit_edits
    else:
        from editlab.methods.kn import KN

        editor = KN()
        n = args.kn_edits
    records = load_counterfact_easyedit("counterfact/counterfact-val.json", limit=n)
    # untimed set-up: statistics and templates are cached per model
    if hasattr(editor, "templates"):
        editor.templates(model, tok)
        editor.stats.mom2(model, tok, editor.layers)
    base_rss = peak_rss_gb()
    times, groups = [], []
    batches = [records] if method == "memit" else [[r] for r in records]
    for batch in batches:
        start = time.perf_counter()
        deltas = editor.compute_deltas(model, tok, batch)
        seconds = time.perf_counter() - start
        times.append(seconds / len(batch))  # MEMIT: the batch call divided over its requests
        groups.append({"records": batch, "apply": (lambda d=deltas: applied(model, d))})
        logging.info("%s: %d record(s) in %.2f s", method, len(batch), seconds)
    quality = _quality(model, tok, records, groups)
    return {
        "method": method, "n": len(records), "s_per_edit": statistics.median(times),
        "times": times, "rss_gb": peak_rss_gb(), "rss_before_gb": base_rss, **quality,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="rome,memit,kn")
    parser.add_argument("--rome-edits", type=int, default=10)
    parser.add_argument("--memit-edits", type=int, default=100)
    parser.add_argument("--kn-edits", type=int, default=10)
    parser.add_argument("--memit-lambda", type=float, default=2000.0,
                        help="MEMIT's mom2_update_weight (editlab's SmolLM2 setting 2000; EasyEdit llama: 15000)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
        warnings.filterwarnings("ignore")
        json.dump(run_child(args), sys.stdout)
        return
    load_before = os.getloadavg()
    rows = []
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--child", method, "--rome-edits", str(args.rome_edits),
               "--memit-edits", str(args.memit_edits), "--kn-edits", str(args.kn_edits),
               "--memit-lambda", str(args.memit_lambda)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    load_after = os.getloadavg()
    header = (f"{'method':6} {'edits':>5} {'s/edit (median)':>15} {'target':>6} {'EasyEdit':>8} {'peak RSS':>8} "
              f"{'rewrite':>7} {'rephrase':>8} {'locality':>8} | EasyEdit rewrite/rephrase/locality")
    lines = [header, "-" * len(header)]
    for r in rows:
        ee = EASYEDIT[r["method"]]
        ee_q = "/".join(f"{ee[k]:.2f}" if k in ee else "-" for k in ("rewrite", "rephrase", "locality"))
        lines.append(
            f"{r['method']:6} {r['n']:>5} {r['s_per_edit']:>15.2f} {TARGET[r['method']]:>6.1f} "
            f"{ee['s_per_edit']:>8.1f} {r['rss_gb']:>6.2f}GB {r['rewrite']:>7.3f} {r['rephrase']:>8.3f} "
            f"{r['locality']:>8.3f} | {ee_q}"
        )
    lines.append(f"MEMIT lambda {args.memit_lambda:g}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
                 f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    lines.append("quality: teacher-forced token accuracy (rewrite, rephrase) and EasyEdit locality "
                 "(argmax agreement with the unedited model)")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
