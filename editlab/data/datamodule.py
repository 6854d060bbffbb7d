"""A LightningDataModule over edit records, with collation for causal and seq2seq models.

The splits are given as callables returning records (in Hydra configs: a loader function with
``_partial_: true``), so a split is read only when a stage needs it and each DDP rank reads its
own copy.  Batches are either lists of :class:`EditRecord` (the edit loop: editors and the scorer
tokenise themselves) or, with a tokenizer, :class:`EditBatch` tensors for training editors
(the edit pair, its rephrasings and its locality probes, as MEND's edit_inner / edit_outer / loc).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import lightning as L
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from editlab.data.collate import PairBatch, encode_pairs
from editlab.data.records import EditRecord

__all__ = ["RecordDataset", "EditBatch", "EditBatchCollator", "EditDataModule"]

RecordSource = Callable[[], Sequence[EditRecord]]


class RecordDataset(Dataset):
    def __init__(self, records: Sequence[EditRecord]):
        self.records = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> EditRecord:
        return self.records[i]


class UnpaddedDistributedSampler(DistributedSampler):
    """Rank ``r`` of ``w`` gets records ``r, r + w, r + 2w, ...``: every record exactly once.

    PyTorch's DistributedSampler pads the last round with repeated records so all ranks get the
    same count; repeated records would be scored twice and bias an evaluation.  The edit loop
    needs no equal counts (metrics are reduced by sum), so nothing is repeated here."""

    def __init__(self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(self.rank, len(dataset), self.num_replicas))
        self.total_size = len(dataset)

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))


def collate_records(items: list[EditRecord]) -> list[EditRecord]:
    return list(items)


@dataclass
class EditBatch:
    """Tokenised training batch: ``edit`` (prompt → target_new), ``rephrase`` (first rephrase →
    target_new; None when no record has one) and ``locality`` (first locality probe → its answer)."""

    records: list[EditRecord]
    edit: PairBatch
    rephrase: PairBatch | None
    locality: PairBatch | None

    def to(self, device) -> EditBatch:
        return EditBatch(
            self.records,
            self.edit.to(device),
            self.rephrase.to(device) if self.rephrase is not None else None,
            self.locality.to(device) if self.locality is not None else None,
        )


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
        reph = [(r.rephrase_prompts[0], r.target_new) for r in records if r.rephrase_prompts]
        loc = [(r.locality[0].prompt, r.locality[0].target) for r in records if r.locality]
        return EditBatch(
            records=records,
            edit=self._encode([r.prompt for r in records], [r.target_new for r in records]),
            rephrase=self._encode([p for p, _ in reph], [t for _, t in reph]),
            locality=self._encode([p for p, _ in loc], [t for _, t in loc]),
        )


class EditDataModule(L.LightningDataModule):
    """Edit records for the edit loop (``test``) and for training editors (``train``/``val``).

    Args:
        test / train / val: callables returning the records of each split (None: no such split).
        batch_size: records per batch (per edit, in the edit loop: 1 = single edits, >1 = batch edits).
        collator: None → batches are lists of records; else a callable such as
            :class:`EditBatchCollator`.
        num_workers: DataLoader workers.
        shuffle_train: shuffle the training split.
    """

    def __init__(
        self,
        test: RecordSource | None = None,
        train: RecordSource | None = None,
        val: RecordSource | None = None,
        batch_size: int = 1,
        collator: Callable | None = None,
        num_workers: int = 0,
        shuffle_train: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sources = {"test": test, "train": train, "val": val}
        self.batch_size = batch_size
        self.collator = collator
        self.num_workers = num_workers
        self.shuffle_train = shuffle_train
        self.datasets: dict[str, RecordDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage or "", tuple(self.sources))
        for split in wanted:
            if split not in self.datasets and self.sources.get(split) is not None:
                self.datasets[split] = RecordDataset(self.sources[split]())

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        if split not in self.datasets:
            if self.sources.get(split) is None:
                raise ValueError(f"no '{split}' split configured in the data module")
            self.setup({"train": "fit", "val": "validate", "test": "test"}[split])
        dataset = self.datasets[split]
        sampler = None
        if split == "test" and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # each record is evaluated exactly once across ranks (no padding duplicates)
            sampler = UnpaddedDistributedSampler(dataset)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=self.collator or collate_records,
        )

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=self.shuffle_train)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")
