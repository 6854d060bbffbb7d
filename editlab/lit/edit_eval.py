"""The edit loop: a LightningModule that scores each batch of records before and after an edit.

Per test batch (a list of :class:`~editlab.data.records.EditRecord`):

1. the editor callback (:class:`editlab.lit.callbacks.EditorCallback`) computes the edit and
   applies it through :attr:`EditEvalModule.session` (``on_test_batch_start``);
2. :meth:`EditEvalModule.test_step` scores the batch on the *original* weights (the session is
   suspended, so in a sequential stream the pre-edit state is still that of the unedited model),
   then on the edited weights, and returns the batch's record rows;
3. the callback restores the weights bit-exactly (``on_test_batch_end``) unless the run is
   sequential, in which case edits accumulate and are undone at the end of the run;
4. the results writer (:class:`editlab.lit.results.ResultsWriter`, added by the module when it has
   an ``output_dir``) appends the rows to ``records.jsonl``.

What is scored, and how, is :mod:`editlab.evaluation` (:class:`~editlab.evaluation.scorer.RecordScorer`:
teacher-forced and probability-comparison probes, generation with its framing and caps, fluency, the
judge); this module decides *when* and on which model state.

With ``score_after_stream`` every record of the run is scored once more at the end, on the model
as the whole edit stream left it (stage ``final``).  In a sequential stream ``post/…`` is the score
right after a record's own edit and ``final/…`` the score after all edits: the gap is forgetting.

Edit streams (lifelong editing, ``eval_every``): with sequential editing (the editor callback's
``sequential=True``) and ``eval_every=K``, every K batches all records edited so far (or the
stream's first ``eval_sample`` edited records, a fixed sample; with ``sample_only`` no other record
is ever scored, for streams of thousands of edits) are scored on
the model as the stream has left it so far (stage ``step``: same metrics, same pre-edit cache for
locality), and, at every such checkpoint, general ability too; the last point of the curve is the
``final`` stage (``eval_every`` implies ``score_after_stream``).  Points are ``{"edits": records
edited so far, "batches": batches so far, metric: value}`` in :attr:`EditEvalModule.curves`,
written to ``curves.csv`` / ``curves.png`` and logged as ``stream/{metric}`` with ``step`` = edits
so far.

Stream checkpoints (``checkpoint_every``, ``resume_from``; :mod:`editlab.lit.stream`): every
``checkpoint_every`` batches, once the batch's rows are written, the module saves the session's
edit state and its own (metric states, rows, curve points, caches, random states) into
``<output_dir>/stream/``; a module given ``resume_from`` on a freshly loaded model puts all of it
back (the editor callback re-installs the edits when the test epoch starts, :meth:`resume_session`),
skips the batches done and goes on: its results are those of the stream never stopped.

General ability (``general_ability``, a :class:`~editlab.evaluation.general.GeneralAbility`):
perplexity on a held-out text sample and PIQA accuracy, measured on the whole model rather than per
record: ``pre/general_…`` on the unedited model before the first edit; ``post/general_…`` in the
last batch's step, right after its edit: with sequential editing that is the model after the whole
stream, with independent edits the model with only the last batch's edit applied (a failed last
edit leaves the model as it was); ``final/general_…`` (with ``score_after_stream``) at the end of
the run on the model as the stream left it (sequential: after all edits, the same state as
``post``, measured again; independent: every edit undone, so ``pre``'s values are copied).
Keys ``general_perplexity``, ``general_nll``, ``general_tokens``, ``general_piqa_acc``,
``general_piqa_acc_norm``, ``general_piqa_examples``; they go to ``summary.json`` /
``summary.csv`` and the loggers, not to ``records.jsonl``.

Metrics are torchmetrics objects (one ``MetricCollection`` per stage, keys ``pre/…``, ``post/…``,
built by :mod:`editlab.metrics.keys`); the summary is logged to the configured Lightning loggers
and, with the records and curves, kept in :attr:`EditEvalModule.results` for the writer.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn

from editlab.data.records import EditRecord
from editlab.evaluation.scorer import (Observation, Probes, ScoringSettings, StateCache, answers_by_record,
                                       build_scorer)
from editlab.lit.checkpoint import CheckpointError
from editlab.lit.results import EvalResults, ResultsWriter
from editlab.lit.stream import (FORMAT, STREAM_DIR, load_metric_states, metric_states, read_stream_checkpoint,
                                record_from_dict, record_to_dict, reinstall_session, rng_state, session_snapshot,
                                set_rng_state, write_stream_checkpoint)
from editlab.methods.base import WeightEditSession
from editlab.metrics.edit import computed
from editlab.metrics.keys import STAGES, STEP, STREAM, general_metric, join, parse_key, time_key
from editlab.models.loading import ModelBundle

log = logging.getLogger(__name__)

__all__ = ["EditEvalModule"]

GeneralEvaluator = Callable[[nn.Module, Any], dict[str, float]]
"""``(model, tokenizer) -> {name: value}``, e.g. :class:`editlab.evaluation.general.GeneralAbility`."""


def _values(values: dict[str, torch.Tensor], i: int) -> dict[str, float | None]:
    return {k: (None if math.isnan(float(v[i])) else float(v[i])) for k, v in values.items()}


class EditEvalModule(L.LightningModule):
    """Evaluate an edit method on a stream of records (``trainer.test``).

    The arguments are the keys of ``configs/module/edit_eval.yaml``.  *How* records are scored is
    ``scoring`` (:class:`~editlab.evaluation.scorer.ScoringSettings`, built into :attr:`scorer`); the
    module keeps what says *when*, on which model state, and where results go.

    Args:
        model: the built model + tokenizer.
        scoring: the scoring settings (modes, teacher-forced chunking, generation framing and caps,
            fluency, the judge); None: the defaults.
        output_dir: where records.jsonl / summary.json / summary.csv / curves go (the module adds a
            :class:`~editlab.lit.results.ResultsWriter`); None: nowhere.
        precompute_pre: score every record of the run on the unedited model once, in large
            batches, before the first edit (identical pairs shared); per-batch pre-edit scores are
            then read from that cache.  False: score each batch's pre-edit state in its step.
        score_after_stream: at the end of the run, score every successfully edited record again
            on the model as the edit stream left it (``final/…`` keys; meaningful with sequential
            editing, where the edits are still applied at that point).  Implied by ``eval_every``.
        general_ability: optional :class:`~editlab.evaluation.general.GeneralAbility` (or any
            callable ``(model, tokenizer) -> {name: value}``): perplexity and PIQA accuracy before
            the first edit, after the last one and after the stream (``{stage}/general_{name}``
            keys; see the module docstring for exactly which model state each stage measures).
        eval_every: in a sequential edit stream, score all records edited so far every this many
            batches (curve points; see the module docstring); implies ``score_after_stream``.
            ``None``: no curves.  Refused unless every editor callback is sequential.
        eval_sample: score only the stream's first this many edited records at each curve point
            (a fixed sample: the same records at every point once they are edited, so a long
            stream's points cost the same and show what is left of its early edits); ``None``:
            every record edited so far.  The ``final`` stage scores every record either way,
            unless ``sample_only``.
        sample_only: score the sample only (needs ``eval_sample``): a record outside the stream's
            first ``eval_sample`` edited records is edited but never scored (its row in
            ``records.jsonl`` has no ``pre``/``post``/``final`` values), and ``pre/``, ``post/``,
            ``final/`` are the sample's scores.  For streams of thousands of edits, where scoring
            every record before, right after its edit and after the stream would cost more than
            the edits themselves.
        checkpoint_every: write a stream checkpoint (:mod:`editlab.lit.stream`) into
            ``<output_dir>/stream/`` after every this many batches (not after the last one: what
            remains then is the scoring after the stream); ``None`` or 0: none.
        resume_from: a stream checkpoint to continue from (the model given is freshly loaded):
            the batches it has done are skipped, its edit state, metric states, rows, curves and
            random states are put back, and the run goes on as if never stopped.  The test loader
            must come from an :class:`~editlab.data.datamodule.EditDataModule`.
        run_config: the run's settings, stored in stream checkpoints (``editlab.train`` refuses
            to resume a stream under other settings).
    """

    def __init__(
        self,
        model: ModelBundle,
        scoring: ScoringSettings | None = None,
        output_dir: str | None = None,
        precompute_pre: bool = True,
        score_after_stream: bool = False,
        general_ability: GeneralEvaluator | None = None,
        eval_every: int | None = None,
        eval_sample: int | None = None,
        sample_only: bool = False,
        checkpoint_every: int | None = None,
        resume_from: str | None = None,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if eval_every is not None and eval_every < 1:
            raise ValueError(f"eval_every must be a positive number of batches or None, got {eval_every}")
        if eval_sample is not None and (isinstance(eval_sample, bool) or not isinstance(eval_sample, int)
                                        or eval_sample < 1):
            raise ValueError(f"eval_sample must be a positive number of records or None, got {eval_sample}")
        if sample_only and eval_sample is None:
            raise ValueError("sample_only scores the eval_sample records only: set eval_sample too")
        if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 0):
            raise ValueError(f"checkpoint_every must be a number of batches >= 0 or None, got {checkpoint_every}")
        if (checkpoint_every or resume_from) and not output_dir:
            raise ValueError("stream checkpoints (checkpoint_every, resume_from) need an output_dir")
        self.scorer = build_scorer(model.tokenizer, scoring)
        self.bundle = model
        self.model = model.model
        self.tokenizer = model.tokenizer
        self.session = WeightEditSession(self.model)
        self.output_dir = Path(output_dir) if output_dir else None
        self.precompute_pre = precompute_pre
        self.general_ability = general_ability
        self.eval_every = eval_every
        self.eval_sample = eval_sample
        self.sample_only = bool(sample_only)
        self.score_after_stream = score_after_stream or eval_every is not None  # a curve ends at `final`
        self.stage_metrics = nn.ModuleDict({s: self.scorer.metrics(f"{s}/") for s in (*STAGES, STEP)})
        self.results = EvalResults()
        self.timings: dict[str, list[float]] = {}
        self._pre = StateCache()  # everything observed on the unedited model
        self._general: dict[str, dict[str, float]] = {}
        self._edit_seconds: dict[int, float] = {}
        self._failed: dict[int, str] = {}
        self._stream: list[EditRecord] = []  # successfully edited records, in stream order
        self._stream_rows: list[int] = []  # their index in results.records
        self._steps = 0  # batches done (a resumed stream counts those before its checkpoint)
        self.checkpoint_every = checkpoint_every or None
        self.resume_from = str(resume_from) if resume_from else None
        self.run_config = run_config
        self._resume: dict[str, Any] | None = None  # the stream checkpoint being resumed
        self._session_back = False  # its edits are installed again
        self._offset = 0  # batches of the stream before this run's first batch
        self._last = False

    # ------------------------------------------------ the editor callback's interface (EditTarget)
    @property
    def needs_sequential(self) -> bool:
        """Stream checkpoints score the model as the stream leaves it: edits must accumulate."""
        return self.eval_every is not None

    def record_edit(self, batch_idx: int, seconds: float) -> None:
        """Called by the editor callback after it applied the edit of batch ``batch_idx``."""
        self._edit_seconds[batch_idx + self._offset] = seconds

    def record_failure(self, batch_idx: int, message: str) -> None:
        """Called by the editor callback when an edit failed and was skipped (model unchanged)."""
        self._failed[batch_idx + self._offset] = message

    def resume_session(self, editor: Any = None) -> None:
        """Called by the editor callback when the test epoch starts: put a resumed stream's edits
        back on the session (``editor`` rebuilds a memory's wrapper).  Nothing when not resuming."""
        if self._resume is None or self._session_back:
            return
        reinstall_session(self.session, self._resume["session"], editor, self.tokenizer, Path(self.resume_from))
        self._session_back = True

    @property
    def resumed_rows(self) -> list[dict[str, Any]] | None:
        """The record rows of a resumed stream's checkpoint (the results writer writes them again
        and appends to them), None when not resuming."""
        return None if self._resume is None else self._resume["loop"]["results"]["records"]

    # -------------------------------------------------------------------- results
    @property
    def summary(self) -> dict[str, float]:
        return self.results.summary

    @property
    def curves(self) -> list[dict[str, float]]:
        return self.results.curves

    def configure_callbacks(self) -> list[L.Callback]:
        """The results writer, whenever there is an output folder (whatever the callbacks config)."""
        return [ResultsWriter(self.output_dir)] if self.output_dir is not None else []

    # ---------------------------------------------------------------------- hooks
    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Batches are lists of records (text): there is nothing to move; editors and the scorer
        tokenise onto the model's device themselves."""
        return batch

    def setup(self, stage: str) -> None:
        if getattr(getattr(self.trainer, "test_loop", None), "inference_mode", False):
            raise RuntimeError(
                "EditEvalModule needs Trainer(inference_mode=False): editors compute gradients "
                "inside the test loop (set trainer.inference_mode=false)"
            )
        if stage != "test" or not (self.checkpoint_every or self.resume_from):
            return
        if self.trainer.world_size > 1:
            raise ValueError("stream checkpoints (checkpoint_every, resume_from) are for a stream on one process")
        self._resume, self._session_back, self._offset = None, False, 0
        if self.resume_from:
            self._prepare_resume(read_stream_checkpoint(self.resume_from))

    def _prepare_resume(self, checkpoint: dict[str, Any]) -> None:
        """Check that the checkpoint's rows are this run's first records, batched alike, and make
        the test loader start after them."""
        source = self.resume_from
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "resume_test"):
            raise ValueError("resuming a stream needs the test records from an EditDataModule (trainer.test(module, "
                             "datamodule=...)): it skips the batches done")
        rows = checkpoint["loop"]["results"]["records"]
        records = datamodule.datasets["test"].records
        size = datamodule.batch_sizes["test"]
        batches = int(checkpoint["batches"])
        if len(rows) != int(checkpoint["rows"]) or len(rows) != batches * size or len(rows) >= len(records):
            raise CheckpointError(f"{source}: its {len(rows)} record rows of {batches} batches do not fit this run's "
                                  f"{len(records)} records in batches of {size}")
        for i, (row, rec) in enumerate(zip(rows, records)):
            if row["record_id"] != rec.record_id or row["index"] != rec.index or row["batch"] != i // size:
                raise CheckpointError(f"{source}: its row {i} (record {row['record_id']!r}, batch {row['batch']}) is "
                                      f"not this run's record {i} (record {rec.record_id!r}, batch {i // size}): "
                                      "resume a stream with its own records and batch size")
        datamodule.resume_test(len(rows))
        self._resume, self._offset = checkpoint, batches
        log.info("resuming the edit stream of %s after %d batches (%d records)", source, batches, len(rows))

    def on_test_epoch_start(self) -> None:
        for metrics in self.stage_metrics.values():
            metrics.reset()
        self.results.clear()
        self.timings = {"pre": [], "post": [], "edit": []}
        for state in (self._pre, self._general, self._edit_seconds, self._failed, self._stream, self._stream_rows):
            state.clear()
        self._steps = 0
        if self._resume is not None:
            self._load_stream(self._resume)
            return
        if self.general_ability is not None:
            with self.session.suspended():
                self._measure_general("pre")
        if self.precompute_pre:
            self._warm_pre_cache()

    def _warm_pre_cache(self) -> None:
        loaders = self.trainer.test_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        records = [rec for loader in loaders for batch in loader for rec in batch]
        if self.sample_only:  # the sample is the first eval_sample edited records (a failed edit
            records = records[:self.eval_sample]  # shifts it: those records are scored when reached)
        if not records:
            return
        start = time.perf_counter()
        probes = self.scorer.probes(records)
        # one batched pass before the first edit, before the progress bar moves: say what it is doing
        log.info("scoring the unedited model on %d records (%d unique sequences) before the first edit",
                 len(records), len(probes.plan))
        with self.session.suspended():
            self.scorer.observe(self.session.forward_model, probes, self._pre)
        self.timings["pre"].append((time.perf_counter() - start) / len(records))
        log.info("pre-edit scores of %d records (%d unique sequences) in %.2fs", len(records), len(probes.plan),
                 time.perf_counter() - start)

    def _measure_general(self, stage: str) -> None:
        """General ability of the model as it is now, kept as ``{stage}/general_…``."""
        start = time.perf_counter()
        with torch.no_grad():
            self._general[stage] = dict(self.general_ability(self.session.forward_model, self.tokenizer))
        self.timings.setdefault("general", []).append(time.perf_counter() - start)

    def _is_last_step(self) -> bool:
        """True in the run's last test step (of the last test loader)."""
        self._steps += 1
        total = sum(self.trainer.num_test_batches)
        return math.isfinite(total) and self._steps == int(total) + self._offset

    def test_step(self, batch: list[EditRecord], batch_idx: int) -> list[dict[str, Any]]:
        """Score the batch before and after its edit; return its record rows (``records.jsonl`` lines)."""
        batch_idx += self._offset  # the batch's place in the whole stream
        failed = self._failed.get(batch_idx)
        all_records = list(batch)
        if self.sample_only:  # the batch's records that join the sample (none from a failed edit)
            batch = [] if failed else all_records[:max(0, self.eval_sample - len(self._stream))]
        probes = self.scorer.probes(batch)
        if batch_idx in self._edit_seconds:
            self.timings["edit"].append(self._edit_seconds[batch_idx])
        observed: dict[str, Observation] = {}
        values: dict[str, dict[str, torch.Tensor]] = {}
        if probes.records:
            t0 = time.perf_counter()
            with self.session.suspended():
                pre = self.scorer.observe(self.session.forward_model, probes, self._pre)
            t1 = time.perf_counter()
            post = pre if failed else self.scorer.observe(self.session.forward_model, probes)
            t2 = time.perf_counter()
            if not self.precompute_pre:
                self.timings["pre"].append((t1 - t0) / len(probes.records))
            if not failed:
                self.timings["post"].append((t2 - t1) / len(probes.records))
            observed = {"pre": pre} if failed else {"pre": pre, "post": post}
            values = {stage: self._update(stage, probes, obs, pre) for stage, obs in observed.items()}
        rows = self._rows(all_records, probes, batch_idx, failed, values, observed)
        if not failed:
            self._stream.extend(all_records)
            self._stream_rows.extend(range(len(self.results.records), len(self.results.records) + len(rows)))
        self.results.records.extend(rows)

        last = self._last = self._is_last_step()
        if self.general_ability is not None and last:
            self._measure_general("post")
        if self.eval_every is not None and not last and self._steps % self.eval_every == 0:
            self._checkpoint()  # the last batch's point is the `final` stage, scored at the end
        return rows

    def on_test_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """After the callbacks (the results writer has appended the batch's rows): a stream
        checkpoint every ``checkpoint_every`` batches."""
        if self.checkpoint_every and not self._last and self._steps % self.checkpoint_every == 0:
            self._write_stream_checkpoint()

    def _write_stream_checkpoint(self) -> None:
        start = time.perf_counter()
        loop = {
            "metrics": {stage: metric_states(m) for stage, m in self.stage_metrics.items()},
            "results": {"records": self.results.records, "curves": self.results.curves},
            "general": self._general, "timings": self.timings, "edit_seconds": self._edit_seconds,
            "failed": self._failed, "stream": [record_to_dict(r) for r in self._stream],
            "stream_rows": self._stream_rows, "pre": self._pre.state_dict(),
        }
        checkpoint = {"format": FORMAT, "batches": self._steps, "rows": len(self.results.records),
                      "config": self.run_config, "session": session_snapshot(self.session), "loop": loop,
                      "rng": rng_state()}
        path = write_stream_checkpoint(checkpoint, self.output_dir / STREAM_DIR)
        log.info("stream checkpoint after %d batches: %s (%.2fs)", self._steps, path, time.perf_counter() - start)

    def _load_stream(self, checkpoint: dict[str, Any]) -> None:
        """The edit loop's state as the checkpoint saved it; random states last (nothing may draw
        from them between here and the next edit, as in the run that wrote it)."""
        source = Path(self.resume_from)
        if not self._session_back:  # no editor callback asked for it: deltas and patches need no editor
            self.resume_session(None)
        loop = checkpoint["loop"]
        for stage, metrics in self.stage_metrics.items():
            load_metric_states(metrics, loop["metrics"].get(stage, {}), source)
        self.results.records.extend(loop["results"]["records"])
        self.results.curves.extend(loop["results"]["curves"])
        self._general.update(loop["general"])
        self.timings = {name: list(values) for name, values in loop["timings"].items()}
        self._edit_seconds.update({int(k): v for k, v in loop["edit_seconds"].items()})
        self._failed.update({int(k): v for k, v in loop["failed"].items()})
        self._stream.extend(record_from_dict(r) for r in loop["stream"])
        self._stream_rows.extend(int(i) for i in loop["stream_rows"])
        self._pre.load_state_dict(loop["pre"])
        self._steps = int(checkpoint["batches"])
        set_rng_state(checkpoint["rng"])

    def _update(self, stage: str, probes: Probes, now: Observation, pre: Observation) -> dict[str, torch.Tensor]:
        return self.scorer.update(self.stage_metrics[stage], probes, now, pre, compare_with_pre=stage != "pre",
                                  device=self.device)

    def _rows(self, records: list[EditRecord], probes: Probes, batch_idx: int, failed: str | None,
              values: dict[str, dict[str, torch.Tensor]], observed: dict[str, Observation]) -> list[dict[str, Any]]:
        """One row per record of the batch; scores for the first ``len(probes.records)`` of them
        (all of them unless ``sample_only``)."""
        answers = {stage: answers_by_record(probes, obs.answers) for stage, obs in observed.items()}
        scored = len(probes.records)
        rows = []
        for i, rec in enumerate(records):
            row: dict[str, Any] = {
                "record_id": rec.record_id, "source": rec.source, "index": rec.index, "prompt": rec.prompt,
                "target_new": rec.target_new, "target_true": rec.target_true, "batch": batch_idx,
                "edit_seconds": self._edit_seconds.get(batch_idx),
            }
            if failed:
                row["edit_error"] = failed
            if i >= scored:
                rows.append(row)
                continue
            row.update({stage: _values(v, i) for stage, v in values.items()})
            if probes.generation is not None:
                row["generations"] = {stage: per_record[i] for stage, per_record in answers.items()}
            rows.append(row)
        return rows

    # ------------------------------------------------------------- after the stream
    def _rescore(self, stage: str, limit: int | None = None) -> tuple[dict[str, torch.Tensor], list[dict[str, list[str]]]]:
        """Score every edited record so far (the first ``limit`` of them when given) on the model as
        it is now into ``stage``'s metrics; per-record values (pre-edit references from the cache
        of the unedited model) and, in generation mode, per-record generated answers."""
        start = time.perf_counter()
        probes = self.scorer.probes(self._stream[:limit])
        with self.session.suspended():
            pre = self.scorer.observe(self.session.forward_model, probes, self._pre)
        now = self.scorer.observe(self.session.forward_model, probes)
        values = self._update(stage, probes, now, pre)
        seconds = time.perf_counter() - start
        self.timings.setdefault(stage, []).append(seconds / len(probes.records))
        log.info("%s: scored %d edited records in %.2fs", stage, len(probes.records), seconds)
        return values, answers_by_record(probes, now.answers)

    def _score_after_stream(self) -> None:
        """Score every edited record of the run (the sample's, with ``sample_only``) on the model as
        it is now (stage ``final``)."""
        if not self._stream:
            return
        limit = self.eval_sample if self.sample_only else None
        values, answers = self._rescore("final", limit)
        for i, row in enumerate(self._stream_rows[:limit]):
            self.results.records[row]["final"] = _values(values, i)
            if answers:
                self.results.records[row]["generations"]["final"] = answers[i]

    def _checkpoint(self) -> None:
        """A curve point mid-stream: the records edited so far (the fixed sample, ``eval_sample``)
        and general ability, on the model now."""
        metrics = self.stage_metrics[STEP]
        metrics.reset()
        if self._stream:
            self._rescore(STEP, self.eval_sample)
        if self.general_ability is not None:
            self._measure_general(STEP)
        self._add_point(computed(metrics), self._general.pop(STEP, {}))

    def _add_point(self, scores: dict[str, float], general: dict[str, float]) -> None:
        edits = torch.tensor(float(len(self._stream)), device=self.device)
        point = {"edits": float(self.trainer.strategy.reduce(edits, reduce_op="sum")), "batches": float(self._steps)}
        point.update({parse_key(k).metric: float(v) for k, v in scores.items()})
        point.update({general_metric(k): float(v) for k, v in general.items()})
        curves = self.results.curves
        if curves and curves[-1]["batches"] == point["batches"]:
            curves.pop()  # a loader without length: the last batch was scored in its step too
        curves.append(point)
        values = {join(STREAM, k): v for k, v in point.items() if k not in ("edits", "batches")}
        for logger in self.loggers:
            logger.log_metrics(values, step=int(point["edits"]))

    def on_test_epoch_end(self) -> None:
        if self.general_ability is not None and self._steps and "post" not in self._general:
            log.warning("general ability: the test loader has no length, so the last batch was not known "
                        "in its step and post/general_… was not measured")
        if self.score_after_stream:
            self._score_after_stream()
            if self.general_ability is not None and not self.session.edited:
                self._general["final"] = dict(self._general["pre"])  # every edit undone: the unedited model
            elif self.general_ability is not None and "post" in self._general:
                # edits kept (a sequential stream): post/ was measured after the last edit on this very
                # model, and nothing has changed it since
                self._general["final"] = dict(self._general["post"])
            elif self.general_ability is not None:
                self._measure_general("final")
        if self.eval_every is not None and self._steps:
            self._add_point(computed(self.stage_metrics["final"]), self._general.get("final", {}))
        summary: dict[str, float] = {}
        for stage in STAGES:
            summary.update(computed(self.stage_metrics[stage]))
            general = self._general.get(stage, {})
            summary.update({join(stage, general_metric(k)): float(v) for k, v in general.items()})
        for name, values in self.timings.items():
            if values:
                summary[time_key(name)] = float(statistics.median(values))
        failed = torch.tensor(float(len(self._failed)), device=self.device)
        summary[join("edits", "failed")] = float(self.trainer.strategy.reduce(failed, reduce_op="sum"))
        self.results.summary.update(summary)
        # metric values are already reduced over ranks (torchmetrics); timings are averaged
        self.log_dict(summary, sync_dist=True)
