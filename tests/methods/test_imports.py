"""Editors run without Lightning or Hydra: importing any editor module must not load them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import editlab.methods

FORBIDDEN = ("lightning", "pytorch_lightning", "hydra")

# Imports every module of editlab/methods in order, in a fresh interpreter, and reports the first
# module after whose import a forbidden package appeared in sys.modules.
_PROBE = """
import importlib, json, pkgutil, sys
import editlab.methods
forbidden = {forbidden!r}
modules = sorted(m.name for m in pkgutil.iter_modules(editlab.methods.__path__))
culprits = {{}}
for name in modules:
    importlib.import_module("editlab.methods." + name)
    for pkg in forbidden:
        if pkg in sys.modules and pkg not in culprits:
            culprits[pkg] = name
print(json.dumps({{"modules": modules, "culprits": culprits}}))
"""


def test_no_editor_module_imports_lightning_or_hydra():
    folder = Path(editlab.methods.__file__).parent
    expected = sorted(p.stem for p in folder.glob("*.py") if p.stem != "__init__")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                       os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", _PROBE.format(forbidden=FORBIDDEN)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["modules"] == expected  # every editor module was imported
    assert {"base", "rome", "mend", "serac", "ke", "hyper"} <= set(report["modules"])
    assert report["culprits"] == {}, (
        f"editor modules pull in {sorted(report['culprits'])}: first seen after importing "
        f"{report['culprits']} (editors must run without Lightning and Hydra)")
