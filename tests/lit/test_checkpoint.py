"""Editor checkpoints from untrusted files (editlab/lit/checkpoint.py): a stored config builds
editlab's trained editors only, calling nothing before it is checked; files that cannot be read
are named."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from editlab.lit.checkpoint import (CheckpointError, build_editor, check_editor_checkpoint, editor_spec, load_editor,
                                    read_checkpoint, trained_editor_classes)
from editlab.lit.editor_train import EditorTrainModule
from editlab.methods.ke import KE
from editlab.methods.mend import MEND

ROOT = Path(__file__).resolve().parents[2]


def _save(path: Path, config, class_name: str = "MEND") -> Path:
    torch.save({"editor": {"config": config, "base_model": None, "class": class_name}, "state_dict": {},
                "global_step": 0}, path)
    return path


def _write_text(target: Path) -> dict:
    """The issue's payload: ``Path(target).write_text(...)`` named as a config."""
    return {"_target_": "pathlib.Path.write_text", "_args_": [{"_target_": "pathlib.Path", "_args_": [str(target)]},
                                                               "print('x')\n"]}


def _payloads(tmp_path: Path) -> dict[str, tuple[dict, str]]:
    """Configs that would run code under hydra.utils.instantiate → the key the error must name."""
    out = tmp_path / "pwned.py"
    mend = {"_target_": "editlab.methods.mend.MEND", "rank": 4}
    return {
        "write_text": (_write_text(out), "pathlib.Path.write_text"),
        "open": ({"_target_": "builtins.open", "file": str(out), "mode": "w"}, "builtins.open"),
        "copyfile": ({"_target_": "shutil.copyfile", "src": __file__, "dst": str(out)}, "shutil.copyfile"),
        "torch_save": ({"_target_": "torch.save", "obj": 1, "f": str(out)}, "torch.save"),
        "makedirs": ({"_target_": "os.makedirs", "name": str(tmp_path / "made")}, "os.makedirs"),
        "not_an_editor": ({"_target_": "editlab.methods.ft.FTL"}, "editlab.methods.ft.FTL"),
        "editlab_function": ({"_target_": "editlab.stats.layer_stats"}, "editlab.stats.layer_stats"),
        "nested_in_argument": ({**mend, "edit_params": _write_text(out)}, "editor.config.edit_params"),
        "nested_in_list": ({**mend, "edit_params": ["a", {"_target_": "builtins.open", "file": str(out)}]},
                           "edit_params[1]"),
        "undeclared_argument": ({**mend, "evil": 1}, "editor.config.evil"),
        "hydra_args": ({**mend, "_args_": [1]}, "_args_"),
        "hydra_recursive": ({**mend, "edit_params": {"_recursive_": False, "x": 1}}, "_recursive_"),
        "remote_code": ({"_target_": "editlab.methods.serac.SERAC",
                         "counterfactual": {"_target_": "editlab.models.loading.from_pretrained",
                                            "name_or_path": "org/evil", "trust_remote_code": True}},
                        "trust_remote_code"),
        "cache_dir": ({"_target_": "editlab.methods.serac.SERAC",
                       "counterfactual": {"_target_": "editlab.models.packaged.smollm2_135m", "_partial_": True,
                                          "cache_dir": str(tmp_path / "elsewhere")}}, "cache_dir"),
        "deep": ({**mend, "edit_params": [[[[[[[[[[[[[[[[[[["x"]]]]]]]]]]]]]]]]]]]}, "nested deeper"),
        "no_config": ({}, "stores no editor config"),
    }


PAYLOADS = list(_payloads(Path("/x")))


@pytest.mark.parametrize("name", PAYLOADS)
def test_a_stored_config_is_checked_before_anything_is_called(tmp_path, name, tiny):
    config, named = _payloads(tmp_path)[name]
    path = _save(tmp_path / "evil.ckpt", config)
    with pytest.raises(CheckpointError) as err:
        check_editor_checkpoint(path)
    assert str(path) in str(err.value) and named in str(err.value)
    with pytest.raises(CheckpointError, match="refused|stores no"):
        load_editor(path, tiny("llama"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.ckpt"]  # nothing written


def test_the_issue_reproducer_exits_with_the_refusal_and_writes_nothing(tmp_path):
    """``python -m editlab.train experiment=mend_smollm2_counterfact model=tiny_llama ckpt_path=evil.ckpt``:
    refused before the model loads, exit 1, the message names the checkpoint and the target."""
    _save(tmp_path / "evil.ckpt", _write_text(Path("pwned.py")))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDITLAB_ROOT": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "editlab.train", "experiment=mend_smollm2_counterfact",
                           "model=tiny_llama", "ckpt_path=evil.ckpt", f"paths.data_dir={ROOT / '..' / 'shared' / 'data'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "evil.ckpt" in proc.stderr and "pathlib.Path.write_text" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "pwned.py").exists()
    # besides the checkpoint, only the run's own folder (Hydra's log) exists
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.ckpt", "experiments"]
    assert not list((tmp_path / "experiments").rglob("*.py"))


def test_editlabs_trained_editors_round_trip(tmp_path, tiny):
    """The configs editlab writes are accepted and rebuilt as written (MEND, KE, SERAC with a nested
    encoder builder); the trained editor classes are exactly editlab's."""
    assert {"editlab.methods.mend.MEND", "editlab.methods.ke.KE", "editlab.methods.serac.SERAC"} <= set(
        trained_editor_classes())
    assert all(name.startswith("editlab.methods.") for name in trained_editor_classes())
    mend = build_editor({"_target_": "editlab.methods.mend.MEND", "rank": 4, "norm": False}, "x.ckpt")
    assert isinstance(mend, MEND) and mend.rank == 4
    ke = build_editor({"_target_": "editlab.methods.ke.KE", "hidden_dim": 8, "condition_dim": 16}, "x.ckpt")
    assert isinstance(ke, KE)
    cls, kwargs = editor_spec({"_target_": "editlab.methods.serac.SERAC",
                               "encoder": {"_target_": "editlab.models.encoder.SentenceEncoder.tiny"}}, "x.ckpt")
    assert cls.__name__ == "SERAC" and kwargs["encoder"] == {"_target_": "editlab.models.encoder.SentenceEncoder.tiny"}
    # strings reach the constructor as they are: no interpolation is resolved
    mend = build_editor({"_target_": "editlab.methods.mend.MEND", "rank": 4, "base_model": "${oc.env:HOME}"}, "x")
    assert mend.base_model == "${oc.env:HOME}"


def test_a_saved_mend_checkpoint_loads(tmp_path, tiny):
    bundle = tiny("llama")
    config = {"_target_": "editlab.methods.mend.MEND", "rank": 4, "norm": False}
    module = EditorTrainModule(bundle, build_editor(config, "here"), lr=1e-3, editor_config=config)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "mend.ckpt")
    check_editor_checkpoint(tmp_path / "mend.ckpt")
    loaded = load_editor(tmp_path / "mend.ckpt", bundle)
    assert isinstance(loaded, MEND) and not loaded.training
    for key, value in module.editor.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_truncated_corrupt_and_pickled_files_are_named(tmp_path, tiny):
    good = _save(tmp_path / "good.ckpt", {"_target_": "editlab.methods.mend.MEND", "rank": 4})
    data = good.read_bytes()
    for n in (0, 10, len(data) // 2, len(data) - 5):
        cut = tmp_path / f"cut{n}.ckpt"
        cut.write_bytes(data[:n])
        with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
            read_checkpoint(cut)
        assert str(cut) in str(err.value)
        with pytest.raises(CheckpointError, match=str(cut)):
            load_editor(cut, tiny("llama"))
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="garbage.ckpt.*truncated or corrupt"):
        check_editor_checkpoint(garbage)

    class Payload:
        def __reduce__(self):
            return (os.makedirs, (str(tmp_path / "made_by_pickle"),))

    evil = tmp_path / "pickled.ckpt"
    torch.save({"editor": {"config": Payload()}, "state_dict": {}}, evil)
    with pytest.raises(CheckpointError, match="pickled.ckpt: refused: the checkpoint holds pickled objects"):
        check_editor_checkpoint(evil)
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError, match="plain.pkl"):
        read_checkpoint(plain)
    assert not (tmp_path / "made_by_pickle").exists()
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_checkpoint(tmp_path / "missing.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="not an editor checkpoint"):
        check_editor_checkpoint(tmp_path / "other.ckpt")
