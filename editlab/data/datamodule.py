"""A LightningDataModule over edit records, with collation for causal and seq2seq models.

The splits are given as callables returning records (in Hydra configs: a loader function with
``_partial_: true``), so a split is read only when a stage needs it and each DDP rank reads its
own copy.  Batches are either lists of :class:`EditRecord` (the edit loop: editors and the scorer
tokenise themselves) or, with a collator such as :class:`editlab.data.collate.EditBatchCollator`,
:class:`~editlab.data.collate.EditBatch` tensors for training editors (the edit pair, its
rephrasings and its locality probes, as MEND's edit_inner / edit_outer / loc).

Training editors (``train``/``val`` splits):

* every record of those splits gets a locality probe where the split has any: a record without
  one borrows the first probe of the next record that has one (:func:`pair_locality`), as MEND
  pairs each edit with an unrelated locality example, so every training batch has a locality
  loss.  The ``test`` split is never changed.
* the training order is a seeded permutation per epoch, the same on every rank
  (:class:`EpochSampler`), and the training loader is resumable (:class:`ResumableDataLoader`):
  its position inside the epoch goes into Lightning checkpoints, so training resumed from a
  mid-epoch checkpoint sees exactly the batches an uninterrupted run would have seen.
* under DDP the validation and test splits are split over ranks without padding (every record
  scored exactly once; metrics are reduced by sum), the training split with DistributedSampler's
  padding (every rank takes the same number of steps).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning as L
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from editlab.data.records import EditRecord
from editlab.errors import UserError, require

__all__ = ["RecordDataset", "EditDataModule", "EmptySplitError", "EpochSampler", "ResumableDataLoader",
           "pair_locality"]

log = logging.getLogger(__name__)

RecordSource = Callable[[], Sequence[EditRecord]]


class EmptySplitError(UserError, ValueError):
    """A split of the data module read no records: a run over it would measure nothing and
    report an empty table, so it is refused; the message names the loader's file, offset and limit."""


def describe_source(source: Callable[..., Any]) -> str:
    """``load_x(path='...', offset=0, limit=5)`` for a loader partial (what Hydra's ``_partial_: true``
    builds), with the loader's defaults filled in; the callable's name otherwise."""
    if not isinstance(source, functools.partial):
        return getattr(source, "__qualname__", None) or repr(source)
    func = source.func
    name = getattr(func, "__name__", repr(func))
    try:
        bound = inspect.signature(func).bind_partial(*source.args, **source.keywords)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
    except (TypeError, ValueError):
        arguments = dict(source.keywords)
    shown = [f"{key}={arguments[key]!r}" for key in ("path", "offset", "limit") if key in arguments]
    return f"{name}({', '.join(shown)})"


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


def _distributed() -> tuple[int, int]:
    """(world size, rank) of the default process group, (1, 0) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class EpochSampler(DistributedSampler):
    """The training order: a permutation of the split per epoch, seeded by ``seed + epoch`` (the
    same on every rank, so it does not depend on the global RNG), divided over ranks as
    :class:`DistributedSampler` does (the last round padded so every rank takes the same number of
    steps).  Without a process group it is the single-process order (``num_replicas = 1``).

    :meth:`start_at` makes the next pass begin ``n`` samples into this rank's share (resuming
    mid-epoch); Lightning calls :meth:`set_epoch` at every epoch start.
    """

    def __init__(self, dataset: Dataset, shuffle: bool = True, seed: int = 0,
                 num_replicas: int | None = None, rank: int | None = None) -> None:
        world, me = _distributed()
        super().__init__(dataset, num_replicas=world if num_replicas is None else num_replicas,
                         rank=me if rank is None else rank, shuffle=shuffle, seed=seed, drop_last=False)
        self._start = 0

    def start_at(self, n: int) -> None:
        self._start = n

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        start, self._start = self._start, 0
        return iter(indices[start:])


class ResumableDataLoader(DataLoader):
    """A DataLoader over an :class:`EpochSampler` that Lightning checkpoints and restores.

    Lightning saves ``state_dict()`` of a training loader that has one (its ``_Stateful``
    protocol) and calls ``load_state_dict`` on resume; the state is the sampler's epoch and the
    number of batches served in it, and the first pass after loading skips those batches when it
    is the same epoch (a checkpoint taken at the end of an epoch resumes at the next one).
    """

    def __init__(self, dataset: Dataset, sampler: EpochSampler, **kwargs: Any) -> None:
        super().__init__(dataset, sampler=sampler, **kwargs)
        self._served = 0
        self._served_epoch = sampler.epoch
        self._resume: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        sampler: EpochSampler = self.sampler  # type: ignore[assignment]
        skip = 0
        if self._resume is not None:
            epoch, served = self._resume
            self._resume = None
            if epoch == sampler.epoch and served < len(self):
                skip = served
        sampler.start_at(skip * (self.batch_size or 1))
        self._served, self._served_epoch = skip, sampler.epoch
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        # the seed identifies the order; fit.init_from reads it to warn of a repeated order
        return {"epoch": int(self._served_epoch), "batches": int(self._served), "seed": int(self.sampler.seed)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = (int(state["epoch"]), int(state["batches"]))


def pair_locality(records: Sequence[EditRecord]) -> list[EditRecord]:
    """Give every record without a locality probe one: the first probe of the next record (in
    order, wrapping around) that has one, marked with group ``borrowed``.  MEND pairs every edit
    with an unrelated locality input; this makes a training/validation split whose records lack
    probes (some KnowEdit or WikiBio records) still carry a locality loss in every batch.  A split
    where no record has a probe is returned unchanged."""
    records = list(records)
    owners = [i for i, r in enumerate(records) if r.locality]
    if not owners or len(owners) == len(records):
        return records
    out, borrowed = [], 0
    for i, rec in enumerate(records):
        if rec.locality:
            out.append(rec)
            continue
        donor = next((j for j in owners if j > i), owners[0])
        probe = records[donor].locality[0]
        out.append(dataclasses.replace(rec, locality=(dataclasses.replace(probe, group="borrowed"),)))
        borrowed += 1
    log.info("%d of %d records without a locality probe borrowed one from another record",
             borrowed, len(records))
    return out


def collate_records(items: list[EditRecord]) -> list[EditRecord]:
    return list(items)


class EditDataModule(L.LightningDataModule):
    """Edit records for the edit loop (``test``) and for training editors (``train``/``val``).

    Args:
        test / train / val: callables returning the records of each split (None: no such split).
        batch_size: records per batch (per edit, in the edit loop: 1 = single edits, >1 = batch edits).
        train_batch_size / val_batch_size: records per training / validation batch (None: ``batch_size``).
        collator: None → batches are lists of records; else a callable such as
            :class:`editlab.data.collate.EditBatchCollator`.
        num_workers: DataLoader workers.
        shuffle_train: shuffle the training split (a new seeded permutation every epoch).
        seed: seed of the training order (the permutation of epoch ``e`` is seeded by ``seed + e``).
        pair_locality: give records of the train/val splits without a locality probe one borrowed
            from another record (:func:`pair_locality`).

    A split whose source returns no records raises :class:`EmptySplitError` when it is read (a
    run over it would report an empty table).
    """

    def __init__(
        self,
        test: RecordSource | None = None,
        train: RecordSource | None = None,
        val: RecordSource | None = None,
        batch_size: int = 1,
        train_batch_size: int | None = None,
        val_batch_size: int | None = None,
        collator: Callable | None = None,
        num_workers: int = 0,
        shuffle_train: bool = True,
        seed: int = 0,
        pair_locality: bool = True,
    ) -> None:
        super().__init__()
        sizes = {"batch_size": batch_size, "train_batch_size": train_batch_size,
                 "val_batch_size": val_batch_size}
        for name, size in sizes.items():
            require(size is None or size >= 1, name, "must be >= 1", size)
        self.sources = {"test": test, "train": train, "val": val}
        self.batch_size = batch_size
        self.batch_sizes = {"test": batch_size, "train": train_batch_size or batch_size,
                            "val": val_batch_size or batch_size}
        self.collator = collator
        self.num_workers = num_workers
        self.shuffle_train = shuffle_train
        self.seed = seed
        self.pair_locality = pair_locality
        self.datasets: dict[str, RecordDataset] = {}
        self.test_start = 0

    def resume_test(self, records: int) -> None:
        """Make the test loader start after its first ``records`` records (a resumed edit stream:
        those batches were done before the checkpoint).  Batches are consecutive slices of the
        split, so the rest of the stream is batched as before.  One process only (a stream is)."""
        require(isinstance(records, int) and records >= 0, "records", "must be an int >= 0", records)
        self.test_start = records

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage or "", tuple(self.sources))
        for split in wanted:
            if split not in self.datasets and self.sources.get(split) is not None:
                records = self.sources[split]()
                if len(records) == 0:
                    raise EmptySplitError(
                        f"the '{split}' split has no records: {describe_source(self.sources[split])} "
                        f"returned none; check data.{split}.path, data.{split}.offset and data.{split}.limit")
                if self.pair_locality and split in ("train", "val"):
                    records = pair_locality(records)
                self.datasets[split] = RecordDataset(records)

    def load(self, *stages: str) -> dict[str, int]:
        """Read and validate the records of the splits ``stages`` use (``fit``: train and val,
        ``validate``: val, ``test``: test) now, as :meth:`setup` would when Lightning calls it;
        a malformed record raises :class:`~editlab.data.records.RecordError` before anything
        else is built.  Returns the number of records of every split loaded so far."""
        for stage in stages:
            if stage not in ("fit", "validate", "test"):
                raise ValueError(f"stage must be 'fit', 'validate' or 'test', got {stage!r}")
            self.setup(stage)
        return {split: len(self.datasets[split]) for split in ("train", "val", "test") if split in self.datasets}

    def _dataset(self, split: str) -> RecordDataset:
        if split not in self.datasets:
            if self.sources.get(split) is None:
                raise ValueError(f"no '{split}' split configured in the data module")
            self.setup({"train": "fit", "val": "validate", "test": "test"}[split])
        return self.datasets[split]

    def _loader(self, split: str) -> DataLoader:
        dataset = self._dataset(split)
        sampler = None
        world, _ = _distributed()
        if split == "test" and self.test_start:
            if world > 1:
                raise ValueError("a resumed edit stream runs on one process")
            dataset = RecordDataset(dataset.records[self.test_start:])
        if world > 1:
            if split == "val" and len(dataset) < world:
                # a rank without validation batches would miss the collectives of the others' steps
                raise ValueError(f"the 'val' split has {len(dataset)} records for {world} processes: "
                                 "every process needs at least one")
            # each record is evaluated exactly once across ranks (no padding duplicates)
            sampler = UnpaddedDistributedSampler(dataset)
        return DataLoader(
            dataset,
            batch_size=self.batch_sizes[split],
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=self.collator or collate_records,
        )

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def train_dataloader(self) -> ResumableDataLoader:
        dataset = self._dataset("train")
        return ResumableDataLoader(
            dataset,
            sampler=EpochSampler(dataset, shuffle=self.shuffle_train, seed=self.seed),
            batch_size=self.batch_sizes["train"],
            num_workers=self.num_workers,
            collate_fn=self.collator or collate_records,
        )

    def val_dataloader(self) -> DataLoader | list:
        """The validation loader; an empty list (Lightning: no validation) when there is no ``val`` split."""
        if self.sources.get("val") is None:
            return []
        return self._loader("val")
