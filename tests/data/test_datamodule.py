"""EditDataModule.load: records read and validated before anything else is built."""

from __future__ import annotations

import pytest

from editlab.data.datamodule import EditDataModule
from editlab.data.records import RecordError
from editlab.errors import SettingError


def _source(records, calls):
    def read():
        calls.append(1)
        if isinstance(records, Exception):
            raise records
        return records
    return read


def test_load_reads_the_splits_of_the_stages_once(tmp_path):
    calls = {"test": [], "train": [], "val": []}
    dm = EditDataModule(test=_source(["t1", "t2"], calls["test"]), train=_source(["a", "b", "c"], calls["train"]),
                        val=_source(["v"], calls["val"]), pair_locality=False)
    assert dm.load("test") == {"test": 2}
    assert calls == {"test": [1], "train": [], "val": []}
    assert dm.load("fit", "test") == {"train": 3, "val": 1, "test": 2}
    dm.setup("test")  # what Lightning calls later: nothing is read again
    dm.setup("fit")
    assert calls == {"test": [1], "train": [1], "val": [1]}
    assert len(dm.test_dataloader()) == 2


def test_load_raises_the_record_error_of_a_split():
    bad = RecordError("cf.json", 3, "requested_rewrite.subject", "missing")
    dm = EditDataModule(test=_source(["ok"], []), train=_source(bad, []))
    assert dm.load("test") == {"test": 1}
    with pytest.raises(RecordError, match="cf.json, record 3, field 'requested_rewrite.subject'"):
        dm.load("fit")
    with pytest.raises(ValueError, match="stage"):
        dm.load("predict")


def test_a_bad_batch_size_is_named():
    with pytest.raises(SettingError, match=r"^val_batch_size must be >= 1, got 0$"):
        EditDataModule(batch_size=2, val_batch_size=0)
