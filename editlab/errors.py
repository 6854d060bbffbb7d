"""Errors a user can fix, and the convention that names a bad setting by its config key.

An entry point shows a :class:`UserError` as its message alone (no traceback): the message says
what is wrong and where (a file, a record, a setting), so the user has nothing to dig for.

Editors and other components check their constructor arguments with :func:`require` (or raise
:class:`SettingError` themselves) under the argument's own name (``lr``).  They do not know under
which config node they were built; the entry point does, and re-raises the error with the node's
prefix (:meth:`SettingError.within`): ``method.lr must be > 0, got -1.0``.

This module imports nothing from editlab, Hydra or Lightning, so any module may use it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["UserError", "SettingError", "require", "find_user_error"]

_UNSET = object()


class UserError(Exception):
    """An error in what the user gave (a setting, a path, a record), not in editlab: its message is
    complete on its own, so an entry point shows it without a traceback."""


class SettingError(UserError, ValueError):
    """A bad value of the setting ``key`` (an argument name such as ``lr``, or a dotted config key
    such as ``method.lr``): the message reads ``"<key> <problem>, got <value>"``."""

    def __init__(self, key: str, problem: str, value: Any = _UNSET) -> None:
        self.key = key
        self.problem = problem
        self.value = value
        text = f"{key} {problem}"
        if value is not _UNSET:
            text += f", got {value!r}"
        super().__init__(text)

    def within(self, prefix: str) -> SettingError:
        """The same error for the setting as seen from the config root (``prefix.key``)."""
        return SettingError(f"{prefix}.{self.key}" if prefix else self.key, self.problem, self.value)


def require(condition: bool, key: str, problem: str, value: Any = _UNSET) -> None:
    """Raise ``SettingError(key, problem, value)`` unless ``condition``:
    ``require(lr > 0, "lr", "must be > 0", lr)``."""
    if not condition:
        raise SettingError(key, problem, value)


def find_user_error(exc: BaseException, user_errors: tuple[type[BaseException], ...] = (UserError,),
                    through: tuple[type[BaseException], ...] = ()) -> BaseException | None:
    """``exc`` when it is one of ``user_errors``, else the user error that an exception of a
    ``through`` type (e.g. Hydra's InstantiationException) was raised from, else None.  Only
    explicit causes (``raise ... from``) of ``through`` exceptions are followed: an error raised
    while handling another is a new error, not a wrapper."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, user_errors):
            return current
        if not isinstance(current, through):
            return None
        seen.add(id(current))
        current = current.__cause__
    return None
