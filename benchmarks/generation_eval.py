"""Benchmark: generation-mode evaluation throughput next to teacher-forced, on the same records.

For the first N zsRE records (``zsre/zsre_mend_eval_portability_gpt4.json``) on the unedited
model, both modes score the same probes (reliability, generalization, portability, locality)
the way the edit loop does:

* teacher-forced: one batched forward per chunk of (prompt, target) sequences
  (:func:`editlab.evaluation.teacher_forced.score_pairs`);
* generation: batched greedy answers (KV cache, left padding, per-row stop at EOS / newline /
  sentence end or the target-derived cap; :func:`editlab.evaluation.generation.greedy_generate`), scored by
  exact match, token F1 and containment.

Prints records/s of each, the ratio (the issue asks generation to stay within 3x of teacher
forcing) and the unedited model's scores in both modes.

    python benchmarks/generation_eval.py                      # SmolLM2-135M, 100 records
    python benchmarks/generation_eval.py --records 20 --framing question_answer
    python benchmarks/generation_eval.py --model tiny_llama   # quick check on a tiny random model
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import torch

from editlab.data.loaders import load_zsre_mend
from editlab.evaluation.generation import FRAMINGS
from editlab.evaluation.probes import build_plan
from editlab.evaluation.scorer import ScoringSettings, build_scorer
from editlab.metrics import functional as F
from editlab.models.packaged import smollm2_135m
from editlab.models.tiny import tiny_model

log = logging.getLogger(__name__)


def _load(name: str):
    if name == "smollm2":
        return smollm2_135m()
    if name.startswith("tiny_"):
        return tiny_model(name.removeprefix("tiny_"), seed=0)
    raise ValueError(f"unknown model {name!r}: smollm2 or tiny_<model_type>")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100)
    parser.add_argument("--model", default="smollm2", help="smollm2 (default) or tiny_<model_type>, e.g. tiny_llama")
    parser.add_argument("--framing", default="plain", choices=sorted(FRAMINGS))
    parser.add_argument("--chunk-size", type=int, default=64, help="sequences per teacher-forced forward")
    parser.add_argument("--gen-chunk-size", type=int, default=32, help="prompts per batched generation")
    parser.add_argument("--margin", type=int, default=5, help="answer cap = target tokens + margin")
    parser.add_argument("--examples", type=int, default=3, help="reliability answers to show")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)

    bundle = _load(args.model)
    records = load_zsre_mend("zsre/zsre_mend_eval_portability_gpt4.json", limit=args.records, data_dir=args.data_dir)
    scorer = build_scorer(bundle.tokenizer, ScoringSettings(
        chunk_size=args.chunk_size, generation_chunk_size=args.gen_chunk_size, generation_margin=args.margin,
        generation_framing=args.framing, scoring_modes=["teacher_forced", "generation"]))
    generation, model = scorer.generation, bundle.model
    plan = build_plan(records, comparison=False)
    gplan = generation.plan(records)
    with torch.no_grad():
        scorer.scores(model, build_plan(records[:2], comparison=False))  # warm-up (allocator, kernels)
        generation.generate(model, generation.plan(records[:2]))
        t0 = time.perf_counter()
        scores = scorer.scores(model, plan)
        tf_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        texts = generation.generate(model, gplan)
        gen_s = time.perf_counter() - t0

    n = len(records)
    label = generation.label
    print(f"\n{args.model}, first {n} records of zsre_mend_eval_portability_gpt4.json, unedited model, "
          f"torch threads {torch.get_num_threads()}, framing {args.framing}, answer cap = target tokens + "
          f"{args.margin}")
    print(f"{'mode':<16} {'sequences':>10} {'seconds':>9} {'records/s':>10} {'vs teacher-forced':>18}")
    print("-" * 67)
    print(f"{'teacher_forced':<16} {len(plan):>10} {tf_s:>9.2f} {n / tf_s:>10.2f} {1.0:>17.2f}x")
    print(f"{label:<16} {len(gplan):>10} {gen_s:>9.2f} {n / gen_s:>10.2f} {gen_s / tf_s:>17.2f}x")
    print("-" * 67)
    verdict = "within" if gen_s <= 3 * tf_s else "NOT within"
    print(f"generation mode is {gen_s / tf_s:.2f}x teacher-forced time: {verdict} the 3x target")
    print(f"mean generated answer: {sum(len(t) for t in texts) / max(1, len(texts)):.1f} characters; "
          f"empty answers: {sum(not t for t in texts)}/{len(texts)}")
    rel_seq, _, rel_refs, rel_prompts = gplan.families["reliability"]
    for i, ref, prompt in list(zip(rel_seq.tolist(), rel_refs, rel_prompts))[: args.examples]:
        print(f"  {prompt!r} -> {texts[i]!r} (reference {ref!r})")

    print(f"\n{'family':<16} {'teacher_forced':>14} " + " ".join(f"{label + '_' + k:>20}" for k in F.GENERATION_SCORES))
    for family, (seq, rec) in plan.accuracy.items():
        s = seq.tolist()
        tf = F.token_accuracy(scores.pred[s], scores.target[s], scores.mask[s])
        tf_mean = float(F.segment_mean(tf, rec, n)[0].nanmean())
        gseq, grec, refs, _ = gplan.families[family]
        answers = [texts[i] for i in gseq.tolist()]
        gen = [float(F.segment_mean(F.generation_scores(answers, refs, k), grec, n)[0].nanmean())
               for k in F.GENERATION_SCORES]
        name = "locality_acc" if family == "locality" else family
        print(f"{name:<16} {tf_mean:>14.3f} " + " ".join(f"{v:>20.3f}" for v in gen))


if __name__ == "__main__":
    main()
