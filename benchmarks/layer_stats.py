"""Benchmark: ROME/MEMIT key statistics (``editlab.stats.layer_stats``) on SmolLM2-135M.

For layer 5 alone and for layers 3-7 together, over the gensim Wikipedia sample (or the first
``--n-tokens`` tokens of it), prints: wall seconds of the whole call (corpus parsing and
tokenization included), real tokens per second, the "ceiling" — tokens/s of a plain forward of the
same model stopped after the same layer (``Trace(stop=True)``, no accumulation) on the same packed
batches, built beforehand — and the ratio of the two, peak RSS, and the time of a second (cached)
call.  Each configuration runs in its own process (a fresh peak RSS) with an empty cache folder.
EasyEdit's figures for the same model and machine are printed beside ours.

    python benchmarks/layer_stats.py                  # whole sample: minutes per configuration
    python benchmarks/layer_stats.py --n-tokens 20000 # quick

Run it with nothing else on the machine: two cores are easily shared and a busy machine
doubles a figure.  The load averages seen before and after are printed under the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings

import torch

from editlab.data.corpora import WikipediaSample, batch_rows, pack_rows
from editlab.models.arch import arch_for
from editlab.models.packaged import smollm2_135m
from editlab.stats import effective_seq_len, layer_stats
from editlab.tracing import Trace

# EasyEdit (ROME/MEMIT layer_stats), SmolLM2-135M, the same Wikipedia sample, 2 CPU cores
# (figures given in the issue).
EASYEDIT = {"5": {"wall_s": 397.0, "tps": 1527.0, "rss_gb": 2.2}, "3-7": {"wall_s": 1870.0}}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def parse_layers(text: str) -> list[int]:
    if "-" in text:
        first, last = text.split("-")
        return list(range(int(first), int(last) + 1))
    return [int(part) for part in text.split(",")]


def run_child(args: argparse.Namespace) -> dict:
    """One configuration: layer_stats, the cached second call, then the ceiling."""
    layers = parse_layers(args.layers)
    dtype = getattr(torch, args.dtype)
    bundle = smollm2_135m()
    model, tok = bundle.model, bundle.tokenizer
    corpus = WikipediaSample()
    kwargs = dict(n_tokens=args.n_tokens, max_seq_len=args.max_seq_len, batch_tokens=args.batch_tokens,
                  dtype=dtype, cache_dir=args.cache_dir, progress=False)

    start = time.perf_counter()
    result = layer_stats(model, tok, layers, corpus, **kwargs)
    wall = time.perf_counter() - start
    rss = peak_rss_gb()
    tokens = next(iter(result.values())).count

    start = time.perf_counter()
    layer_stats(model, tok, layers, corpus, **kwargs)
    cached = time.perf_counter() - start

    seq = effective_seq_len(model, args.max_seq_len)
    start = time.perf_counter()
    rows = pack_rows(tok, corpus.texts(), seq, args.n_tokens)
    batches = list(batch_rows(rows, max(1, args.batch_tokens // seq)))
    prep = time.perf_counter() - start
    stop_path = arch_for(model).module_path(model, "mlp_out", max(layers))
    start = time.perf_counter()
    with torch.no_grad():
        for ids in batches:
            with Trace(model, [stop_path], stop=True):
                model(input_ids=ids, use_cache=False)
    forward = time.perf_counter() - start
    ceiling_tokens = sum(ids.numel() for ids in batches)
    if ceiling_tokens != tokens:
        raise RuntimeError(f"ceiling ran {ceiling_tokens} tokens, layer_stats counted {tokens}")
    return {"layers": args.layers, "tokens": tokens, "wall_s": wall, "tps": tokens / wall, "prep_s": prep,
            "ceiling_tps": tokens / forward, "rss_gb": rss, "cached_s": cached}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", nargs="+", default=["5", "3-7"], help="layer sets: 5, 3-7, 4,6")
    parser.add_argument("--n-tokens", type=int, default=None, help="cap (default: the whole sample)")
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layers", default="5", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    if args.child:
        print(json.dumps(run_child(args)))
        return

    load_before = os.getloadavg()
    rows = []
    for config in args.configs:
        with tempfile.TemporaryDirectory(prefix="editlab-bench-stats-") as cache:
            command = [sys.executable, __file__, "--child", "--layers", config, "--cache-dir", cache,
                       "--max-seq-len", str(args.max_seq_len), "--batch-tokens", str(args.batch_tokens),
                       "--dtype", args.dtype]
            if args.n_tokens is not None:
                command += ["--n-tokens", str(args.n_tokens)]
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    load_after = os.getloadavg()

    sample = "whole gensim Wikipedia sample" if args.n_tokens is None else f"first {args.n_tokens:,} tokens"
    print(f"layer_stats on SmolLM2-135M, {sample}, rows of {args.max_seq_len} tokens, "
          f"{args.batch_tokens} tokens/batch, {args.dtype} kᵀk, torch threads {torch.get_num_threads()}")
    header = (f"{'layers':<7} {'tokens':>8} {'wall s':>7} {'tok/s':>7} {'ceiling':>8} {'ratio':>6} "
              f"{'prep s':>6} {'peak RSS':>8} {'cached s':>8} | "
              f"EasyEdit: {'wall s':>7} {'tok/s':>6} {'RSS':>6}")
    print(header)
    print("-" * len(header))
    for row in rows:
        ref = EASYEDIT.get(row["layers"], {})
        ref_wall = f"{ref['wall_s']:7.0f}" if "wall_s" in ref else f"{'-':>7}"
        ref_tps = f"{ref['tps']:6.0f}" if "tps" in ref else f"{'-':>6}"
        ref_rss = f"{ref['rss_gb']:4.1f} GB" if "rss_gb" in ref else f"{'-':>6}"
        print(f"{row['layers']:<7} {row['tokens']:>8,} {row['wall_s']:7.1f} {row['tps']:7.0f} "
              f"{row['ceiling_tps']:8.0f} {row['tps'] / row['ceiling_tps']:6.2f} {row['prep_s']:6.1f} "
              f"{row['rss_gb']:5.2f} GB {row['cached_s']:8.2f} | {'':9} {ref_wall} {ref_tps} {ref_rss}")
    print("tok/s: real tokens per second of the whole call (corpus parsing + tokenization included); "
          "ceiling: a plain forward stopped after the same layer on the same pre-built batches; "
          "prep s: time to parse + tokenize + pack the corpus alone.")
    print(f"load average (1/5/15 min) before: {' '.join(f'{x:.2f}' for x in load_before)}, "
          f"after: {' '.join(f'{x:.2f}' for x in load_after)}")


if __name__ == "__main__":
    main()
