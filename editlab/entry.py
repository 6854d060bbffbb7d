"""What the entry points (``python -m editlab.train``, ``editlab.edit``) share about user errors.

A setting is named by its config key (:func:`settings_of`: an editor's ``lr`` becomes
``method.lr``), and a user error is found behind Hydra's instantiation wrapper (:func:`user_error`)
so the entry point can show its message alone.  This module imports Hydra and OmegaConf, not
Lightning; the Hydra-free part of the convention is :mod:`editlab.errors`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from hydra.errors import InstantiationException
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from editlab.data.records import RecordError
from editlab.errors import SettingError, UserError, find_user_error
from editlab.models.loading import ModelLoadError

__all__ = ["USER_ERRORS", "settings_of", "user_error"]

# What a user can fix from the message alone: shown without a traceback (HYDRA_FULL_ERROR=1 shows it).
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError, RecordError, ModelLoadError, FileNotFoundError, MissingMandatoryValue, InterpolationResolutionError,
)

# Hydra names the node whose constructor failed at the end of its message (its only record of it)
_FULL_KEY = re.compile(r"\nfull_key: (\S+)\s*$")


@contextmanager
def settings_of(node: str) -> Iterator[None]:
    """Name a :class:`SettingError` raised while building config node ``node`` by its config key
    (``lr`` → ``method.lr``; an argument of a node inside it, such as ``method.mom2_corpus``, by that
    node's key).  Hydra's InstantiationException around it is dropped from the message."""
    try:
        yield
    except Exception as exc:
        err = find_user_error(exc, (SettingError,), through=(InstantiationException,))
        if err is None:
            raise
        key, current = node, exc
        while current is not None and current is not err:
            found = _FULL_KEY.search(str(current)) if isinstance(current, InstantiationException) else None
            key = found.group(1) if found else key
            current = current.__cause__
        raise err.within(key) from exc


def user_error(exc: BaseException, kinds: tuple[type[BaseException], ...] = USER_ERRORS) -> BaseException | None:
    """The user error behind ``exc`` (itself, or the one a Hydra instantiation error wraps), or None."""
    return find_user_error(exc, kinds, through=(InstantiationException,))
