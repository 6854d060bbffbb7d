"""A built wheel runs: configs ship inside it, results go under the cwd, data is found from there.

The wheel is built from a copy of the package sources, installed (no dependencies: they come from
the system site-packages) into a fresh venv in a temp dir outside the repository, and run from a
temp working directory on a tiny model, with a user config dir on ``hydra.searchpath``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "editlab" / "configs"

USER_EXPERIMENT = """\
# @package _global_
defaults:
  - override /model: user_tiny
  - override /method: ft/smollm2_135m
experiment_name: wheel_check
method:
  layers: [1]
  num_steps: 2
data:
  test:
    path: cf.json
    limit: 2
"""
USER_MODEL = """\
defaults:
  - tiny_llama
  - _self_
seed: 1
"""


def _records(n: int = 2) -> list[dict]:
    subjects = ["Danielle Darrieux", "Victor Hugo"][:n]
    return [{
        "case_id": i,
        "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103", "subject": s,
                              "target_new": {"str": "English", "id": "Q1860"},
                              "target_true": {"str": "French", "id": "Q150"}},
        "paraphrase_prompts": [f"{s} is a native speaker of"],
        "neighborhood_prompts": ["The mother tongue of Léon Blum is"],
        "attribute_prompts": ["J. R. R. Tolkien is a native speaker of"],
        "generation_prompts": [f"{s}'s mother tongue is"],
    } for i, s in enumerate(subjects)]


def _build_wheel(tmp: Path) -> Path:
    """``pip wheel`` on a copy of the sources (an in-tree build would leave build/ in the repo)."""
    src = tmp / "src"
    shutil.copytree(REPO / "editlab", src / "editlab", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md", "setup.cfg"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, src / name)
    out = tmp / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(src)], check=True, cwd=tmp)
    (wheel,) = out.glob("editlab-*.whl")
    return wheel


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without what would point the venv at the repository."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "EDITLAB_ROOT", "EDITLAB_DATA_DIR", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **extra)
    return env


def test_wheel_installs_into_a_fresh_venv_and_runs_the_edit_loop(tmp_path: Path) -> None:
    assert not tmp_path.resolve().is_relative_to(REPO)
    wheel = _build_wheel(tmp_path)
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".yaml")}
    expected = {str(p.relative_to(REPO)) for p in CONFIGS.rglob("*.yaml")}
    assert expected and expected <= shipped, sorted(expected - shipped)

    # a fresh venv seeing the system site-packages (torch, lightning, ...): pip from there installs
    # into the venv; the system's editable editlab (if any) stays where it is, shadowed by the venv's
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                   check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--force-reinstall",
                    str(wheel)], check=True, env=_clean_env(PIP_DISABLE_PIP_VERSION_CHECK="1"),
                   cwd=tmp_path)

    # a project folder outside the repository; its data in ../shared/data (the default data dir)
    lab = tmp_path / "lab"
    cwd, data, user = lab / "project", lab / "shared" / "data", lab / "my_configs"
    for d in (cwd, data, user / "experiment", user / "model"):
        d.mkdir(parents=True)
    (data / "cf.json").write_text(json.dumps(_records()))
    (user / "experiment" / "wheel_check.yaml").write_text(USER_EXPERIMENT)
    (user / "model" / "user_tiny.yaml").write_text(USER_MODEL)

    env = _clean_env()
    where = subprocess.run([str(python), "-c", "import editlab; print(editlab.__file__)"], cwd=cwd, env=env,
                           check=True, capture_output=True, text=True).stdout.strip()
    assert Path(where).resolve().is_relative_to(venv.resolve()), where

    run = subprocess.run([str(python), "-m", "editlab.train", f"hydra.searchpath=[file://{user}]",
                          "experiment=wheel_check", "logger=csv", "callbacks=none"],
                         cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]

    (out,) = (cwd / "experiments" / "runs" / "wheel_check").iterdir()  # under the cwd, not site-packages
    summary = json.loads((out / "summary.json").read_text())
    assert "post/reliability" in summary and "post/efficacy_score" in summary
    assert len((out / "records.jsonl").read_text().splitlines()) == 2
    config = yaml.safe_load((out / ".hydra" / "config.yaml").read_text())
    assert config["model"] == {"_target_": "editlab.models.tiny.tiny_model", "model_type": "llama", "seed": 1}
    assert config["method"]["layers"] == [1] and config["method"]["lr"] == 5e-4  # the preset under the user's
    # the packaged configs came from the venv's editlab, the user's from the search path
    runtime = yaml.safe_load((out / ".hydra" / "hydra.yaml").read_text())["hydra"]["runtime"]
    sources = runtime["config_sources"]
    main = next(s["path"] for s in sources if s["schema"] == "file" and s["provider"] == "main")
    assert Path(main).resolve().is_relative_to(venv.resolve()), main
    assert any(s["path"] == str(user) for s in sources), sources
