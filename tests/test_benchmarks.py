"""The benchmark scripts run (tiny models, a few edits): benchmarks/lifelong.py."""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lifelong = _load("lifelong")
COLUMNS = ["method", "edits", "batch", "device", "setup s", "s/edit", "edits/s", "total", "first", "last",
           "base", "peak RSS", "peak CUDA", "state MB", "failed"]


def _child_args(method: str, **kw) -> argparse.Namespace:
    base = dict(child=method, model="tiny_llama", edits=4, batch_size=2, accelerator="cpu", stats_ok=False,
                tiny=True, override=[], seed=0, data_dir=None)
    return argparse.Namespace(**{**base, **kw})


def test_lifelong_script_prints_one_row_per_method_with_every_column(tmp_path):
    env = dict(os.environ, EDITLAB_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(ROOT / "benchmarks" / "lifelong.py"), "--model", "tiny_llama", "--tiny",
           "--methods", "ultraedit", "--edits", "4", "--batch-size", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = lines[1]
    positions = [header.index(c) for c in COLUMNS]
    assert positions == sorted(positions)
    row = lines[3].split()
    assert row[:4] == ["ultraedit", "4", "2", "cpu"]
    assert float(row[5]) > 0 and float(row[6]) > 0 and row[-1] == "0"  # s/edit, edits/s, no failed batch
    assert row[-2] != "-"  # UltraEdit is stateful: its normalisation statistics are the stream state
    assert "load average before" in proc.stdout


def test_a_stream_runs_through_one_session_and_a_stateless_editor_has_no_state():
    row = lifelong.run_child(_child_args("ft"))
    assert row["n"] == 4 and len(row["per_edit"]) == 2 and row["failed"] == 0
    assert row["first_s_per_edit"] == row["per_edit"][0] and row["last_s_per_edit"] == row["per_edit"][1]
    assert row["state_mb"] is None and not row["stateful"] and row["cuda_gb"] is None
    assert row["rss_gb"] >= row["rss_before_gb"] > 0
    table = lifelong.format_table([row, {"method": "memit", "skipped": "not cached"}],
                                  argparse.Namespace(model="tiny_llama", edits=4, batch_size=2,
                                                     accelerator="cpu", threads=None), (0.0, 0.0))
    assert "memit      skipped: not cached" in table and table.splitlines()[3].split()[0] == "ft"


def test_a_method_whose_key_statistics_are_not_cached_is_skipped_unless_stats_ok(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITLAB_CACHE", str(tmp_path / "cache"))
    row = lifelong.run_child(_child_args("memit"))
    assert "skipped" in row and "[1, 2]" in row["skipped"] and "--stats-ok" in row["skipped"]
    assert not (tmp_path / "cache").exists()  # nothing was computed
    done = lifelong.run_child(_child_args("memit", stats_ok=True, edits=2,
                                          override=["method.mom2_n_tokens=256", "method.v_num_grad_steps=2"]))
    assert "skipped" not in done and done["n"] == 2 and done["setup_s"] > 0
    cached = lifelong.run_child(_child_args("memit", override=["method.mom2_n_tokens=256"]))
    assert cached["n"] == 4  # cached now: not skipped


def test_stream_state_size_counts_every_tensor():
    state = {"a": torch.zeros(4, dtype=torch.float32), "b": [torch.zeros(2, dtype=torch.float64), 3, "x"],
             "c": ({"d": torch.zeros(1, dtype=torch.int8)},)}
    assert lifelong.tensor_bytes(state) == 16 + 16 + 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_gpu_without_a_visible_device_says_so_and_runs_nothing(capsys):
    assert lifelong.main(["--accelerator", "gpu", "--methods", "ft"]) == 0
    assert "no CUDA device is visible" in capsys.readouterr().out
