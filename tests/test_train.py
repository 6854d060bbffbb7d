"""``python -m editlab.train`` as a user meets it: mistakes are found before the model loads and
shown as one line; the console gets one line about the run, the run folder its resolved config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import yaml
from hydra.errors import InstantiationException
from omegaconf import OmegaConf
from test_configs import _write_fixture

from editlab.errors import SettingError

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent

# FT-L on a tiny llama whose loading leaves a marker file: a run that stops before the model loads
# leaves none
BASE = ["experiment=ft_smollm2_counterfact", "model=tiny_llama", "model._target_=test_train.marked_tiny_model",
        "data.test.path=cf.json", "method.layers=[1]", "method.num_steps=2", "logger=csv", "callbacks=none"]


def marked_tiny_model(marker: str, fail: bool = False, **kwargs):
    """The tiny model of ``editlab.models.tiny``, after writing ``marker`` (the model was loaded);
    ``fail``: raise a RuntimeError instead (an error that is not the user's)."""
    from editlab.models.tiny import tiny_model

    Path(marker).write_text("loaded", encoding="utf-8")
    if fail:
        raise RuntimeError("the tiny model failed on purpose")
    return tiny_model(**kwargs)


def _train(tmp_path: Path, *overrides: str, data_dir: Path | None = None, **env: str):
    """Run the entry point; (completed process, marker path, run folder)."""
    marker, out = tmp_path / "model_loaded", tmp_path / "run"
    environ = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)]),
                   EDITLAB_DATA_DIR=str(data_dir if data_dir is not None else tmp_path))
    environ.pop("HYDRA_FULL_ERROR", None)
    environ.update(env)
    cmd = [sys.executable, "-m", "editlab.train", *BASE, f"+model.marker={marker}", f"hydra.run.dir={out}",
           *overrides]
    proc = subprocess.run(cmd, cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=600)
    return proc, marker, out


def _error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def _assert_one_line_error(proc, marker: Path) -> str:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    errors = _error_lines(proc)
    assert len(errors) == 1, proc.stderr
    assert not marker.exists(), "the model was loaded before the error was found"
    return errors[0]


def test_a_run_prints_one_line_and_writes_the_resolved_config(tmp_path):
    _write_fixture(tmp_path / "cf.json")
    proc, marker, out = _train(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marker.exists()  # the marker works: a run that gets that far loads the model
    console = proc.stdout + proc.stderr
    assert "_target_" not in console and "num_steps" not in console  # no config dump
    assert f"ft_smollm2_counterfact: run folder {out}" in console
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["method"]["num_steps"] == 2 and "hydra" not in resolved
    assert resolved["data"]["test"]["data_dir"] is None  # interpolations filled in
    assert resolved["paths"]["output_dir"] == str(out)
    assert "${" not in (out / "config.yaml").read_text()
    assert len((out / "records.jsonl").read_text().splitlines()) == 2


def test_a_missing_data_dir_is_one_line_before_the_model_loads(tmp_path):
    proc, marker, _ = _train(tmp_path, data_dir=tmp_path / "nowhere")
    error = _assert_one_line_error(proc, marker)
    assert str(tmp_path / "nowhere") in error and "does not exist" in error


def test_a_missing_data_file_is_one_line_before_the_model_loads(tmp_path):
    proc, marker, _ = _train(tmp_path, "data.test.path=missing.json")
    error = _assert_one_line_error(proc, marker)
    assert "missing.json" in error and "does not exist" in error


def test_a_malformed_record_names_file_record_and_field(tmp_path):
    _write_fixture(tmp_path / "cf.json")
    records = json.loads((tmp_path / "cf.json").read_text())
    del records[1]["requested_rewrite"]["target_new"]["str"]
    (tmp_path / "cf.json").write_text(json.dumps(records))
    proc, marker, _ = _train(tmp_path)
    error = _assert_one_line_error(proc, marker)
    assert "cf.json" in error and "record 1" in error and "requested_rewrite.target_new.str" in error


def test_a_record_longer_than_the_model_takes_is_refused_before_any_edit(tmp_path):
    """The tiny llama takes 128 positions: a neighbourhood prompt of ~400 tokens is a one-line
    RecordError with the lengths, raised once the model (and so its limit) is known, before the
    first edit (no records are written)."""
    _write_fixture(tmp_path / "cf.json")
    records = json.loads((tmp_path / "cf.json").read_text())
    records[1]["neighborhood_prompts"] = ["word " * 100]
    (tmp_path / "cf.json").write_text(json.dumps(records))
    proc, marker, out = _train(tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    [error] = _error_lines(proc)
    # the loader made the neighbourhood prompt the record's first locality probe
    assert "cf.json, record 1, field 'locality[0]'" in error and "longer than the 128 positions" in error
    assert not (out / "records.jsonl").exists()


def test_a_bad_learning_rate_is_named_by_its_config_key(tmp_path):
    _write_fixture(tmp_path / "cf.json")
    proc, marker, out = _train(tmp_path, "method.lr=-1.0")
    error = _assert_one_line_error(proc, marker)
    assert error == "error: method.lr must be > 0, got -1.0"
    assert "[ERROR] - method.lr must be > 0, got -1.0" in (out / "train.log").read_text()  # the run folder has it


def test_a_bad_stream_setting_is_named_by_its_config_key(tmp_path):
    _write_fixture(tmp_path / "cf.json")
    proc, marker, _ = _train(tmp_path, "stream.batch_size=0")
    error = _assert_one_line_error(proc, marker)
    assert error == "error: stream.batch_size must be a positive integer or null, got 0"


def test_hydra_full_error_shows_the_traceback(tmp_path):
    _write_fixture(tmp_path / "cf.json")
    proc, marker, _ = _train(tmp_path, "method.lr=-1.0", HYDRA_FULL_ERROR="1")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr
    assert "SettingError: method.lr must be > 0, got -1.0" in proc.stderr
    assert not marker.exists()


def test_an_error_that_is_not_the_users_keeps_hydras_report(tmp_path):
    _write_fixture(tmp_path / "cf.json")
    proc, marker, _ = _train(tmp_path, "+model.fail=true")
    assert proc.returncode != 0 and marker.exists()
    assert not _error_lines(proc)
    assert "Error executing job" in proc.stderr and "RuntimeError('the tiny model failed on purpose')" in proc.stderr


def test_the_offline_hub_error_is_one_readable_line(tmp_path):
    """GPT-J offline and not cached: the error says what to do, on one line, without a literal \\n."""
    _write_fixture(tmp_path / "cf.json")
    (tmp_path / "hf").mkdir()
    marker, out = tmp_path / "model_loaded", tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), EDITLAB_DATA_DIR=str(tmp_path),
               HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, "-m", "editlab.train", "experiment=ft_smollm2_counterfact", "model=gptj_6b",
           "data.test.path=cf.json", "logger=csv", "callbacks=none", f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    error = _assert_one_line_error(proc, marker)
    assert "EleutherAI/gpt-j-6b" in error and "HF_HUB_OFFLINE is set" in error
    assert "Original error" in error  # the cause is on the same line
    assert "\\n" not in error


def test_the_entry_point_names_a_setting_by_its_config_key():
    # imported here: the training subprocesses import this module for marked_tiny_model
    from editlab.entry import settings_of

    cfg = OmegaConf.create({"method": {"_target_": "editlab.methods.ft.FTL", "lr": -1.0},
                            "outer": {"_target_": "builtins.dict",
                                      "inner": {"_target_": "editlab.methods.calinet.CaliNet", "max_steps": 0}}})
    with pytest.raises(SettingError, match=r"^method\.lr must be > 0, got -1\.0$"):
        with settings_of("method"):
            hydra.utils.instantiate(cfg.method)
    with pytest.raises(SettingError, match=r"^outer\.inner\.max_steps must be >= 1, got 0$"):
        with settings_of("outer"):
            hydra.utils.instantiate(cfg.outer)
    with pytest.raises(SettingError, match=r"^method\.objective must be one of prompt_last, teacher_forced, "):
        with settings_of("method"):
            hydra.utils.instantiate({"_target_": "editlab.methods.ft.FTL", "objective": "nonsense"})
    with pytest.raises(InstantiationException):  # not a setting error (a TypeError): left as it is
        with settings_of("method"):
            hydra.utils.instantiate({"_target_": "editlab.methods.ft.FTL", "objectiv": "teacher_forced"})


def test_a_stream_on_two_processes_is_refused_before_the_model_loads(tmp_path):
    """A stream is one model's history: with 2 DDP processes it would become 2 interleaved streams,
    so the run stops at the config, naming the settings (the edit loop refuses it too)."""
    _write_fixture(tmp_path / "cf.json")
    proc, marker, _ = _train(tmp_path, "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
                             "stream.edits=2")
    error = _assert_one_line_error(proc, marker)
    assert error.startswith("error: edit.sequential ")
    assert "trainer.devices=2 x trainer.num_nodes=1 start 2:" in error
    assert "one model's history" in error and "trainer.devices=1" in error


def test_the_process_count_of_a_trainer_config(monkeypatch):
    from editlab.train import check_config, trainer_processes

    def count(**trainer):
        return trainer_processes(OmegaConf.create(trainer))

    monkeypatch.setattr("torch.cuda.device_count", lambda: 4)
    assert count(accelerator="cpu", devices=1) == 1
    assert count(accelerator="cpu", devices=2) == 2 and count(accelerator="cpu", devices="2") == 2
    assert count(accelerator="cpu", devices="auto") == 1  # Lightning: one CPU process
    assert count(accelerator="gpu", devices=[0, 1, 2]) == 3 and count(accelerator="gpu", devices="0,1") == 2
    assert count(accelerator="gpu", devices="auto") == 4 and count(accelerator="cuda", devices=-1) == 4
    assert count(accelerator="auto", devices="auto", num_nodes=2) == 8
    assert count(accelerator="cpu", devices=1, num_nodes=2) == 2
    assert count(accelerator="tpu", devices="auto") is None  # unknown before the Trainer: the callback checks
    assert trainer_processes(None) == 1

    def cfg(sequential, **trainer):
        return OmegaConf.create({"edit": {"sequential": sequential}, "stream": {}, "trainer": trainer})

    check_config(cfg(True, accelerator="cpu", devices=1))
    check_config(cfg(False, accelerator="gpu", devices=8))  # independent edits split over the ranks
    with pytest.raises(SettingError, match=r"trainer\.devices=1 x trainer\.num_nodes=2 start 2:") as err:
        check_config(cfg(True, accelerator="cpu", devices=1, num_nodes=2))
    assert err.value.key == "edit.sequential"
