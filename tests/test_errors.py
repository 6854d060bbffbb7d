"""The user-error convention: settings named by their argument, then by their config key."""

from __future__ import annotations

import hydra
import pytest
from hydra.errors import InstantiationException

from editlab.errors import SettingError, UserError, find_user_error, require


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

