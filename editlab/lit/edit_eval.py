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

Edit streams (lifelong editing, ``eval_every``): with sequential editing (the editor callback's
``sequential=True``) and ``eval_every=K``, every K batches all records edited so far are scored on
the model as the stream has left it so far (stage ``step``: same metrics, same pre-edit cache for
locality), and, at every such checkpoint, general ability too; the last point of the curve is the
``final`` stage (``eval_every`` implies ``score_after_stream``).  Points are ``{"edits": records
edited so far, "batches": batches so far, metric: value}`` in :attr:`EditEvalModule.curves`,
written to ``curves.csv`` / ``curves.png`` (:mod:`editlab.lit.curves`) and logged as
``stream/{metric}`` with ``step`` = edits so far.

Scoring modes (``scoring_modes``): ``teacher_forced`` token accuracy (keys ``reliability``,
``generalization``, ``portability``, ``locality``, ``locality_acc``), ``probability_comparison``
(CounterFact's ``efficacy_*``, ``paraphrase_*``, ``neighborhood_*``, ``cf_score``) and
``generation``: greedy answers to the same probes scored as text, keys
``{family}@{label}_{score}`` with label ``generation`` (plain framing) or ``generation_qa``
(question-answer framing) and score ``em`` / ``f1`` / ``contains`` (and ``judge`` with a judge);
``locality@…`` compares the post-edit answer with the unedited model's, ``locality_acc@…`` with
the ground truth.

General ability (``general_ability``, a :class:`~editlab.general.GeneralAbility`): perplexity on a
held-out text sample and PIQA accuracy, measured on the whole model rather than per record:
``pre/general_…`` on the unedited model before the first edit; ``post/general_…`` in the last
batch's step, right after its edit: with sequential editing that is the model after the whole
stream, with independent edits the model with only the last batch's edit applied (a failed last
edit leaves the model as it was); ``final/general_…`` (with ``score_after_stream``) at the end of
the run on the model as the stream left it (sequential: after all edits, the same state as
``post``, measured again; independent: every edit undone, so ``pre``'s values are copied).
Keys ``general_perplexity``, ``general_nll``, ``general_tokens``, ``general_piqa_acc``,
``general_piqa_acc_norm``, ``general_piqa_examples``; they go to ``summary.json`` /
``summary.csv`` and the loggers, not to ``records.jsonl``.

Metrics are torchmetrics objects (one ``MetricCollection`` per stage, keys ``pre/…``, ``post/…``);
results go to ``records.jsonl`` (one line per record: every metric pre and post, edit time),
``summary.json`` and ``summary.csv`` (and, for streams with ``eval_every``, ``curves.csv`` /
``curves.png``) in ``output_dir``, and to the configured Lightning loggers.
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
from editlab.data.collate import target_text
from editlab.general import GeneralAbility
from editlab.lit.callbacks import EditorCallback
from editlab.lit.curves import write_curves
from editlab.lit.probes import GenerationPlan, ProbePlan, build_generation_plan, build_plan
from editlab.methods.base import WeightEditSession
from editlab.metrics import functional as F
from editlab.metrics.edit import build_edit_metrics, computed
from editlab.metrics.judge import Judge, build_judge, judge_scores
from editlab.models.loading import ModelBundle
from editlab.scoring import ProbeScores, ScoreCache, greedy_generate, score_pairs

log = logging.getLogger(__name__)

__all__ = ["EditEvalModule", "FRAMINGS", "QA_TEMPLATE", "SCORING_MODES", "STAGES"]

STAGES = ("pre", "post", "final")
CURVE_STAGE = "step"  # stream checkpoints: scored like the stages, kept as curve points, not in the summary
SCORING_MODES = ("teacher_forced", "probability_comparison", "generation")
FRAMINGS = {"plain": "generation", "question_answer": "generation_qa", "chat": "generation_chat"}  # → key label
QA_TEMPLATE = "Question: {prompt}\nAnswer:"

_GenTexts = tuple[GenerationPlan, list[str], list[str]]  # plan, texts of this stage, pre-edit texts


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
            editing, where the edits are still applied at that point).  Implied by ``eval_every``.
        scoring_modes: the modes scored side by side, from :data:`SCORING_MODES`; ``None`` keeps
            ``teacher_forced`` plus ``probability_comparison`` when that flag is set.  Given, it
            overrides ``probability_comparison``; ``teacher_forced`` cannot be left out (yet).
        generation_framing: ``plain`` (the prompt as is), ``question_answer`` (the prompt put
            into ``qa_template``) or ``chat`` (the prompt as the user turn of the tokenizer's chat
            template, with the assistant turn opened: for instruction-tuned models); labels the
            keys ``@generation_…`` / ``@generation_qa_…`` / ``@generation_chat_…``.
        qa_template: format string with ``{prompt}`` for the question-answer framing.
        generation_margin: a generated answer is capped at its reference's token count plus this.
        generation_max_new_tokens: absolute cap on a generated answer's tokens.
        generation_chunk_size: prompts per batched generation.
        judge: optional judge of generated answers (``judge(prompt, target, generation)`` in
            [0, 1], or a model name/path for an LLM judge; see :mod:`editlab.metrics.judge`):
            adds ``…@generation_judge`` keys.
        general_ability: optional :class:`~editlab.general.GeneralAbility` (or any callable
            ``(model, tokenizer) -> {name: value}``): perplexity and PIQA accuracy before the
            first edit, after the last one and after the stream (``{stage}/general_{name}`` keys;
            see the module docstring for exactly which model state each stage measures).
        eval_every: in a sequential edit stream, score all records edited so far every this many
            batches (curve points; see the module docstring); implies ``score_after_stream``.
            ``None``: no curves.  Refused unless every editor callback is sequential.
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
        scoring_modes: list[str] | tuple[str, ...] | None = None,
        generation_framing: str = "plain",
        qa_template: str = QA_TEMPLATE,
        generation_margin: int = 5,
        generation_max_new_tokens: int = 32,
        generation_chunk_size: int = 32,
        judge: Judge | str | None = None,
        general_ability: GeneralAbility | None = None,
        eval_every: int | None = None,
    ) -> None:
        super().__init__()
        if eval_every is not None and eval_every < 1:
            raise ValueError(f"eval_every must be a positive number of batches or None, got {eval_every}")
        if scoring_modes is not None:
            modes = list(scoring_modes)
            unknown = [m for m in modes if m not in SCORING_MODES]
            if unknown:
                raise ValueError(f"unknown scoring modes {unknown}; choose from {list(SCORING_MODES)}")
            if "teacher_forced" not in modes:
                raise ValueError("scoring_modes must include 'teacher_forced' (the edit loop's base scores)")
            probability_comparison = "probability_comparison" in modes
        if generation_framing not in FRAMINGS:
            raise ValueError(f"unknown generation_framing {generation_framing!r}; choose from {list(FRAMINGS)}")
        if "{prompt}" not in qa_template:
            raise ValueError(f"qa_template must contain '{{prompt}}', got {qa_template!r}")
        self.generation = scoring_modes is not None and "generation" in scoring_modes
        self.generation_label = FRAMINGS[generation_framing]
        self.generation_template = qa_template if generation_framing == "question_answer" else "{prompt}"
        self.generation_chat = generation_framing == "chat"
        if self.generation and self.generation_chat and not getattr(model.tokenizer, "chat_template", None):
            raise ValueError("generation_framing=chat needs a tokenizer with a chat template; this one has none "
                             "(use plain or question_answer)")
        self.generation_margin = generation_margin
        self.generation_max_new_tokens = generation_max_new_tokens
        self.generation_chunk_size = generation_chunk_size
        self.judge = build_judge(judge) if self.generation else None
        self._pre_gen: dict[tuple[str, int], str] = {}
        self._target_tokens: dict[str, int] = {}
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
        self.eval_every = eval_every
        self.score_after_stream = score_after_stream or eval_every is not None  # a curve ends at `final`
        self.curves: list[dict[str, float]] = []
        self._pre_cache = ScoreCache()
        self._pre_texts: dict[str, str] = {}
        self.session = WeightEditSession(self.model)
        label = self.generation_label if self.generation else None
        self.stage_metrics = nn.ModuleDict(
            {s: build_edit_metrics(f"{s}/", generation=label, judge=self.judge is not None)
             for s in (*STAGES, CURVE_STAGE)}
        )
        self.general_ability = general_ability
        self._general: dict[str, dict[str, float]] = {}
        self._steps = 0
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
        independent = [cb for cb in self.trainer.callbacks if isinstance(cb, EditorCallback) and not cb.sequential]
        if self.eval_every is not None and independent:
            raise ValueError("eval_every scores the records edited so far on the edited model: it needs sequential "
                             "editing (edit.sequential=true, or a `stream` config), not independent edits")

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
        self._pre_gen.clear()
        for values in self._timings.values():
            values.clear()
        for name in ("general", "final", CURVE_STAGE):
            self._timings.pop(name, None)
        self._general.clear()
        self.curves.clear()
        self._steps = 0
        if self.general_ability is not None:
            with self.session.suspended():
                self._measure_general("pre")
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
            self._pre_cache.scores(self.session.forward_model, self.tokenizer, plan.prompts, plan.targets,
                                   chunk_size=self.chunk_size, max_prompt_tokens=self.max_prompt_tokens)
            if self.fluency:
                self._fluency(records, self._pre_texts)
            if self.generation:
                self._generate(self._generation_plan(records), self._pre_gen)
        self._timings["pre"].append((time.perf_counter() - start) / len(records))
        log.info("pre-edit scores of %d records (%d unique sequences) in %.2fs", len(records), len(plan),
                 time.perf_counter() - start)

    def _measure_general(self, stage: str) -> None:
        """General ability of the model as it is now, kept as ``{stage}/general_…``."""
        start = time.perf_counter()
        with torch.no_grad():
            self._general[stage] = dict(self.general_ability(self.session.forward_model, self.tokenizer))
        self._timings.setdefault("general", []).append(time.perf_counter() - start)

    def _is_last_step(self) -> bool:
        """True in the run's last test step (of the last test loader)."""
        self._steps += 1
        total = sum(self.trainer.num_test_batches)
        return math.isfinite(total) and self._steps == int(total)

    def _score(self, plan: ProbePlan, cache: ScoreCache | None = None) -> ProbeScores:
        kwargs = {"chunk_size": self.chunk_size, "max_prompt_tokens": self.max_prompt_tokens}
        if cache is not None:
            return cache.scores(self.session.forward_model, self.tokenizer, plan.prompts, plan.targets, **kwargs)
        return score_pairs(self.session.forward_model, self.tokenizer, plan.prompts, plan.targets, **kwargs)

    # ------------------------------------------------------------ generation
    def _frame(self, prompt: str) -> str:
        if self.generation_chat:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
        return self.generation_template.format(prompt=prompt)

    def _cap(self, target: str) -> int:
        """Token cap of a generated answer whose reference is ``target``."""
        if target not in self._target_tokens:
            ids = self.tokenizer(target_text(target), add_special_tokens=False)["input_ids"]
            self._target_tokens[target] = len(ids)
        return max(1, min(self._target_tokens[target] + self.generation_margin, self.generation_max_new_tokens))

    def _generation_plan(self, records: list[EditRecord]) -> GenerationPlan:
        return build_generation_plan(records, self._frame, self._cap)

    def _generate(self, plan: GenerationPlan, cache: dict[tuple[str, int], str] | None = None) -> list[str]:
        """Greedy answers of the plan's prompts on the model as it is (through ``cache`` if given)."""
        keys = plan.keys()
        todo = keys if cache is None else [k for k in dict.fromkeys(keys) if k not in cache]
        texts = greedy_generate(self.session.forward_model, self.tokenizer, [p for p, _ in todo], max_new_tokens=[c for _, c in todo],
                                chunk_size=self.generation_chunk_size, stop_at_answer_end=True) if todo else []
        if cache is None:
            return texts
        cache.update(zip(todo, texts))
        return [cache[k] for k in keys]

    def _fluency(self, records: list[EditRecord], cache: dict[str, str] | None = None) -> tuple[list[str], list[int]]:
        prompts, owners = [], []
        for r, rec in enumerate(records):
            for p in list(dict.fromkeys(rec.generation_prompts))[: self.fluency_prompts]:
                prompts.append(p)
                owners.append(r)
        if not prompts:
            return [], []
        if cache is None:
            texts = greedy_generate(self.session.forward_model, self.tokenizer, prompts, max_new_tokens=self.fluency_max_new_tokens)
            return texts, owners
        missing = [p for p in dict.fromkeys(prompts) if p not in cache]
        if missing:
            generated = greedy_generate(self.session.forward_model, self.tokenizer, missing, max_new_tokens=self.fluency_max_new_tokens)
            cache.update(zip(missing, generated))
        return [cache[p] for p in prompts], owners

    def test_step(self, batch: list[EditRecord], batch_idx: int) -> None:
        records = list(batch)
        plan = build_plan(records, self.probability_comparison)
        failed = self._failed.get(batch_idx)
        t0 = time.perf_counter()
        gplan = self._generation_plan(records) if self.generation else None
        with self.session.suspended():
            pre = self._score(plan, self._pre_cache)
            pre_texts = self._fluency(records, self._pre_texts) if self.fluency else ([], [])
            pre_gen = self._generate(gplan, self._pre_gen) if gplan is not None else []
        t1 = time.perf_counter()
        post = pre if failed else self._score(plan)
        post_texts = pre_texts if failed or not self.fluency else self._fluency(records)
        post_gen = pre_gen if failed or gplan is None else self._generate(gplan)
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
        for stage, scores, texts, gen in (("pre", pre, pre_texts, pre_gen), ("post", post, post_texts, post_gen)):
            if stage == "post" and failed:
                continue
            generated = (gplan, gen, pre_gen) if gplan is not None else None
            per_record[stage] = self._update(stage, plan, scores, pre, texts, generated)
        self._write_rows(records, per_record, batch_idx, failed)
        if gplan is not None:
            first = len(self._rows) - len(records)
            stages = (("pre", pre_gen),) if failed else (("pre", pre_gen), ("post", post_gen))
            for stage, texts in stages:
                for i, answers in enumerate(_answers_by_record(gplan, texts)):
                    self._rows[first + i].setdefault("generations", {})[stage] = answers
        last = self._is_last_step()
        if self.general_ability is not None and last:
            self._measure_general("post")
        if self.eval_every is not None and not last and self._steps % self.eval_every == 0:
            self._checkpoint()  # the last batch's point is the `final` stage, scored at the end

    def _update(
        self, stage: str, plan: ProbePlan, scores: ProbeScores, pre: ProbeScores, texts: tuple[list[str], list[int]],
        generated: _GenTexts | None = None,
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

        if generated is not None:
            gplan, now, before = generated
            label = self.generation_label
            for family, (seq, rec, refs, prompts) in gplan.families.items():
                answers = [now[i] for i in seq.tolist()]
                name = "locality_acc" if family == "locality" else family
                comparisons = [(name, refs)]
                if family == "locality" and stage != "pre":
                    comparisons.append(("locality", [before[i] for i in seq.tolist()]))
                for target_name, references in comparisons:
                    for kind in F.GENERATION_SCORES:
                        key = f"{target_name}@{label}_{kind}"
                        metrics[key].update(answers, references, rec, n)
                        keep(key, F.generation_scores(answers, references, kind), rec)
                if self.judge is not None:
                    key = f"{name}@{label}_judge"
                    primary = [r if isinstance(r, str) else r[0] for r in refs]
                    values = judge_scores(self.judge, prompts, primary, answers)
                    metrics[key].update(values, rec, n)
                    keep(key, values, rec)
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
        values, answers = self._rescore("final")
        for i, row in enumerate(self._stream_rows):
            self._rows[row]["final"] = {k: (None if math.isnan(float(v[i])) else float(v[i])) for k, v in values.items()}
            if answers:
                self._rows[row].setdefault("generations", {})["final"] = answers[i]

    def _rescore(self, stage: str) -> tuple[dict[str, torch.Tensor], list[dict[str, list[str]]]]:
        """Score every edited record so far on the model as it is now into ``stage``'s metrics;
        per-record values (pre-edit references from the cache of the unedited model) and, in
        generation mode, per-record generated answers."""
        start = time.perf_counter()
        records = list(self._stream)
        plan = build_plan(records, self.probability_comparison)
        gplan = self._generation_plan(records) if self.generation else None
        generated = None
        with torch.no_grad():
            with self.session.suspended():
                pre = self._score(plan, self._pre_cache)  # locality: agreement with the unedited model
                pre_gen = self._generate(gplan, self._pre_gen) if gplan is not None else []
            now = self._score(plan)
            texts = self._fluency(records) if self.fluency else ([], [])
            if gplan is not None:
                generated = (gplan, self._generate(gplan), pre_gen)
        values = self._update(stage, plan, now, pre, texts, generated)
        self._timings.setdefault(stage, []).append((time.perf_counter() - start) / len(records))
        log.info("%s: scored %d edited records in %.2fs", stage, len(records), time.perf_counter() - start)
        return values, (_answers_by_record(gplan, generated[1]) if generated is not None else [])

    def _checkpoint(self) -> None:
        """A curve point mid-stream: all records edited so far (and general ability) on the model now."""
        metrics = self.stage_metrics[CURVE_STAGE]
        metrics.reset()
        if self._stream:
            self._rescore(CURVE_STAGE)
        if self.general_ability is not None:
            self._measure_general(CURVE_STAGE)
        self._add_point(computed(metrics), self._general.pop(CURVE_STAGE, {}))

    def _add_point(self, scores: dict[str, float], general: dict[str, float]) -> None:
        edits = torch.tensor(float(len(self._stream)), device=self.device)
        point = {"edits": float(self.trainer.strategy.reduce(edits, reduce_op="sum")), "batches": float(self._steps)}
        point.update({k.partition("/")[2]: float(v) for k, v in scores.items()})
        point.update({f"general_{k}": float(v) for k, v in general.items()})
        if self.curves and self.curves[-1]["batches"] == point["batches"]:
            self.curves.pop()  # a loader without length: the last batch was scored in its step too
        self.curves.append(point)
        values = {f"stream/{k}": v for k, v in point.items() if k not in ("edits", "batches")}
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
            elif self.general_ability is not None:
                self._measure_general("final")
        if self.eval_every is not None and self._steps:
            self._add_point(computed(self.stage_metrics["final"]), self._general.get("final", {}))
        summary: dict[str, float] = {}
        for stage in STAGES:
            summary.update(computed(self.stage_metrics[stage]))
            general = self._general.get(stage, {})
            summary.update({f"{stage}/general_{k}": float(v) for k, v in general.items()})
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
        if self.curves:
            write_curves(self.curves, self.output_dir)


def _answers_by_record(gplan: GenerationPlan, texts: list[str]) -> list[dict[str, list[str]]]:
    """Per record of ``gplan``, the generated answers of each family, in probe order (what
    ``records.jsonl`` keeps under ``generations``, so every generation score can be audited)."""
    out: list[dict[str, list[str]]] = [{} for _ in range(gplan.num_records)]
    for family, (seq, rec, _, _) in gplan.families.items():
        for s, r in zip(seq.tolist(), rec.tolist()):
            out[r].setdefault(family, []).append(texts[s])
    return out


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
    rows = _stage_rows(summary)
    name = max([24] + [len(r[0]) for r in rows])
    width = name + (27 if final else 18)
    lines = [f"{'metric':<{name}} {'pre':>8} {'post':>8}" + (f" {'final':>8}" if final else ""), "-" * width]
    for metric, pre, post, after in rows:
        fmt = lambda v: f"{v:8.4f}" if v is not None else f"{'-':>8}"  # noqa: E731
        lines.append(f"{metric:<{name}} {fmt(pre)} {fmt(post)}" + (f" {fmt(after)}" if final else ""))
    extra = {k: v for k, v in summary.items() if not k.startswith(("pre/", "post/", "final/"))}
    if extra:
        lines.append("-" * width)
        lines.extend(f"{k:<33} {v:8.4f}" for k, v in extra.items())
    return "\n".join(lines)
