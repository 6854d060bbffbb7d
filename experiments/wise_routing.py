"""Where a WISE stream loses its edits: the router, or the side memory itself.

Reads one stream checkpoint of a WISE run (``RUN/stream/batch_NNNNNN.pt``, written by the edit loop
every ``stream.checkpoint_every`` edits) and, for the records edited up to that point, asks of each
teacher-forced input (edit prompt + new answer, first paraphrase + new answer, first locality
question + its answer):

* ``routed``: the fraction of inputs the checkpoint's adapter sends to a side memory (score at or
  above its threshold) rather than to the main memory, and the median activation score;
* ``TF routed``: teacher-forced token accuracy of the target with the adapter as the stream left it
  (what the stream's scores measure);
* ``TF side forced``: the same with every input sent to the current side memory, whatever its score
  (does the side weight still hold the edit?).

For locality the TF columns are accuracy against the probe's own answer (the stream's
``locality_acc``), not agreement with the unedited model.  A fourth row, ``irrelevant``, routes the
first texts of the method's ``irrelevant_corpus`` (those the stream trained the router to leave
alone, cut to ``irrelevant_max_tokens`` as in training; last word as the target) and has no TF columns.

    python experiments/wise_routing.py experiments/runs/wise_smollm2_zsre_stream/RUN --checkpoint 100

The model and records are those of the run's config (``config.yaml``); nothing is written.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from editlab.data.collate import encode_pairs
from editlab.methods.wise import WiseAdapter, activation_score
from editlab.models.arch import get_module


def _inputs(records, kind, irrelevant=()):
    if kind == "irrelevant":  # the training corpus' rows: scored for routing only
        return [tuple(t.rsplit(" ", 1)) for t in irrelevant if " " in t.strip()]
    if kind == "reliability":
        return [(r.prompt, r.target_new) for r in records]
    if kind == "generalization":
        return [(r.rephrase_prompts[0], r.target_new) for r in records if r.rephrase_prompts]
    return [(r.locality[0].prompt, r.locality[0].target) for r in records if r.locality]


@torch.no_grad()
def measure(model, tokenizer, host, adapter: WiseAdapter, pairs, chunk: int = 16) -> dict:
    routed, scores, acc_routed, acc_forced = [], [], [], []
    for start in range(0, len(pairs), chunk):
        part = pairs[start:start + chunk]
        batch = encode_pairs(tokenizer, [p for p, _ in part], [t for _, t in part])
        real = batch.attention_mask.bool()
        force = False

        def hook(module, args, output):
            choice, outs, base = adapter.route(args[0].float(), real)
            if force:  # the current side memory (the first of a Retrieve adapter) for every row
                return outs[0].to(output.dtype)
            routed.extend((choice >= 0).float().tolist())
            scores.extend(activation_score(outs[0], base, adapter.activation, real=real, infer=True).tolist())
            return output + adapter.combine(choice, outs, base).to(output.dtype)

        handle = host.register_forward_hook(hook)
        try:
            for force in (False, True):
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                pred = logits.gather(1, batch.positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1])).argmax(-1)
                hit = ((pred == batch.target_ids) & batch.target_mask.bool()).sum(-1).float()
                (acc_forced if force else acc_routed).extend((hit / batch.target_mask.sum(-1).clamp(min=1)).tolist())
        finally:
            handle.remove()
    return {"n": len(pairs), "routed": sum(routed) / len(routed), "score_median": statistics.median(scores),
            "tf_routed": sum(acc_routed) / len(acc_routed), "tf_side_forced": sum(acc_forced) / len(acc_forced)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--checkpoint", type=int, required=True, help="edits done at the checkpoint (its file's number)")
    args = ap.parse_args()
    cfg = OmegaConf.load(args.run / "config.yaml")
    ckpt = torch.load(args.run / "stream" / f"batch_{args.checkpoint:06d}.pt", weights_only=True, map_location="cpu")
    bundle = instantiate(cfg.model)
    model, tokenizer = bundle.model, bundle.tokenizer
    (patch,) = ckpt["session"]["patches"]
    host = get_module(model, patch["host"])
    a = patch["args"]
    adapter = WiseAdapter(host, a["transposed"], a["activation"], a["retrieve"], [tuple(m) for m in a["memories"]])
    records = instantiate(cfg.data.test)()[: ckpt["rows"]]
    method = instantiate(cfg.method)
    irrelevant = [tokenizer.decode(ids[: method.irrelevant_max_tokens], skip_special_tokens=True)  # as in training
                  for ids in tokenizer(method.irrelevant_texts()[: ckpt["rows"]])["input_ids"]]
    print(f"{args.run} after {ckpt['rows']} edits; thresholds {[round(t, 3) for t in adapter.thresholds]}")
    print(f"{'input':<15} {'n':>4} {'routed':>7} {'score med':>10} {'TF routed':>10} {'TF side forced':>15}")
    for kind in ("reliability", "generalization", "locality", "irrelevant"):
        m = measure(model, tokenizer, host, adapter, _inputs(records, kind, irrelevant))
        tf = (f"{'-':>10} {'-':>15}" if kind == "irrelevant"
              else f"{m['tf_routed']:>10.3f} {m['tf_side_forced']:>15.3f}")
        print(f"{kind:<15} {m['n']:>4} {m['routed']:>7.3f} {m['score_median']:>10.3f} {tf}")


if __name__ == "__main__":
    main()
