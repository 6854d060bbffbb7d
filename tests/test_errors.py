"""The user-error convention: settings named by their argument, then by their config key."""

from __future__ import annotations

from pathlib import Path

import hydra
import numpy as np
import pytest
from hydra.errors import InstantiationException
from omegaconf import OmegaConf

from editlab.errors import (
    SettingError, UserError, find_user_error, require, require_bool, require_choice, require_float, require_int,
    require_ints, require_list, require_path, require_str, require_strs,
)


def test_a_setting_error_names_the_setting_and_the_value():
    err = SettingError("lr", "must be > 0", -1.0)
    assert str(err) == "lr must be > 0, got -1.0" and isinstance(err, ValueError) and isinstance(err, UserError)
    assert str(err.within("method")) == "method.lr must be > 0, got -1.0"
    assert err.within("method").key == "method.lr" and str(err.within("")) == str(err)
    assert str(SettingError("data.train", "must be set")) == "data.train must be set"
    assert str(SettingError("objective", "must be a name", "x")) == "objective must be a name, got 'x'"
    require(True, "lr", "must be > 0", 1.0)
    with pytest.raises(SettingError, match=r"^num_steps must be >= 1, got 0$"):
        require(False, "num_steps", "must be >= 1", 0)


def test_the_user_error_behind_a_hydra_instantiation_error_is_found():
    with pytest.raises(InstantiationException) as info:
        hydra.utils.instantiate({"_target_": "editlab.methods.ft.FTL", "lr": -1.0})
    err = find_user_error(info.value, through=(InstantiationException,))
    assert isinstance(err, SettingError) and err.key == "lr"
    assert find_user_error(info.value) is None  # not followed through other exceptions


def test_only_explicit_causes_are_followed():
    try:
        try:
            raise SettingError("lr", "must be > 0", -1)
        except SettingError:
            raise RuntimeError("a bug while handling it")  # noqa: B904 (implicit context on purpose)
    except RuntimeError as bug:
        assert find_user_error(bug, through=(RuntimeError,)) is None
    assert find_user_error(FileNotFoundError("x"), (UserError, FileNotFoundError)) is not None


@pytest.mark.parametrize("target,kwargs,key", [
    ("editlab.methods.ft.FTL", {"lr": -1.0}, "lr"),
    ("editlab.methods.ft.FTL", {"num_steps": 0}, "num_steps"),
    ("editlab.methods.rome.ROME", {"v_lr": 0.0}, "v_lr"),
    ("editlab.methods.rome.ROME", {"v_num_grad_steps": 0}, "v_num_grad_steps"),
    ("editlab.methods.memit.MEMIT", {"v_lr": -0.5}, "v_lr"),
    ("editlab.methods.memit.MEMIT", {"v_num_grad_steps": 0}, "v_num_grad_steps"),
    ("editlab.methods.kn.KN", {"steps": 0}, "steps"),
    ("editlab.methods.mend.MEND", {"edit_lr": 0.0}, "edit_lr"),
    ("editlab.methods.mend.MEND", {"lr_lr": -1.0}, "lr_lr"),
    ("editlab.methods.ke.KE", {"lr_multiplier": 0.0}, "lr_multiplier"),
    ("editlab.methods.t_patcher.TPatcher", {"lr": -0.01}, "lr"),
    ("editlab.methods.t_patcher.TPatcher", {"max_steps": 0}, "max_steps"),
    ("editlab.methods.calinet.CaliNet", {"lr": 0.0}, "lr"),
    ("editlab.methods.calinet.CaliNet", {"max_steps": 0}, "max_steps"),
    ("editlab.methods.ike.IKE", {"k": -1}, "k"),
])
def test_editors_name_a_bad_learning_rate_or_step_count(target, kwargs, key):
    with pytest.raises(SettingError) as info:
        hydra.utils.get_class(target)(**kwargs)
    assert info.value.key == key and str(info.value).startswith(f"{key} must be")



# ------------------------------------------------------------------ typed checks
def _refused(check, *args, match: str, **kwargs) -> SettingError:
    with pytest.raises(SettingError, match=match) as info:
        check(*args, **kwargs)
    return info.value


def test_require_int_takes_integers_only():
    assert require_int(3, "steps", ge=1) == 3 and type(require_int(np.int64(3), "steps")) is int
    assert require_int(None, "n", none=True) is None and require_int(-1, "layer") == -1
    for bad in (2.5, 2.0, True, "3", None):
        _refused(require_int, bad, "steps", ge=1, match=r"^steps must be an integer, got ")
    _refused(require_int, "x", "n", none=True, match=r"^n must be an integer or null, got 'x'$")
    assert str(_refused(require_int, 0, "steps", ge=1, match="steps")) == "steps must be >= 1, got 0"
    _refused(require_int, 5, "k", ge=0, lt=5, match=r"^k must be in \[0, 5\), got 5$")
    _refused(require_int, 1, "k", gt=1, match=r"^k must be > 1, got 1$")


def test_require_float_accepts_ints_and_refuses_the_rest():
    value = require_float(1, "lr", gt=0)
    assert value == 1.0 and type(value) is float and require_float(None, "clip", none=True) is None
    for bad in (True, "1e-3", None, float("nan"), float("inf"), [1.0]):
        _refused(require_float, bad, "lr", gt=0, match=r"^lr must be a finite number, got ")
    _refused(require_float, "x", "clip", none=True, match=r"^clip must be a finite number or null, got 'x'$")
    assert str(_refused(require_float, -1.0, "lr", gt=0, match="lr")) == "lr must be > 0, got -1.0"
    _refused(require_float, 1.0, "p", ge=0, lt=1, match=r"^p must be in \[0, 1\), got 1.0$")
    _refused(require_float, 0, "t", gt=0, le=1, match=r"^t must be in \(0, 1\], got 0$")
    _refused(require_float, 2, "t", le=1, match=r"^t must be <= 1, got 2$")


def test_require_bool_choice_str_and_path():
    assert require_bool(False, "replay") is False and require_bool(None, "gated", none=True) is None
    for bad in (0, 1, "true", None):
        _refused(require_bool, bad, "replay", match=r"^replay must be true or false, got ")
    _refused(require_bool, 1, "gated", none=True, match=r"^gated must be true, false or null, got 1$")
    assert require_choice("b", "mode", ("a", "b")) == "b"
    _refused(require_choice, "c", "mode", ("a", "b"), match=r"^mode must be one of a, b, got 'c'$")
    _refused(require_choice, ["a"], "mode", ("a", "b"), match="^mode must be one of")
    assert require_choice(None, "mode", ("a",), none=True) is None
    assert require_str("x", "name") == "x" and require_str("", "fmt", empty=True) == ""
    _refused(require_str, "", "name", match=r"^name must be a non-empty string, got ''$")
    _refused(require_str, 3, "fmt", empty=True, match=r"^fmt must be a string, got 3$")
    assert require_path(None, "dir") is None and require_path("out", "dir") == "out"
    assert require_path(Path("out"), "dir") == Path("out")
    _refused(require_path, "", "dir", match=r"^dir must be a path or null")
    _refused(require_path, None, "dir", none=False, match=r"^dir must be a path, got None$")


def test_require_lists():
    assert require_list((1, 2), "xs") == [1, 2] and require_list([], "xs", empty=True) == []
    assert require_list(OmegaConf.create([1, 2]), "xs") == [1, 2]
    for bad in ([], "ab", {"a": 1}, 3, None):
        _refused(require_list, bad, "xs", match=r"^xs must be a non-empty list, got ")
    assert require_ints(OmegaConf.create([3, 1]), "layers", ge=0) == [3, 1]
    for bad in ([1.5], [True], ["1"], [-1]):
        _refused(require_ints, bad, "layers", ge=0, match=r"^layers must hold integers >= 0 only, got ")
    _refused(require_ints, [1, 1], "layers", unique=True, match=r"^layers must not repeat a value, got \[1, 1\]$")
    assert require_strs(("a", "b"), "names") == ["a", "b"]
    for bad in ([""], [1], [None]):
        _refused(require_strs, bad, "names", match=r"^names must hold non-empty strings only, got ")
    _refused(require_strs, ["a", "a"], "names", unique=True, match="^names must not repeat a value")


def test_errors_imports_nothing_from_editlab():
    import ast

    import editlab.errors

    tree = ast.parse(Path(editlab.errors.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not [m for m in imported if m.split(".")[0] in ("editlab", "hydra", "omegaconf", "lightning", "torch")]


def test_int_pairs_and_texts():
    from editlab.errors import require_int_pairs, require_texts

    assert require_int_pairs([[5, 2], (10, 1)], "p", ge=1) == [(5, 2), (10, 1)]
    assert require_int_pairs([], "p") == []
    for bad in ([[5]], [[5, 0]], ["ab"], [[1.5, 2]], "55"):
        with pytest.raises(SettingError, match="^p "):
            require_int_pairs(bad, "p", ge=1)
    assert require_texts(["a", " "], "t") == ["a", " "]
    for bad in ([" "], [], "text", [""], [1]):
        with pytest.raises(SettingError, match="^t "):
            require_texts(bad, "t")
