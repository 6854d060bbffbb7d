"""A stream killed with SIGKILL mid-way (``python -m editlab.train``, a tiny model) and continued
with ``stream.resume=true`` ends with the records, summary and curves of the same stream run
without a kill.  One multirun process runs the uninterrupted stream (job 0), then the stream that
kills itself before batch 4 (job 1; stream checkpoint after batch 2, records of batches 1-3 on
disk); a second process resumes job 1 in its run folder.  Every kind of edit state is covered
in-process, faster, by tests/lit/test_stream_resume.py."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys

import lightning as L
import pytest
from test_configs import _write_fixture
from test_train import BASE, HERE, ROOT

STREAM = ["stream.edits=5", "stream.batch_size=1", "stream.eval_every=2", "stream.checkpoint_every=2"]


class KillAt(L.Callback):
    """SIGKILLs its own process when batch ``batch`` (0-based) is about to be edited; -1: never."""

    def __init__(self, batch: int):
        self.batch = batch

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


def outputs(out):
    """records.jsonl (without edit times), summary.json (without timings) and curves.csv of a run."""
    rows = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("edit_seconds")
    summary = {k: v for k, v in json.loads((out / "summary.json").read_text()).items() if not k.startswith("time/")}
    with open(out / "curves.csv", newline="") as fh:
        return rows, summary, list(csv.reader(fh))


# FT-L (summed deltas) and GRACE (a stateful editor: its codebook is the stream state, its adapter
# is rebuilt at its host on resume); the in-process test covers every editor
METHODS = {
    "ft": BASE,
    "grace": [o for o in BASE if not o.startswith("method.")] + ["method=grace", "method.layer=1", "method.n_iter=10"],
}


def _train(tmp_path, *overrides, multirun=False, method="ft"):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)]),
               EDITLAB_DATA_DIR=str(tmp_path))
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, "-m", "editlab.train", *(["-m"] if multirun else []), *METHODS[method],
           f"+model.marker={tmp_path / 'model_loaded'}", *STREAM, *overrides]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("method", list(METHODS))
def test_a_killed_stream_resumes_to_the_results_of_an_uninterrupted_one(tmp_path, method):
    _write_fixture(tmp_path / "cf.json", n=5)
    sweep = tmp_path / "sweep"
    proc = _train(tmp_path, f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}",
                  "+callbacks.kill._target_=test_stream_kill.KillAt", "+callbacks.kill.batch=-1,3", multirun=True,
                  method=method)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    whole, killed = sweep / "0", sweep / "1"
    assert (whole / "summary.json").exists() and not (killed / "summary.json").exists()
    assert len((killed / "records.jsonl").read_text().splitlines()) == 3  # batch 3 is past the checkpoint
    assert [p.name for p in (killed / "stream").iterdir()] == ["batch_000002.pt"]
    proc = _train(tmp_path, f"hydra.run.dir={killed}", "stream.resume=true", method=method)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming the edit stream" in proc.stdout + proc.stderr
    assert outputs(killed) == outputs(whole)
    if method == "grace":
        return
    # a resume under other settings is refused before the model loads, naming what differs
    proc = _train(tmp_path, f"hydra.run.dir={killed}", "stream.resume=true", "method.lr=0.5")
    assert proc.returncode == 1 and "error: stream.resume" in proc.stderr and "method.lr" in proc.stderr, proc.stderr


def test_a_stream_whose_run_trained_its_editor_resumes_with_the_checkpoint_it_tested(tmp_path):
    """A run that trains its editor and then streams (``fit``, no ``ckpt_path``) resumes its stream
    with ``ckpt_path`` = the editor checkpoint it trained and tested; another checkpoint, or none,
    is refused before the model loads, naming the one to pass."""
    from omegaconf import open_dict
    from test_configs import _compose

    from editlab.errors import SettingError
    from editlab.lit.stream import FORMAT, write_stream_checkpoint
    from editlab.train import apply_stream, check_resume, run_fingerprint

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    best, last = run_dir / "checkpoints" / "editor-step132.ckpt", run_dir / "checkpoints" / "last.ckpt"
    best.write_bytes(b"")
    last.write_bytes(b"")

    def config(*overrides):
        cfg = _compose(["experiment=serac_smollm2_zsre_stream", f"paths.output_dir={run_dir}", *overrides])
        apply_stream(cfg)
        return cfg

    trained = config()  # the run as it was started: it trains, then streams
    write_stream_checkpoint({"format": FORMAT, "batches": 500, "rows": 500, "session": {}, "loop": {}, "rng": {},
                             "config": run_fingerprint(trained)}, run_dir / "stream")

    def resume(*overrides):
        cfg = config("stream.resume=true", *overrides)
        check_resume(cfg)
        return cfg

    with pytest.raises(SettingError, match=f"ckpt_path={best}"):
        resume()  # would train again: the error names the checkpoint to pass
    assert resume(f"ckpt_path={best}").module.resume_from == str(run_dir / "stream" / "batch_000500.pt")
    for wrong in (last, tmp_path / "other.ckpt"):
        with pytest.raises(SettingError, match="the resumed run trained and tested"):
            resume(f"ckpt_path={wrong}")
    with pytest.raises(SettingError, match="test_weights=last"):
        resume(f"ckpt_path={best}", "fit.test_weights=last")
    # a run started from a saved editor keeps comparing its ckpt_path as any setting
    given = config(f"ckpt_path={best}")
    with open_dict(given):
        given.ckpt_path = str(tmp_path / "other.ckpt")
    write_stream_checkpoint({"format": FORMAT, "batches": 600, "rows": 600, "session": {}, "loop": {}, "rng": {},
                             "config": run_fingerprint(given)}, run_dir / "stream")
    with pytest.raises(SettingError, match="other settings"):
        resume(f"ckpt_path={best}")
