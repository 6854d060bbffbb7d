"""The editor interface and the one mechanism that applies and restores weight edits.

A non-trained editor (FT-L, ROME, MEMIT, KN, ...) *computes* an edit and never writes to the
model itself: :meth:`Editor.compute_deltas` returns :data:`Deltas`, a dict from parameter name to
an additive update in the parameter's own layout.  Applying and undoing deltas is the job of
:class:`WeightEditSession` alone — the edit loop, the Lightning callback and the Python context
manager :func:`applied` all go through it.  It checks every delta (name, shape, finiteness)
before it writes anything, keeps a bit-exact copy of each touched parameter, and restores those
copies exactly, so a failed or finished edit leaves the model as it was.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from editlab.data.records import EditRecord

__all__ = ["Deltas", "Editor", "EditError", "WeightEditSession", "applied"]

Deltas = dict[str, torch.Tensor]
"""Parameter name (as in ``model.named_parameters()``) → additive update, same shape as the parameter."""


class EditError(RuntimeError):
    """An edit could not be computed or applied; the model is unchanged."""


class Editor(ABC):
    """A non-trained editor.  Constructor keyword arguments are its hyperparameters."""

    @abstractmethod
    def compute_deltas(self, model: nn.Module, tokenizer, records: Sequence[EditRecord]) -> Deltas:
        """Compute the weight updates that install ``records`` (all at once, as one batch).

        Must not modify ``model`` (parameters, buffers, hooks, ``requires_grad`` flags, mode).
        """

    @contextlib.contextmanager
    def apply(self, model: nn.Module, tokenizer, records: Sequence[EditRecord]) -> Iterator[Deltas]:
        """Edit ``model`` for the duration of a ``with`` block; weights are restored bit-exactly after.

        Example::

            with FTL(layers=[20]).apply(model, tok, records) as deltas:
                ...  # the edited model
        """
        deltas = self.compute_deltas(model, tokenizer, records)
        with applied(model, deltas):
            yield deltas


class WeightEditSession:
    """Apply deltas to a model, possibly in several steps, and restore the original weights.

    * :meth:`apply` validates all deltas first, then adds them; a failure midway undoes that call.
    * :meth:`restore` copies back the saved originals of every touched parameter (bit-exact).
    * :meth:`suspended` temporarily shows the original weights (e.g. to measure pre-edit state in
      a sequential stream) and puts the edited values back afterwards, bit-exactly.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._originals: dict[str, torch.Tensor] = {}

    @property
    def edited(self) -> bool:
        return bool(self._originals)

    @property
    def touched(self) -> list[str]:
        return list(self._originals)

    def _params(self, deltas: Deltas) -> dict[str, nn.Parameter]:
        named = dict(self.model.named_parameters())
        params = {}
        for name, delta in deltas.items():
            if name not in named:
                raise EditError(f"delta for unknown parameter {name!r}")
            param = named[name]
            if tuple(delta.shape) != tuple(param.shape):
                raise EditError(
                    f"delta for {name!r} has shape {tuple(delta.shape)}, parameter has {tuple(param.shape)}"
                )
            if not torch.isfinite(delta).all():
                raise EditError(f"delta for {name!r} contains NaN or Inf")
            params[name] = param
        return params

    @torch.no_grad()
    def apply(self, deltas: Deltas) -> None:
        params = self._params(deltas)  # everything is checked before anything is written
        before: dict[str, torch.Tensor] = {}
        try:
            for name, param in params.items():
                if name not in self._originals:
                    self._originals[name] = param.detach().clone()
                before[name] = param.detach().clone()
                param.add_(deltas[name].to(device=param.device, dtype=param.dtype))
        except BaseException:
            for name, value in before.items():
                params[name].copy_(value)
            raise

    @torch.no_grad()
    def restore(self) -> None:
        named = dict(self.model.named_parameters())
        for name, original in self._originals.items():
            named[name].copy_(original)
        self._originals.clear()

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """Show the original weights inside the block; the edited ones come back after it."""
        if not self._originals:
            yield
            return
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            current = {name: named[name].detach().clone() for name in self._originals}
            for name, original in self._originals.items():
                named[name].copy_(original)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in current.items():
                    named[name].copy_(value)


@contextlib.contextmanager
def applied(model: nn.Module, deltas: Deltas) -> Iterator[WeightEditSession]:
    """Apply ``deltas`` to ``model`` inside a ``with`` block and restore the weights bit-exactly after."""
    session = WeightEditSession(model)
    session.apply(deltas)
    try:
        yield session
    finally:
        session.restore()
