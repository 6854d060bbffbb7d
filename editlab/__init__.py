"""editlab: edit the factual knowledge of language models, and measure it honestly.

``editlab.edit(...)`` edits one fact (or a few) and shows the answers before and after (see
:mod:`editlab.edit`, also ``python -m editlab.edit --help``).  It is imported on first use, so
``import editlab`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "edit"]


def __getattr__(name: str) -> Any:
    # editlab.edit is a submodule made callable (editlab/edit.py): importing it binds it here
    if name == "edit":
        return importlib.import_module("editlab.edit")
    raise AttributeError(f"module 'editlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), "edit"})
