"""Greedy generation of answers, and how a probe is put to the model (framing and length cap).

:func:`greedy_generate` continues prompts greedily in batches (KV cache, left padding), optionally
stopping each row where an answer ends (:func:`cut_answer`).  :class:`GenerationScoring` holds the
generation-mode settings of the edit loop: the framing (``plain``: the prompt as is;
``question_answer``: the prompt put into a template; ``chat``: the prompt as the user turn of the
tokenizer's chat template, the assistant turn opened), which names the metric keys
(:data:`editlab.metrics.keys.GENERATION_LABELS`), and each answer's token cap (its reference's
tokens plus a margin, under an absolute cap).
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Sequence

import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList

from editlab.data.collate import target_text
from editlab.data.records import EditRecord
from editlab.evaluation.probes import GenerationPlan, build_generation_plan
from editlab.metrics.keys import GENERATION_LABELS
from editlab.models.arch import is_encoder_decoder

__all__ = [
    "ANSWER_END", "FRAMINGS", "QA_TEMPLATE", "GenerationScoring", "answer_token_table", "cut_answer",
    "greedy_generate",
]

FRAMINGS = tuple(GENERATION_LABELS)
"""Generation framings: ``plain``, ``question_answer``, ``chat``."""

QA_TEMPLATE = "Question: {prompt}\nAnswer:"
"""The default question-answer framing (``{prompt}`` is replaced by the probe's prompt)."""


ANSWER_END = re.compile(r"\n|[.!?](?=\s|$)")
"""Where a generated answer ends: a newline, or ``.``/``!``/``?`` followed by whitespace or the end."""


def cut_answer(text: str) -> str:
    """The answer part of a generation: leading whitespace dropped, cut before the first
    :data:`ANSWER_END` (so ``" Paris.\nThe"`` → ``"Paris"``)."""
    text = text.lstrip()
    match = ANSWER_END.search(text)
    return text[: match.start()] if match else text


_ANSWER_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def answer_token_table(tokenizer, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ends, content)``, two bool tensors over token ids (cached per tokenizer).

    ``ends[v]``: token ``v``'s text contains a newline or ends (right-stripped) with ``.``, ``!``
    or ``?``, i.e. it can end an answer; ``content[v]``: its text has a non-space character.
    ``size`` pads both to the model's vocabulary (ids past the tokenizer's are neither).
    """
    n = len(tokenizer)
    table = _ANSWER_TABLES.get(tokenizer)
    if table is None:
        texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=True)
        ends = torch.tensor([("\n" in t) or t.rstrip().endswith((".", "!", "?")) for t in texts])
        content = torch.tensor([bool(t.strip()) for t in texts])
        table = (ends, content)
        _ANSWER_TABLES[tokenizer] = table
    ends, content = table
    if size is not None and size > n:
        pad = torch.zeros(size - n, dtype=torch.bool)
        ends, content = torch.cat([ends, pad]), torch.cat([content, pad])
    return ends, content


class _AnswerStop(StoppingCriteria):
    """Per-row stop: the row reached its own token cap, or (``answer_end``) produced a token that
    ends an answer after the answer had started (a leading newline does not end an empty answer).
    Records how many new tokens each row kept."""

    def __init__(self, caps: torch.Tensor, offset: int, tables: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        self.caps = caps
        self.offset = offset
        self.tables = tables
        self.done = torch.zeros_like(caps, dtype=torch.bool)
        self.started = torch.zeros_like(self.done)
        self.kept = caps.clone()

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        step = input_ids.shape[1] - self.offset
        stop = torch.full_like(self.caps, step) >= self.caps
        if self.tables is not None:
            last = input_ids[:, -1]
            ends, content = self.tables[0].to(last.device), self.tables[1].to(last.device)
            self.started |= content[last]
            stop |= ends[last] & self.started
        new = stop & ~self.done
        self.kept[new] = step
        self.done |= stop
        return self.done.clone()


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int | Sequence[int] = 50,
    chunk_size: int = 16,
    stop_at_answer_end: bool = False,
) -> list[str]:
    """Greedy continuations of ``prompts`` (batched, KV cache, left padding for decoder-only models;
    a seq2seq model's encoder reads the prompt as is), decoded without the prompt.

    ``max_new_tokens``: one cap for all, or one per prompt (answer scoring derives it from the
    target's length); with per-prompt caps the prompts are sorted by cap and length before chunking,
    so a chunk's rows need similar numbers of steps and little padding.  A row stops at its cap;
    with ``stop_at_answer_end`` also at EOS, at a newline or at a sentence end (see
    :func:`answer_token_table`), and the text returned is :func:`cut_answer` of the generation.
    A chunk stops as soon as all its rows have stopped (rows that stopped earlier are carried as
    padding until then; sorting by cap keeps that short).
    """
    device = next(model.parameters()).device
    seq2seq = is_encoder_decoder(model)
    per_row = not isinstance(max_new_tokens, int)
    caps = list(max_new_tokens) if per_row else [max_new_tokens] * len(prompts)
    if len(caps) != len(prompts):
        raise ValueError(f"{len(caps)} token caps for {len(prompts)} prompts")
    if any(c < 1 for c in caps):
        raise ValueError(f"token caps must be >= 1, got {min(caps)}")
    order = (sorted(range(len(prompts)), key=lambda i: (caps[i], len(prompts[i]))) if per_row
             else list(range(len(prompts))))
    tables = None
    if stop_at_answer_end:
        tables = answer_token_table(tokenizer, int(model.get_output_embeddings().weight.shape[0]))
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs: list[str] = [""] * len(prompts)
    try:
        for lo in range(0, len(order), chunk_size):
            idx = order[lo: lo + chunk_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True).to(device)
            row_caps = torch.tensor([caps[i] for i in idx], device=device)
            offset = 1 if seq2seq else enc["input_ids"].shape[1]
            stop = _AnswerStop(row_caps, offset, tables)
            out = model.generate(
                **enc,
                max_new_tokens=int(row_caps.max()),
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                stopping_criteria=StoppingCriteriaList([stop]),
            )
            new = out[:, offset:]
            for j, i in enumerate(idx):
                tokens = new[j, : int(stop.kept[j])]
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                outputs[i] = cut_answer(text) if stop_at_answer_end else text
    finally:
        tokenizer.padding_side = side
    return outputs


class GenerationScoring:
    """How the edit loop puts probes to the model in generation mode, and generates the answers.

    Built by :meth:`editlab.evaluation.scorer.ScoringSettings.build` from settings it has checked
    (``generation_framing``, ``qa_template``, ``generation_margin``, ...); what needs the tokenizer
    (a chat template for the chat framing) is checked here.

    Args:
        tokenizer: the model's tokenizer (token caps, the chat template).
        framing: ``plain`` (the prompt as is), ``question_answer`` (the prompt put into
            ``qa_template``) or ``chat`` (the prompt as the user turn of the tokenizer's chat
            template, with the assistant turn opened: for instruction-tuned models); it labels the
            metric keys (:attr:`label`: ``generation`` / ``generation_qa`` / ``generation_chat``).
        qa_template: format string with ``{prompt}`` for the question-answer framing.
        margin: an answer is capped at its reference's token count plus this ...
        max_new_tokens: ... and never more than this many tokens.
        chunk_size: prompts per batched generation.
    """

    def __init__(self, tokenizer, framing: str = "plain", qa_template: str = QA_TEMPLATE, margin: int = 5,
                 max_new_tokens: int = 32, chunk_size: int = 32) -> None:
        if framing == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("generation_framing=chat needs a tokenizer with a chat template; this one has none "
                             "(use plain or question_answer)")
        self.tokenizer = tokenizer
        self.framing = framing
        self.label = GENERATION_LABELS[framing]
        self.template = qa_template if framing == "question_answer" else "{prompt}"
        self.margin = margin
        self.max_new_tokens = max_new_tokens
        self.chunk_size = chunk_size
        self._target_tokens: dict[str, int] = {}

    def frame(self, prompt: str) -> str:
        """The text the model continues for ``prompt``."""
        if self.framing == "chat":
            return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
        return self.template.format(prompt=prompt)

    def cap(self, target: str) -> int:
        """Token cap of a generated answer whose reference is ``target``."""
        if target not in self._target_tokens:
            ids = self.tokenizer(target_text(target), add_special_tokens=False)["input_ids"]
            self._target_tokens[target] = len(ids)
        return max(1, min(self._target_tokens[target] + self.margin, self.max_new_tokens))

    def plan(self, records: Sequence[EditRecord]) -> GenerationPlan:
        """The generations that score ``records`` (:func:`~editlab.evaluation.probes.build_generation_plan`)."""
        return build_generation_plan(records, self.frame, self.cap)

    def generate(self, model: nn.Module, plan: GenerationPlan, cache: dict[tuple[str, int], str] | None = None
                 ) -> list[str]:
        """Greedy answers to the plan's prompts on ``model`` as it is, one per generation of the plan;
        through ``cache`` (answers of one fixed model state by ``(framed prompt, cap)``) when given."""
        keys = plan.keys()
        todo = keys if cache is None else [k for k in dict.fromkeys(keys) if k not in cache]
        texts = greedy_generate(model, self.tokenizer, [p for p, _ in todo], max_new_tokens=[c for _, c in todo],
                                chunk_size=self.chunk_size, stop_at_answer_end=True) if todo else []
        if cache is None:
            return texts
        cache.update(zip(todo, texts))
        return [cache[k] for k in keys]
