"""Result writing (editlab/lit/results.py): records appended as batches finish, rank files merged,
the writer always present when the module has an output folder."""

import dataclasses
import json
import signal

import lightning as L
import pytest

from editlab.data.datamodule import EditDataModule
from editlab.lit.callbacks import EditorCallback
from editlab.lit.edit_eval import EditEvalModule
from editlab.lit.results import ResultsWriter, merge_record_files, rank_file
from editlab.methods.ft import FTL

from conftest import assert_state_equal, make_records, state_copy


def _five_records():
    base = make_records()
    return [dataclasses.replace(base[i % 3], record_id=i, index=i) for i in range(5)]


class _Interrupt(L.Callback):
    """Ctrl-C at the start of batch ``at`` (after the records of the batches before it were written)."""

    def __init__(self, at: int):
        self.at = at
        self.lines_seen: list[int] = []

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.lines_seen.append(len(self.path.read_text().splitlines()))
        if batch_idx == self.at:
            raise KeyboardInterrupt


def test_interrupted_run_keeps_the_records_of_every_finished_batch(tiny, tmp_path):
    bundle = tiny("gpt2")
    before = state_copy(bundle.model)
    module = EditEvalModule(bundle, output_dir=str(tmp_path))
    stop = _Interrupt(at=3)
    stop.path = tmp_path / "records.jsonl"
    trainer = L.Trainer(accelerator="cpu", devices=1, inference_mode=False, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[EditorCallback(FTL(layers=[1], lr=0.05, num_steps=5)), stop])
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning's graceful shutdown after a KeyboardInterrupt
            trainer.test(module, datamodule=EditDataModule(test=_five_records, batch_size=1), verbose=False)
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores further Ctrl-C while shutting down
    assert_state_equal(bundle.model, before)
    rows = [json.loads(x) for x in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert [r["record_id"] for r in rows] == [0, 1, 2]  # batches 0, 1, 2 finished; 3 was interrupted
    assert all(r["post"]["reliability"] is not None and r["edit_seconds"] > 0 for r in rows)
    assert stop.lines_seen == [0, 1, 2, 3]  # each batch's records were on disk before the next batch began
    assert not (tmp_path / "summary.json").exists()  # no summary of a run that did not finish


def test_records_are_rewritten_at_the_end_with_the_final_stage(tiny, tmp_path):
    module = EditEvalModule(tiny("gpt2"), output_dir=str(tmp_path), score_after_stream=True)
    trainer = L.Trainer(accelerator="cpu", devices=1, inference_mode=False, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[EditorCallback(FTL(layers=[1], lr=0.05, num_steps=5), sequential=True)])
    trainer.test(module, datamodule=EditDataModule(test=_five_records, batch_size=2), verbose=False)
    rows = [json.loads(x) for x in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert rows == module.results.records and len(rows) == 5
    assert all("final" in r for r in rows)
    assert not list(tmp_path.glob("*.tmp"))


def test_the_module_adds_its_writer_only_with_an_output_dir(tiny, tmp_path):
    assert EditEvalModule(tiny("gpt2")).configure_callbacks() == []
    (writer,) = EditEvalModule(tiny("gpt2"), output_dir=str(tmp_path)).configure_callbacks()
    assert isinstance(writer, ResultsWriter) and writer.output_dir == tmp_path


def test_rank_files_merge_in_record_order_and_are_removed(tmp_path):
    # a distributed sampler deals records 0..4 to 2 ranks as 0, 2, 4 and 1, 3
    for rank, indexes in ((0, [0, 2, 4]), (1, [1, 3])):
        rank_file(tmp_path, rank).write_text("".join(json.dumps({"index": i, "record_id": f"r{i}"}) + "\n"
                                                     for i in indexes))
    assert merge_record_files(tmp_path, 2) == 5
    rows = [json.loads(x) for x in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert [r["record_id"] for r in rows] == ["r0", "r1", "r2", "r3", "r4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["records.jsonl"]


def test_rank_files_without_indexes_keep_the_sampler_order(tmp_path):
    for rank, ids in ((0, ["a", "c", "e"]), (1, ["b", "d"])):
        rank_file(tmp_path, rank).write_text("".join(json.dumps({"index": -1, "record_id": i}) + "\n" for i in ids))
    merge_record_files(tmp_path, 2)
    rows = [json.loads(x) for x in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert [r["record_id"] for r in rows] == ["a", "b", "c", "d", "e"]


def test_the_editor_callback_refuses_a_module_without_the_edit_interface(tiny):
    class _Plain(L.LightningModule):
        def test_step(self, batch, batch_idx):
            return None

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, inference_mode=False,
                        callbacks=[EditorCallback(FTL(layers=[1]))])
    with pytest.raises(TypeError, match="EditTarget"):
        trainer.test(_Plain(), datamodule=EditDataModule(test=make_records), verbose=False)
