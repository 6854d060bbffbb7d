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

import math
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "UserError", "SettingError", "require", "require_int", "require_float", "require_bool", "require_choice",
    "require_str", "require_path", "require_list", "require_ints", "require_strs", "require_int_pairs",
    "require_texts", "find_user_error",
]

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


# ------------------------------------------------------------------ typed checks
# Each returns the value as the caller should keep it (an int, a float, a list) and raises
# SettingError(key, ...) otherwise: "<key> must be an integer, got 2.5", "<key> must be >= 1, got 0".
# ``none=True``: None is a meaningful value (returned as is).  Bounds: ``ge``/``gt``/``le``/``lt``.


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _or_null(problem: str, none: bool) -> str:
    return f"{problem} or null" if none else problem


def _bounds(ge: Any, gt: Any, le: Any, lt: Any) -> str | None:
    low = f"[{ge}" if ge is not None else f"({gt}" if gt is not None else None
    high = f"{le}]" if le is not None else f"{lt})" if lt is not None else None
    if low is not None and high is not None:
        return f"in {low}, {high}"
    if low is not None:
        return f">= {ge}" if ge is not None else f"> {gt}"
    if high is not None:
        return f"<= {le}" if le is not None else f"< {lt}"
    return None


def _in_bounds(value: Any, ge: Any, gt: Any, le: Any, lt: Any) -> bool:
    return ((ge is None or value >= ge) and (gt is None or value > gt)
            and (le is None or value <= le) and (lt is None or value < lt))


def require_int(value: Any, key: str, *, ge: int | None = None, gt: int | None = None, le: int | None = None,
                lt: int | None = None, none: bool = False) -> int | None:
    """An integer (not a bool, not a float such as 2.5 or 2.0) within the bounds, as ``int``."""
    if value is None and none:
        return None
    require(_is_int(value), key, _or_null("must be an integer", none), value)
    require(_in_bounds(value, ge, gt, le, lt), key, f"must be {_bounds(ge, gt, le, lt)}", value)
    return int(value)


def require_float(value: Any, key: str, *, ge: float | None = None, gt: float | None = None,
                  le: float | None = None, lt: float | None = None, none: bool = False) -> float | None:
    """A finite real number within the bounds, as ``float`` (an int such as YAML's ``1`` is
    accepted; a bool or a string is not)."""
    if value is None and none:
        return None
    require(_is_number(value) and math.isfinite(value), key, _or_null("must be a finite number", none), value)
    require(_in_bounds(value, ge, gt, le, lt), key, f"must be {_bounds(ge, gt, le, lt)}", value)
    return float(value)


def require_bool(value: Any, key: str, *, none: bool = False) -> bool | None:
    """``True`` or ``False`` itself (not 0/1, not a string)."""
    if value is None and none:
        return None
    require(isinstance(value, bool), key, "must be true, false or null" if none else "must be true or false", value)
    return value


def require_choice(value: Any, key: str, choices: Iterable[str], *, none: bool = False) -> str | None:
    """One of ``choices`` (strings)."""
    if value is None and none:
        return None
    choices = tuple(choices)
    require(isinstance(value, str) and value in choices, key,
            _or_null(f"must be one of {', '.join(choices)}", none), value)
    return value


def require_str(value: Any, key: str, *, empty: bool = False, none: bool = False) -> str | None:
    """A string; a non-empty one unless ``empty``."""
    if value is None and none:
        return None
    require(isinstance(value, str) and (empty or value != ""), key,
            _or_null("must be a string" if empty else "must be a non-empty string", none), value)
    return value


def require_path(value: Any, key: str, *, none: bool = True) -> str | os.PathLike | None:
    """A non-empty path (a string or an ``os.PathLike``), or None (by default meaningful: the default place)."""
    if value is None and none:
        return None
    require(isinstance(value, os.PathLike) or (isinstance(value, str) and value != ""), key,
            _or_null("must be a path", none), value)
    return value


def require_list(value: Any, key: str, *, empty: bool = False, none: bool = False) -> list | None:
    """A sequence that is not a string or a mapping (a list, a tuple, an OmegaConf list), as a
    ``list``; a non-empty one unless ``empty``."""
    if value is None and none:
        return None
    ok = isinstance(value, Sequence) and not isinstance(value, (str, bytes, Mapping))
    require(ok and (empty or len(value) > 0), key,
            _or_null("must be a list" if empty else "must be a non-empty list", none), value)
    return list(value)


def require_ints(value: Any, key: str, *, ge: int | None = None, empty: bool = False,
                 unique: bool = False) -> list[int]:
    """A list of integers (each ``>= ge``), as a list of ``int``; no repeats when ``unique``."""
    items = require_list(value, key, empty=empty)
    what = "integers" if ge is None else f"integers >= {ge}"
    require(all(_is_int(x) and (ge is None or x >= ge) for x in items), key, f"must hold {what} only", value)
    items = [int(x) for x in items]
    require(not unique or len(set(items)) == len(items), key, "must not repeat a value", value)
    return items


def require_strs(value: Any, key: str, *, empty: bool = False, unique: bool = False) -> list[str]:
    """A list of non-empty strings; no repeats when ``unique``."""
    items = require_list(value, key, empty=empty)
    require(all(isinstance(x, str) and x for x in items), key, "must hold non-empty strings only", value)
    require(not unique or len(set(items)) == len(items), key, "must not repeat a value", value)
    return items


def require_int_pairs(value: Any, key: str, *, ge: int | None = None) -> list[tuple[int, int]]:
    """A list (possibly empty) of ``[a, b]`` integer pairs (each ``>= ge``), as tuples."""
    pairs = require_list(value, key, empty=True)
    for pair in pairs:
        ok = isinstance(pair, Sequence) and not isinstance(pair, (str, bytes)) and len(pair) == 2
        require(ok, key, "must hold [a, b] pairs of integers", value)
        require_ints(pair, key, ge=ge)
    return [(int(a), int(b)) for a, b in pairs]


def require_texts(value: Any, key: str) -> list[str]:
    """A list of non-empty strings, at least one of which is not blank (a small text corpus)."""
    texts = require_strs(value, key)
    require(any(t.strip() for t in texts), key, "must hold a text that is not blank", value)
    return texts


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
