"""Tokenise (prompt, target) pairs into teacher-forced batches for causal and seq2seq models.

Target tokens are found the way EasyEdit does it — tokenise ``prompt + " " + target`` and take
the tokens after the prompt's — so tokenisers that merge across the boundary or add a prefix
space (SentencePiece) still give the target as the model would see it in running text; when the
joint tokenisation does not start with the prompt's tokens, the target is tokenised on its own.

Causal models see ``prompt + target[:-1]`` and target token *j* is predicted at position
``len(prompt) - 1 + j``; seq2seq models get the prompt on the encoder side and
``[decoder_start] + target[:-1]`` on the decoder side.  Sequences are right-padded, which keeps
every real token's position id the same as in an unpadded forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from editlab.data.records import EditRecord, RecordError

__all__ = ["PairBatch", "EditBatch", "EditBatchCollator", "check_lengths", "encode_pairs", "subject_span", "target_text"]


def target_text(target: str) -> str:
    """The target as it follows a prompt: with one leading space (ROME / EasyEdit convention)."""
    return target if target.startswith(" ") else " " + target


def subject_span(tokenizer, text: str, subject: str, *, char_start: int | None = None) -> tuple[int, int]:
    """Token indices ``[start, end)`` of ``subject`` inside ``tokenizer(text)`` (special tokens
    included, as the model sees it).

    The subject's first occurrence in ``text`` is used unless ``char_start`` gives its character
    offset.  Tokens are matched by character offsets (a fast tokenizer is required), so a subject
    whose first or last token merges with the neighbouring text still maps to the tokens that
    carry it — ROME's "last subject token" is ``end - 1``.

    Raises:
        ValueError: the subject is empty or does not occur in ``text``.
    """
    if not subject:
        raise ValueError("subject is empty")
    begin = text.find(subject) if char_start is None else char_start
    if begin < 0 or text[begin : begin + len(subject)] != subject:
        raise ValueError(f"subject {subject!r} does not occur in {text!r}")
    stop = begin + len(subject)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("subject_span needs a fast tokenizer (character offsets)")
    offsets = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)["offset_mapping"]
    inside = [i for i, (a, b) in enumerate(offsets) if b > a and a < stop and b > begin]
    if not inside:
        raise ValueError(f"subject {subject!r} maps to no token of {text!r}")
    return inside[0], inside[-1] + 1


@dataclass
class PairBatch:
    """A tokenised batch of (prompt, target) pairs.

    Attributes:
        input_ids, attention_mask: ``[N, L]`` model input (encoder input for seq2seq).
        decoder_input_ids, decoder_attention_mask: ``[N, T]`` decoder input (seq2seq only).
        target_ids, target_mask: ``[N, T]`` target tokens (right-padded) and their mask.
        positions: ``[N, T]`` index, in the sequence whose logits the LM head sees (the input for
            causal models, the decoder input for seq2seq), of the logit that predicts each target
            token.  Padded entries point at position 0 and are masked out.
        prompt_lengths: ``[N]`` number of prompt tokens (causal: last prompt token at length - 1).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_ids: torch.Tensor
    target_mask: torch.Tensor
    positions: torch.Tensor
    prompt_lengths: torch.Tensor
    decoder_input_ids: torch.Tensor | None = None
    decoder_attention_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> PairBatch:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return PairBatch(**moved)

    def select(self, rows: Sequence[int] | torch.Tensor) -> PairBatch:
        """The pairs at ``rows`` (in that order), as a batch of their own (padding kept)."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.input_ids.device)
        picked = {k: (v[index] if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return PairBatch(**picked)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.decoder_input_ids is not None:
            inputs["decoder_input_ids"] = self.decoder_input_ids
            inputs["decoder_attention_mask"] = self.decoder_attention_mask
        return inputs

    def gather_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, position) indices of all real target tokens, row-major."""
        rows = torch.arange(len(self), device=self.positions.device).unsqueeze(1).expand_as(self.positions)
        return rows[self.target_mask], self.positions[self.target_mask]


def _split_targets(tokenizer, prompts: Sequence[str], targets: Sequence[str]) -> tuple[list, list]:
    prompt_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    joint_ids = tokenizer([p + target_text(t) for p, t in zip(prompts, targets)], add_special_tokens=True)[
        "input_ids"
    ]
    target_ids: list[list[int]] = []
    alone_needed = []
    for i, (p, j) in enumerate(zip(prompt_ids, joint_ids)):
        # drop special tokens the tokenizer appends at the end (e.g. </s>) from the joint encoding
        while len(j) > len(p) and j[-1] in tokenizer.all_special_ids:
            j = j[:-1]
        if len(j) > len(p) and j[: len(p)] == p:
            target_ids.append(j[len(p):])
        else:
            target_ids.append([])
            alone_needed.append(i)
    if alone_needed:
        alone = tokenizer([target_text(targets[i]) for i in alone_needed], add_special_tokens=False)["input_ids"]
        for i, ids in zip(alone_needed, alone):
            target_ids[i] = ids
    for i, ids in enumerate(target_ids):
        if not ids:
            raise ValueError(f"target {targets[i]!r} (pair {i}) tokenises to nothing")
    return prompt_ids, target_ids


def _pad(rows: Sequence[Sequence[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    return ids, mask


def encode_pairs(
    tokenizer,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    seq2seq: bool = False,
    decoder_start_token_id: int | None = None,
    max_prompt_tokens: int | None = None,
) -> PairBatch:
    """Tokenise ``(prompt, target)`` pairs for teacher-forced scoring or training.

    ``max_prompt_tokens`` keeps the *last* tokens of over-long prompts (the answer follows them).
    """
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    if not prompts:
        raise ValueError("encode_pairs needs at least one pair")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if seq2seq:
        prompt_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
        target_ids = tokenizer([t.strip() for t in targets], add_special_tokens=False)["input_ids"]
        if max_prompt_tokens:
            prompt_ids = [p[-max_prompt_tokens:] for p in prompt_ids]
        start = decoder_start_token_id if decoder_start_token_id is not None else pad_id
        input_ids, attention = _pad(prompt_ids, pad_id)
        dec_rows = [[start] + t[:-1] for t in target_ids]
        dec_ids, dec_mask = _pad(dec_rows, pad_id)
        tgt, tmask = _pad(target_ids, pad_id)
        positions = torch.arange(tgt.shape[1]).unsqueeze(0).expand_as(tgt).clone()
        positions[~tmask] = 0
        return PairBatch(
            input_ids=input_ids,
            attention_mask=attention.long(),
            target_ids=tgt,
            target_mask=tmask,
            positions=positions,
            prompt_lengths=torch.tensor([len(p) for p in prompt_ids]),
            decoder_input_ids=dec_ids,
            decoder_attention_mask=dec_mask.long(),
        )

    prompt_ids, target_ids = _split_targets(tokenizer, prompts, targets)
    if max_prompt_tokens:
        prompt_ids = [p[-max_prompt_tokens:] for p in prompt_ids]
    rows = [p + t[:-1] for p, t in zip(prompt_ids, target_ids)]
    input_ids, attention = _pad(rows, pad_id)
    tgt, tmask = _pad(target_ids, pad_id)
    lengths = torch.tensor([len(p) for p in prompt_ids])
    positions = lengths.unsqueeze(1) - 1 + torch.arange(tgt.shape[1]).unsqueeze(0)
    positions = torch.where(tmask, positions, torch.zeros_like(positions))
    return PairBatch(
        input_ids=input_ids,
        attention_mask=attention.long(),
        target_ids=tgt,
        target_mask=tmask,
        positions=positions,
        prompt_lengths=lengths,
    )


@dataclass
class EditBatch:
    """Tokenised training batch: ``edit`` (prompt → target_new), ``rephrase`` (first rephrase →
    target_new; None when no record has one) and ``locality`` (first locality probe → its answer).
    ``rephrase_rows`` / ``locality_rows`` give, for each of their rows, the index of its record
    (and of its row in ``edit``); None: row ``i`` belongs to record ``i``."""

    records: list[EditRecord]
    edit: PairBatch
    rephrase: PairBatch | None
    locality: PairBatch | None
    rephrase_rows: torch.Tensor | None = None
    locality_rows: torch.Tensor | None = None

    def to(self, device) -> EditBatch:
        def move(t):
            return t.to(device) if t is not None else None

        return EditBatch(self.records, self.edit.to(device), move(self.rephrase), move(self.locality),
                         move(self.rephrase_rows), move(self.locality_rows))

    def select(self, indices: Sequence[int]) -> EditBatch:
        """The records at ``indices`` (in that order) as a batch of their own: their edit rows and
        the rephrase / locality rows that belong to them, with the row → record indices renumbered
        (padding kept, so every row is computed exactly as in this batch)."""
        index = [int(i) for i in indices]
        where = {old: new for new, old in enumerate(index)}

        def part(pairs: PairBatch | None, owners: torch.Tensor | None):
            if pairs is None:
                return None, None
            owner = owners.tolist() if owners is not None else list(range(len(pairs)))
            keep = [i for i, r in enumerate(owner) if r in where]
            if not keep:
                return None, None
            rows = torch.tensor([where[owner[i]] for i in keep], dtype=torch.long, device=pairs.input_ids.device)
            return pairs.select(keep), rows

        rephrase, rephrase_rows = part(self.rephrase, self.rephrase_rows)
        locality, locality_rows = part(self.locality, self.locality_rows)
        return EditBatch([self.records[i] for i in index], self.edit.select(index), rephrase, locality,
                         rephrase_rows, locality_rows)

    def rows_of(self, part: PairBatch) -> torch.Tensor:
        """The record index of every row of ``part`` (``edit``, ``rephrase`` or ``locality``)."""
        if part is self.rephrase and self.rephrase_rows is not None:
            return self.rephrase_rows
        if part is self.locality and self.locality_rows is not None:
            return self.locality_rows
        if part is not self.edit and part is not self.rephrase and part is not self.locality:
            raise ValueError("rows_of: not a part of this batch")
        return torch.arange(len(part), device=part.input_ids.device)


class EditBatchCollator:
    """Collate records into :class:`EditBatch` for a causal (``seq2seq=False``) or seq2seq model."""

    def __init__(self, tokenizer, seq2seq: bool = False, decoder_start_token_id: int | None = None,
                 max_prompt_tokens: int | None = None):
        self.tokenizer = tokenizer
        self.seq2seq = seq2seq
        self.decoder_start_token_id = decoder_start_token_id
        self.max_prompt_tokens = max_prompt_tokens

    def _encode(self, prompts: list[str], targets: list[str]) -> PairBatch | None:
        if not prompts:
            return None
        return encode_pairs(self.tokenizer, prompts, targets, seq2seq=self.seq2seq,
                            decoder_start_token_id=self.decoder_start_token_id,
                            max_prompt_tokens=self.max_prompt_tokens)

    def __call__(self, items: list[EditRecord]) -> EditBatch:
        records = list(items)
        reph = [(i, r.rephrase_prompts[0], r.target_new) for i, r in enumerate(records) if r.rephrase_prompts]
        loc = [(i, r.locality[0].prompt, r.locality[0].target) for i, r in enumerate(records) if r.locality]
        return EditBatch(
            records=records,
            edit=self._encode([r.prompt for r in records], [r.target_new for r in records]),
            rephrase=self._encode([p for _, p, _ in reph], [t for _, _, t in reph]),
            locality=self._encode([p for _, p, _ in loc], [t for _, _, t in loc]),
            rephrase_rows=torch.tensor([i for i, _, _ in reph], dtype=torch.long) if reph else None,
            locality_rows=torch.tensor([i for i, _, _ in loc], dtype=torch.long) if loc else None,
        )


def _scored_texts(record: EditRecord) -> list[tuple[str, str, str | None]]:
    """``(field, prompt, answer)`` for every text the edit loop feeds the model for ``record``
    (answer None: a generation prompt, continued by the model)."""
    answers = [t for t in (record.target_new, record.target_true) if t]
    longest = max(answers, key=len) if answers else ""
    out = [("prompt", record.prompt, longest)]
    out += [(f"rephrase_prompts[{i}]", p, record.target_new) for i, p in enumerate(record.rephrase_prompts)]
    for name in ("locality", "portability"):
        out += [(f"{name}[{i}]", p.prompt, max((p.target, *p.aliases), key=len))
                for i, p in enumerate(getattr(record, name))]
    out += [(f"neighborhood_prompts[{i}]", p, longest) for i, p in enumerate(record.neighborhood_prompts)]
    out += [(f"attribute_prompts[{i}]", p, longest) for i, p in enumerate(record.attribute_prompts)]
    out += [(f"generation_prompts[{i}]", p, None) for i, p in enumerate(record.generation_prompts)]
    return out


def check_lengths(records: Sequence[EditRecord], tokenizer, max_positions: int | None, *,
                  generation_tokens: int = 0, answer_tokens: int = 0, max_prompt_tokens: int | None = None,
                  frame: Callable[[str], str] | None = None, model_name: str = "the model") -> None:
    """Refuse, with a :class:`RecordError` naming the record, the field and the lengths, a record
    with a text longer than the ``max_positions`` tokens the model takes.  Beyond its positions a
    model fails with an opaque indexing error (learned position tables, GPT-2) or silently runs
    where it was never trained (rotary positions, Llama), and editors ask for memory in proportion.

    Checked: every prompt with its answer (teacher-forced; at least ``answer_tokens`` after it when
    answers are also generated), and every generation prompt with the ``generation_tokens``
    generated after it.  ``max_prompt_tokens``: teacher-forced scoring truncates probe prompts to
    that many tokens (the user's choice), so only their truncated length counts when no answer is
    generated; the edit prompt must fit whole, since editors read it whole.  ``frame``: how
    answers are asked for when they are generated (a chat template, a question-answer template:
    :meth:`~editlab.evaluation.generation.GenerationScoring.frame`); the framed prompt with
    ``answer_tokens`` after it must fit too.  ``max_positions`` None: no limit.

    Only texts that could be too long are tokenized: no tokenizer makes more tokens than a text has
    UTF-8 bytes plus a few (a leading word-boundary piece, special tokens)."""
    if not max_positions:
        return
    slack = 8
    for record in records:
        texts = _scored_texts(record)
        if frame is not None and answer_tokens:  # answers generated for the framed prompts
            texts += [(f"{field} (framed for generation)", frame(prompt), "")
                      for field, prompt, answer in texts if answer is not None]
        for field, prompt, answer in texts:
            after = generation_tokens if answer is None else answer_tokens
            joined = prompt + (target_text(answer) if answer else "")
            if len(joined.encode("utf-8", "surrogatepass")) + slack + after <= max_positions:
                continue
            prompt_len = len(tokenizer(prompt, add_special_tokens=True)["input_ids"])
            # teacher-forced scoring truncates probe prompts when the user asks; generation does not,
            # and editors read the edit prompt whole
            can_truncate = field != "prompt" and answer is not None and not answer_tokens
            truncated = bool(max_prompt_tokens) and can_truncate
            if truncated:
                prompt_len = min(prompt_len, max_prompt_tokens)
            answer_len = len(tokenizer(target_text(answer), add_special_tokens=False)["input_ids"]) if answer else 0
            tail = max(answer_len, after)
            if prompt_len + tail <= max_positions:
                continue
            what = (f"answer ({answer_len})" if answer is not None and answer_len >= after
                    else f"generated tokens ({after})")
            hint = "" if truncated or not can_truncate else (
                ", or truncate probe prompts from the left with module.scoring.max_prompt_tokens")
            raise RecordError(record.source or "<record>", record.index if record.index >= 0 else None, field,
                              f"prompt ({prompt_len}) + {what} = {prompt_len + tail} tokens, longer than the "
                              f"{max_positions} positions {model_name} takes (record {record.record_id!r}); "
                              f"shorten or drop the record{hint}")
