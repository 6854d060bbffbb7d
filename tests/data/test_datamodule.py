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


def test_a_split_with_no_records_is_a_user_error_naming_file_offset_and_limit(tmp_path):
    import functools
    import json

    from editlab.data.datamodule import EmptySplitError
    from editlab.data.loaders import load_counterfact_easyedit
    from editlab.entry import user_error
    from editlab.errors import UserError

    path = tmp_path / "cf.json"
    path.write_text(json.dumps([{"case_id": 1, "prompt": "Ada plays the", "target_new": "violin", "subject": "Ada",
                                 "ground_truth": "piano", "rephrase_prompt": "Ada is good at the",
                                 "locality_prompt": "Ben plays the", "locality_ground_truth": "piano"}]))
    source = functools.partial(load_counterfact_easyedit, path=str(path), data_dir=None, limit=0)
    dm = EditDataModule(test=source)
    with pytest.raises(EmptySplitError) as info:
        dm.load("test")
    assert str(info.value) == (
        f"the 'test' split has no records: load_counterfact_easyedit(path={str(path)!r}, offset=0, limit=0) "
        "returned none; check data.test.path, data.test.offset and data.test.limit")
    assert isinstance(info.value, UserError) and user_error(info.value) is info.value
    dm = EditDataModule(train=lambda: [], pair_locality=False)
    with pytest.raises(EmptySplitError, match=r"^the 'train' split has no records: .*<lambda> returned none"):
        dm.load("fit")
