"""Benchmark: seconds of one general-ability pass (perplexity + PIQA) on an unedited model.

Runs :class:`editlab.evaluation.general.GeneralAbility` with the edit loop's defaults (the first 16,384
tokens of the offline Wikipedia sample in rows of 256; the first 200 PIQA validation items) and
prints the time of each part, tokens/s, questions/s and the scores.  The edit loop runs this pass
once before editing, once after the last edit and, with ``score_after_stream``, once more.

    python benchmarks/general_ability.py                        # SmolLM2-135M
    python benchmarks/general_ability.py --model tiny_llama     # quick check on a tiny random model
    python benchmarks/general_ability.py --n-tokens 4096 --piqa-examples 50
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import torch

from editlab.evaluation.general import GeneralAbility
from editlab.models.packaged import smollm2_135m
from editlab.models.tiny import tiny_model


def _load(name: str):
    if name == "smollm2":
        return smollm2_135m()
    if name.startswith("tiny_"):
        return tiny_model(name.removeprefix("tiny_"), seed=0)
    raise ValueError(f"unknown model {name!r}: smollm2 or tiny_<model_type>")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2 (default) or tiny_<model_type>, e.g. tiny_llama")
    parser.add_argument("--n-tokens", type=int, default=16384)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="rows per perplexity forward")
    parser.add_argument("--piqa-examples", type=int, default=200)
    parser.add_argument("--choice-batch-size", type=int, default=32)
    parser.add_argument("--device", default=None, help="e.g. cuda (default: where the model was loaded)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)

    bundle = _load(args.model)
    model, tokenizer = bundle.model, bundle.tokenizer
    if args.device:
        model.to(args.device)
    ev = GeneralAbility(n_tokens=args.n_tokens, seq_len=args.seq_len, batch_size=args.batch_size,
                        piqa_examples=args.piqa_examples, choice_batch_size=args.choice_batch_size,
                        data_dir=args.data_dir)
    t0 = time.perf_counter()
    ev.rows(model, tokenizer)
    ev.items()
    t_data = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        t1 = time.perf_counter()
        ppl = ev.perplexity(model, tokenizer)
        t2 = time.perf_counter()
        piqa = ev.piqa_accuracy(model, tokenizer)
        t3 = time.perf_counter()
    print(f"model {args.model} on {next(model.parameters()).device}")
    print(f"{'part':<28} {'seconds':>8} {'rate':>16} {'result':>24}")
    print(f"{'data (tokenise, load; once)':<28} {t_data:8.2f}")
    print(f"{'perplexity':<28} {t2 - t1:8.2f} {ppl['tokens'] / (t2 - t1):10.0f} tok/s "
          f"{'ppl ' + format(ppl['perplexity'], '.3f'):>24}")
    print(f"{'PIQA':<28} {t3 - t2:8.2f} {piqa['piqa_examples'] / (t3 - t2):10.1f} q/s   "
          f"{'acc ' + format(piqa['piqa_acc'], '.3f') + ' / norm ' + format(piqa['piqa_acc_norm'], '.3f'):>24}")
    print(f"{'one general pass':<28} {t3 - t1:8.2f}")


if __name__ == "__main__":
    main()
