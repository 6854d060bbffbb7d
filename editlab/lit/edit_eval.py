"""The edit loop: a LightningModule that scores each batch of records before and after an edit.

Per test batch (a list of :class:`~editlab.data.records.EditRecord`):

1. the editor callback (:class:`editlab.lit.callbacks.EditorCallback`) computes the edit and
   applies it through :attr:`EditEvalModule.session` (``on_test_batch_start``);
2. :meth:`EditEvalModule.test_step` scores the batch on the *original* weights (the session is
   suspended, so in a sequential stream the pre-edit state is still that of the unedited model),
   then on the edited weights;
3. the callback restores the weights bit-exactly (``on_test_batch_end``) unless the run is
   sequential, in which case edits accumulate and are undone at the end of the run.

With ``score_after_stream`` every record of the run is scored once more at the end, on the model
as the whole edit stream left it (stage ``final``).  In a sequential stream ``post/…`` is the score
right after a record's own edit and ``final/…`` the score after all edits: the gap is forgetting.

Metrics are torchmetrics objects (one ``MetricCollection`` per stage, keys ``pre/…``, ``post/…``);
results go to ``records.jsonl`` (one line per record: every metric pre and post, edit time),
``summary.json`` and ``summary.csv`` in ``output_dir``, and to the configured Lightning loggers.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from editlab.data.records import EditRecord
from editlab.lit.probes import ProbePlan, build_plan
from editlab.methods.base import WeightEditSession
from editlab.metrics import functional as F
from editlab.metrics.edit import build_edit_metrics, computed
from editlab.models.loading import ModelBundle
from editlab.scoring import ProbeScores, ScoreCache, greedy_generate, score_pairs

log = logging.getLogger(__name__)

__all__ = ["EditEvalModule", "STAGES"]

STAGES = ("pre", "post", "final")


class EditEvalModule(L.LightningModule):
    """Evaluate an edit method on a stream of records (``trainer.test``).

    Args:
        model: the built model + tokenizer.
        chunk_size: sequences per forward when scoring.
        max_prompt_tokens: truncate over-long prompts from the left when scoring.
        fluency: also score fluency (n-gram entropy of greedy generations, ROME) on each record's
            generation prompts.
        fluency_prompts: how many distinct generation prompts per record.
        fluency_max_new_tokens: generation length for fluency.
        output_dir: where records.jsonl / summary.json / summary.csv go (None: nowhere).
        precompute_pre: score every record of the run on the unedited model once, in large
            batches, before the first edit (identical pairs shared); per-batch pre-edit scores are
            then read from that cache.  False: score each batch's pre-edit state in its step.
        probability_comparison: score the CounterFact probability comparisons (efficacy,
            paraphrase, neighbourhood: each needs the true target scored too).  False keeps the
            teacher-forced families only (EasyEdit's set), halving the sequences per record.
        score_after_stream: at the end of the run, score every successfully edited record again
            on the model as the edit stream left it (``final/…`` keys; meaningful with sequential
            editing, where the edits are still applied at that point).
    """

    def __init__(
        self,
        model: ModelBundle,
        chunk_size: int = 64,
        max_prompt_tokens: int | None = None,
        fluency: bool = False,
        fluency_prompts: int = 2,
        fluency_max_new_tokens: int = 50,
        output_dir: str | None = None,
        precompute_pre: bool = True,
        probability_comparison: bool = True,
        score_after_stream: bool = False,
    ) -> None:
        super().__init__()
        self.bundle = model
        self.model = model.model
        self.tokenizer = model.tokenizer
        self.chunk_size = chunk_size
        self.max_prompt_tokens = max_prompt_tokens
        self.fluency = fluency
        self.fluency_prompts = fluency_prompts
        self.fluency_max_new_tokens = fluency_max_new_tokens
        self.output_dir = Path(output_dir) if output_dir else None
        self.precompute_pre = precompute_pre
        self.probability_comparison = probability_comparison
        self.score_after_stream = score_after_stream
        self._pre_cache = ScoreCache()
        self._pre_texts: dict[str, str] = {}
        self.session = WeightEditSession(self.model)
        self.stage_metrics = nn.ModuleDict({s: build_edit_metrics(f"{s}/") for s in STAGES})
        self.summary: dict[str, float] = {}
        self._edit_seconds: dict[int, float] = {}
        self._failed: dict[int, str] = {}
        self._timings: dict[str, list[float]] = {"pre": [], "post": [], "edit": []}
        self._rows: list[dict[str, Any]] = []
        self._stream: list[EditRecord] = []  # successfully edited records, in stream order
        self._stream_rows: list[int] = []  # their index in self._rows

    # ------------------------------------------------------------- callbacks
    def record_edit(self, batch_idx: int, seconds: float) -> None:
        """Called by the editor callback after it applied the edit of batch ``batch_idx``."""
        self._edit_seconds[batch_idx] = seconds

    def record_failure(self, batch_idx: int, message: str) -> None:
        """Called by the editor callback when an edit failed and was skipped (model unchanged)."""
        self._failed[batch_idx] = message

    # ----------------------------------------------------------------- hooks
    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Batches are lists of records (text): there is nothing to move; editors and the scorer
        tokenise onto the model's device themselves."""
        return batch

    def setup(self, stage: str) -> None:
        loop = getattr(self.trainer, "test_loop", None)
        if getattr(loop, "inference_mode", False):
            raise RuntimeError(
                "EditEvalModule needs Trainer(inference_mode=False): editors compute gradients "
                "inside the test loop (set trainer.inference_mode=false)"
            )

    def on_test_epoch_start(self) -> None:
        for metrics in self.stage_metrics.values():
            metrics.reset()
        self._rows.clear()
        self._stream.clear()
        self._stream_rows.clear()
        self._edit_seconds.clear()
        self._failed.clear()
        self._pre_cache.clear()
        self._pre_texts.clear()
        for values in self._timings.values():
            values.clear()
        if self.precompute_pre:
            self._warm_pre_cache()

    def _warm_pre_cache(self) -> None:
        loaders = self.trainer.test_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        records = [rec for loader in loaders for batch in loader for rec in batch]
        if not records:
            return
        start = time.perf_counter()
        plan = build_plan(records, self.probability_comparison)
        with torch.no_grad(), self.session.suspended():
            self._pre_cache.scores(self.model, self.tokenizer, plan.prompts, plan.targets,
                                   chunk_size=self.chunk_size, max_prompt_tokens=self.max_prompt_tokens)
            if self.fluency:
                self._fluency(records, self._pre_texts)
        self._timings["pre"].append((time.perf_counter() - start) / len(records))
        log.info("pre-edit scores of %d records (%d unique sequences) in %.2fs", len(records), len(plan),
                 time.perf_counter() - start)

    def _score(self, plan: ProbePlan, cache: ScoreCache | None = None) -> ProbeScores:
        kwargs = {"chunk_size": self.chunk_size, "max_prompt_tokens": self.max_prompt_tokens}
        if cache is not None:
            return cache.scores(self.model, self.tokenizer, plan.prompts, plan.targets, **kwargs)
        return score_pairs(self.model, self.tokenizer, plan.prompts, plan.targets, **kwargs)

    def _fluency(self, records: list[EditRecord], cache: dict[str, str] | None = None) -> tuple[list[str], list[int]]:
        prompts, owners = [], []
        for r, rec in enumerate(records):
            for p in list(dict.fromkeys(rec.generation_prompts))[: self.fluency_prompts]:
                prompts.append(p)
                owners.append(r)
        if not prompts:
            return [], []
        if cache is None:
            texts = greedy_generate(self.model, self.tokenizer, prompts, max_new_tokens=self.fluency_max_new_tokens)
            return texts, owners
        missing = [p for p in dict.fromkeys(prompts) if p not in cache]
        if missing:
            generated = greedy_generate(self.model, self.tokenizer, missing, max_new_tokens=self.fluency_max_new_tokens)
            cache.update(zip(missing, generated))
        return [cache[p] for p in prompts], owners

    def test_step(self, batch: list[EditRecord], batch_idx: int) -> None:
        records = list(batch)
        plan = build_plan(records, self.probability_comparison)
        failed = self._failed.get(batch_idx)
        t0 = time.perf_counter()
        with self.session.suspended():
            pre = self._score(plan, self._pre_cache)
            pre_texts = self._fluency(records, self._pre_texts) if self.fluency else ([], [])
        t1 = time.perf_counter()
        post = pre if failed else self._score(plan)
        post_texts = pre_texts if failed or not self.fluency else self._fluency(records)
        t2 = time.perf_counter()
        if not self.precompute_pre:
            self._timings["pre"].append((t1 - t0) / len(records))
        if not failed:
            self._timings["post"].append((t2 - t1) / len(records))
            self._stream.extend(records)
            self._stream_rows.extend(range(len(self._rows), len(self._rows) + len(records)))
        if batch_idx in self._edit_seconds:
            self._timings["edit"].append(self._edit_seconds[batch_idx])

        per_record: dict[str, dict[str, torch.Tensor]] = {}
        for stage, scores, texts in (("pre", pre, pre_texts), ("post", post, post_texts)):
            if stage == "post" and failed:
                continue
            per_record[stage] = self._update(stage, plan, scores, pre, texts)
        self._write_rows(records, per_record, batch_idx, failed)

    def _update(
        self, stage: str, plan: ProbePlan, scores: ProbeScores, pre: ProbeScores, texts: tuple[list[str], list[int]]
    ) -> dict[str, torch.Tensor]:
        """Update the stage's metrics; return per-record values (NaN where a record has none)."""
        metrics = self.stage_metrics[stage]
        n = plan.num_records
        scores, pre = scores.to(self.device), pre.to(self.device)
        out: dict[str, torch.Tensor] = {}

        def keep(name: str, values: torch.Tensor, rec: torch.Tensor) -> None:
            means, present = F.segment_mean(values.float().cpu(), rec, n)
            out[name] = torch.where(present, means, torch.full_like(means, math.nan))

        for family, (seq, rec) in plan.accuracy.items():
            s, r = seq.to(self.device), rec.to(self.device)
            if family == "locality":
                metrics["locality_acc"].update(scores.pred[s], scores.target[s], scores.mask[s], r, n)
                keep("locality_acc", F.token_accuracy(scores.pred[s], scores.target[s], scores.mask[s]), rec)
                if stage != "pre":
                    metrics["locality"].update(scores.pred[s], pre.pred[s], scores.mask[s], r, n)
                    keep("locality", F.token_agreement(scores.pred[s], pre.pred[s], scores.mask[s]), rec)
                continue
            metrics[family].update(scores.pred[s], scores.target[s], scores.mask[s], r, n)
            keep(family, F.token_accuracy(scores.pred[s], scores.target[s], scores.mask[s]), rec)

        for family, (a, b, rec) in plan.comparison.items():
            na, nb, r = scores.nll[a.to(self.device)], scores.nll[b.to(self.device)], rec.to(self.device)
            metrics[f"{family}_score"].update(na, nb, r, n)
            metrics[f"{family}_magnitude"].update(na, nb, r, n)
            success, magnitude = F.probability_comparison(na, nb)
            keep(f"{family}_score", success, rec)
            keep(f"{family}_magnitude", magnitude, rec)

        gen_texts, owners = texts
        if gen_texts:
            owner = torch.tensor(owners, dtype=torch.long)
            metrics["fluency"].update(gen_texts, owner.to(self.device), n)
            keep("fluency", torch.tensor([F.ngram_entropy(t) for t in gen_texts]), owner)
        return out

    def _write_rows(
        self, records: list[EditRecord], per_record: dict[str, dict[str, torch.Tensor]], batch_idx: int,
        failed: str | None,
    ) -> None:
        for i, rec in enumerate(records):
            row: dict[str, Any] = {
                "record_id": rec.record_id,
                "source": rec.source,
                "index": rec.index,
                "prompt": rec.prompt,
                "target_new": rec.target_new,
                "target_true": rec.target_true,
                "batch": batch_idx,
                "edit_seconds": self._edit_seconds.get(batch_idx),
            }
            if failed:
                row["edit_error"] = failed
            for stage, values in per_record.items():
                row[stage] = {k: (None if math.isnan(float(v[i])) else float(v[i])) for k, v in values.items()}
            self._rows.append(row)

    def _score_after_stream(self) -> None:
        """Score every edited record of the run on the model as it is now (stage ``final``)."""
        if not self._stream:
            return
        start = time.perf_counter()
        records = list(self._stream)
        plan = build_plan(records, self.probability_comparison)
        with torch.no_grad():
            with self.session.suspended():
                pre = self._score(plan, self._pre_cache)  # locality: agreement with the unedited model
            final = self._score(plan)
            texts = self._fluency(records) if self.fluency else ([], [])
        values = self._update("final", plan, final, pre, texts)
        for i, row in enumerate(self._stream_rows):
            self._rows[row]["final"] = {k: (None if math.isnan(float(v[i])) else float(v[i])) for k, v in values.items()}
        self._timings["final"] = [(time.perf_counter() - start) / len(records)]
        log.info("scored %d records after the whole edit stream in %.2fs", len(records), time.perf_counter() - start)

    def on_test_epoch_end(self) -> None:
        if self.score_after_stream:
            self._score_after_stream()
        summary: dict[str, float] = {}
        for stage in STAGES:
            summary.update(computed(self.stage_metrics[stage]))
        for name, values in self._timings.items():
            if values:
                summary[f"time/{name}_seconds_median"] = float(statistics.median(values))
        failed = torch.tensor(float(len(self._failed)), device=self.device)
        summary["edits/failed"] = float(self.trainer.strategy.reduce(failed, reduce_op="sum"))
        self.summary = summary
        if summary:
            # metric values are already reduced over ranks (torchmetrics); timings are averaged
            self.log_dict(summary, sync_dist=True)
        self._write_files()

    # ---------------------------------------------------------------- output
    def _write_files(self) -> None:
        if self.output_dir is None:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        rank = self.global_rank
        name = "records.jsonl" if rank == 0 else f"records.rank{rank}.jsonl"
        with open(self.output_dir / name, "w", encoding="utf-8") as fh:
            for row in self._rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        if rank != 0:
            return
        with open(self.output_dir / "summary.json", "w", encoding="utf-8") as fh:
            json.dump(self.summary, fh, indent=2, sort_keys=True)
        with open(self.output_dir / "summary.csv", "w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh)
            final = any(k.startswith("final/") for k in self.summary)
            writer.writerow(["metric", "pre", "post"] + (["final"] if final else []))
            for metric, *values in _stage_rows(self.summary):
                cells = ["" if v is None else f"{v:.6f}" for v in (values if final else values[:2])]
                writer.writerow([metric, *cells])


def summary_rows(summary: dict[str, float]) -> list[tuple[str, float | None, float | None]]:
    """``(metric, pre, post)`` rows of a summary, in the order metrics are defined (the ``final``
    stage, when present, is read by :func:`format_summary` and the CSV writer separately)."""
    return [row[:3] for row in _stage_rows(summary)]


def _stage_rows(summary: dict[str, float]) -> list[tuple[str, float | None, float | None, float | None]]:
    names: list[str] = []
    for key in summary:
        stage, _, metric = key.partition("/")
        if stage in STAGES and metric not in names:
            names.append(metric)
    return [(m, summary.get(f"pre/{m}"), summary.get(f"post/{m}"), summary.get(f"final/{m}")) for m in names]


def format_summary(summary: dict[str, float]) -> str:
    """A fixed-width table of pre/post metrics followed by timings."""
    final = any(k.startswith("final/") for k in summary)
    width = 51 if final else 42
    lines = [f"{'metric':<24} {'pre':>8} {'post':>8}" + (f" {'final':>8}" if final else ""), "-" * width]
    for metric, pre, post, after in _stage_rows(summary):
        fmt = lambda v: f"{v:8.4f}" if v is not None else f"{'-':>8}"  # noqa: E731
        lines.append(f"{metric:<24} {fmt(pre)} {fmt(post)}" + (f" {fmt(after)}" if final else ""))
    extra = {k: v for k, v in summary.items() if not k.startswith(("pre/", "post/", "final/"))}
    if extra:
        lines.append("-" * width)
        lines.extend(f"{k:<33} {v:8.4f}" for k, v in extra.items())
    return "\n".join(lines)
