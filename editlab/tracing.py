"""Context managers that look into, or change, a forward pass — and always clean up after.

* :class:`Trace` — capture (or rewrite) the inputs/outputs of several named modules during a
  forward; captured tensors come back in a dict keyed by module path.
* :class:`StopForward` — raised from a hook to end a forward early once the last module of
  interest has run (``stop=True``); :class:`Trace` swallows it on exit.
* :class:`CallRecorder` — record the full call (positional and keyword arguments) each named module
  received, so that part of a network can be replayed later (see :func:`replay_layers`).
* :class:`GradientFactors` — capture, for linear-like modules, the input activations of a forward
  and the gradient of a later backward with respect to their outputs: the two factors of the
  weight gradient (MEND's rank-one factors).

Every hook is registered inside ``__enter__`` and removed in ``__exit__``, exceptions included.
The design follows the idea of ROME's ``nethook`` (module-path keyed tracing) with hooks that
take and return dicts instead of mutable attributes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from editlab.models.arch import get_module

__all__ = [
    "StopForward", "Trace", "CallRecorder", "GradientFactors", "RowDeltas", "LayerCall", "replay_layers",
    "first_tensor",
]


class StopForward(Exception):
    """Raised by a hook to stop a forward pass early; caught by :class:`Trace`."""


def first_tensor(value: Any) -> torch.Tensor:
    """The hidden-state tensor of a module output (plain tensor, or first element of a tuple)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    hidden = getattr(value, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    raise TypeError(f"cannot find a tensor in module output of type {type(value).__name__}")


def _replace_first(value: Any, tensor: torch.Tensor) -> Any:
    if isinstance(value, torch.Tensor):
        return tensor
    if isinstance(value, tuple):
        return (tensor,) + tuple(value[1:])
    if isinstance(value, list):
        return [tensor] + list(value[1:])
    raise TypeError(f"cannot replace the tensor in module output of type {type(value).__name__}")


class _Hooks:
    """Owns a set of hook handles: registered in ``__enter__`` (via ``_register``), removed in
    ``__exit__`` whatever happens; a :class:`StopForward` raised inside the block is swallowed."""

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _register(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        try:
            self._register()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return exc_type is not None and issubclass(exc_type, StopForward)


class Trace(_Hooks):
    """Capture and/or edit the inputs and outputs of named modules for the duration of a block.

    Args:
        model: the root module.
        paths: dotted module paths.
        retain_input / retain_output: keep the first input tensor / the output tensor of each path
            in ``self.inputs`` / ``self.outputs`` (dicts keyed by path).
        detach: detach retained tensors (default) — set False to backpropagate through them.
        clone: clone retained tensors (needed when a later in-place op would change them).
        edit_output: ``f(path, output) -> output`` applied to each module's output.
        edit_input: ``f(path, first_input_tensor) -> tensor`` applied to each module's first input.
        stop: raise :class:`StopForward` after the last of ``paths`` (in execution order) has run,
            so the rest of the network is skipped.

    Example::

        with Trace(model, ["model.layers.3.mlp.down_proj"], retain_input=True, stop=True) as tr:
            model(**batch)
        keys = tr.inputs["model.layers.3.mlp.down_proj"]
    """

    def __init__(
        self,
        model: nn.Module,
        paths: Iterable[str],
        *,
        retain_input: bool = False,
        retain_output: bool = False,
        detach: bool = True,
        clone: bool = False,
        edit_output: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
        edit_input: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
        stop: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.paths = list(dict.fromkeys(paths))
        if not self.paths:
            raise ValueError("Trace needs at least one module path")
        self.retain_input = retain_input
        self.retain_output = retain_output
        self.detach = detach
        self.clone = clone
        self.edit_output = edit_output
        self.edit_input = edit_input
        self.stop = stop
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self._pending: set[str] = set()

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        if self.detach:
            t = t.detach()
        if self.clone:
            t = t.clone()
        return t

    def _make_pre_hook(self, path: str):
        def hook(module, args):
            if not args or not isinstance(args[0], torch.Tensor):
                return None
            x = args[0]
            if self.edit_input is not None:
                x = self.edit_input(path, x)
            if self.retain_input:
                self.inputs[path] = self._keep(x)
            if self.edit_input is not None:
                return (x,) + tuple(args[1:])
            return None

        return hook

    def _make_hook(self, path: str):
        def hook(module, args, output):
            if self.edit_output is not None:
                new = self.edit_output(path, first_tensor(output))
                output = _replace_first(output, new)
            if self.retain_output:
                self.outputs[path] = self._keep(first_tensor(output))
            self._pending.discard(path)
            if self.stop and not self._pending:
                raise StopForward()
            return output if self.edit_output is not None else None

        return hook

    def _register(self) -> None:
        self._pending = set(self.paths)
        for path in self.paths:
            module = get_module(self.model, path)
            if self.retain_input or self.edit_input is not None:
                self._handles.append(module.register_forward_pre_hook(self._make_pre_hook(path)))
            if self.retain_output or self.edit_output is not None or self.stop:
                self._handles.append(module.register_forward_hook(self._make_hook(path)))

    def __enter__(self) -> Trace:
        return super().__enter__()


class LayerCall:
    """The positional and keyword arguments one module was called with."""

    __slots__ = ("args", "kwargs")

    def __init__(self, args: tuple, kwargs: dict[str, Any]):
        self.args = args
        self.kwargs = kwargs

    @property
    def hidden(self) -> torch.Tensor:
        if self.args:
            return self.args[0]
        return self.kwargs["hidden_states"]

    def with_hidden(self, hidden: torch.Tensor) -> tuple[tuple, dict[str, Any]]:
        if self.args:
            return (hidden,) + tuple(self.args[1:]), self.kwargs
        kwargs = dict(self.kwargs)
        kwargs["hidden_states"] = hidden
        return (), kwargs


class CallRecorder(_Hooks):
    """Record each named module's call arguments (args + kwargs) during a forward.

    ``stop_at`` names a module at whose *input* the forward is stopped (e.g. the LM head, so the
    vocabulary projection is never computed); the input it would have received is kept in
    ``self.stopped_input``.
    """

    def __init__(self, model: nn.Module, paths: Iterable[str], stop_at: str | None = None):
        super().__init__()
        self.model = model
        self.paths = list(paths)
        self.stop_at = stop_at
        self.calls: dict[str, LayerCall] = {}
        self.stopped_input: torch.Tensor | None = None

    def _register(self) -> None:
        for path in self.paths:
            module = get_module(self.model, path)

            def hook(module, args, kwargs, _path=path):
                self.calls[_path] = LayerCall(tuple(args), dict(kwargs))

            self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        if self.stop_at is not None:

            def stop_hook(module, args):
                self.stopped_input = args[0]
                raise StopForward()

            self._handles.append(get_module(self.model, self.stop_at).register_forward_pre_hook(stop_hook))

    def __enter__(self) -> CallRecorder:
        return super().__enter__()


class GradientFactors(_Hooks):
    """Capture the input ``x`` and the output gradient ``δ = ∂L/∂y`` of named linear-like modules.

    A forward hook stores each module's (detached) first input and, when the output requires grad,
    registers a tensor hook on it that stores the gradient reaching it in a later backward.  For a
    linear map ``y = W x (+ b)`` the weight gradient is ``Σ_t δ_t x_tᵀ`` over all positions ``t``
    (``Σ_t x_t δ_tᵀ`` for GPT-2's ``Conv1D``, which stores ``Wᵀ``).  A module called several times
    in one forward contributes one pair per call.  Every hook (tensor hooks included) is removed on
    exit.

    The outputs must require grad for a gradient to arrive (e.g. substitute detached aliases of the
    weights that require grad through :func:`torch.func.functional_call`).  Run the backward with
    ``torch.autograd.grad(loss, capture.grad_targets())`` to compute exactly the captured
    gradients and nothing else (no weight gradient, no ``.grad`` written).

    Example::

        with GradientFactors(model, [path]) as cap:
            loss = loss_fn(functional_call(model, {path + ".weight": w.detach().requires_grad_()}, ...))
            torch.autograd.grad(loss, cap.grad_targets(), allow_unused=True)
        x, delta = cap.factors(path)   # [rows, in], [rows, out]
    """

    def __init__(self, model: nn.Module, paths: Iterable[str]) -> None:
        super().__init__()
        self.model = model
        self.paths = list(dict.fromkeys(paths))
        if not self.paths:
            raise ValueError("GradientFactors needs at least one module path")
        self.inputs: dict[str, list[torch.Tensor]] = {p: [] for p in self.paths}
        self.grads: dict[str, list[torch.Tensor | None]] = {p: [] for p in self.paths}
        self._outputs: list[torch.Tensor] = []

    def _make_hook(self, path: str):
        def hook(module, args, output):
            if not args or not isinstance(args[0], torch.Tensor):
                raise TypeError(f"GradientFactors: module {path!r} was called without a tensor input")
            call = len(self.inputs[path])
            self.inputs[path].append(args[0].detach())
            self.grads[path].append(None)
            out = first_tensor(output)
            if out.requires_grad:

                def store(grad, _path=path, _call=call):
                    self.grads[_path][_call] = grad.detach()

                self._handles.append(out.register_hook(store))
                self._outputs.append(out)
            return None

        return hook

    def _register(self) -> None:
        self.inputs = {p: [] for p in self.paths}
        self.grads = {p: [] for p in self.paths}
        self._outputs = []
        for path in self.paths:
            self._handles.append(get_module(self.model, path).register_forward_hook(self._make_hook(path)))

    def close(self) -> None:
        super().close()
        self._outputs = []  # release the graph

    def grad_targets(self) -> list[torch.Tensor]:
        """The captured outputs that require grad (pass them as ``inputs`` of the backward)."""
        return list(self._outputs)

    def factors(self, path: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, δ)`` of ``path`` flattened to rows ``[n, in]`` and ``[n, out]`` over every call and
        position (a call whose output got no gradient contributes zero rows of δ)."""
        if not self.inputs.get(path):
            raise KeyError(f"module {path!r} did not run inside the GradientFactors block")
        xs, ds = [], []
        for x, g in zip(self.inputs[path], self.grads[path]):
            xs.append(x.reshape(-1, x.shape[-1]))
            if g is None:
                ds.append(None)
            else:
                ds.append(g.reshape(-1, g.shape[-1]))
        width = next((d.shape[-1] for d in ds if d is not None), None)
        if width is None:
            raise KeyError(f"no gradient reached the output of {path!r}")
        ds = [d if d is not None else x.new_zeros(x.shape[0], width) for x, d in zip(xs, ds)]
        return torch.cat(xs), torch.cat(ds)

    def factor_rows(self, path: str) -> torch.Tensor:
        """The batch row (index along the first dimension of the module's input) of each row of
        :meth:`factors` ``(path)``, in the same order: which example each rank-one term came from."""
        if not self.inputs.get(path):
            raise KeyError(f"module {path!r} did not run inside the GradientFactors block")
        rows = []
        for x in self.inputs[path]:
            if x.dim() < 2:
                raise ValueError(f"module {path!r} got an input of shape {tuple(x.shape)}: "
                                 "no batch dimension")
            per_row = x[0].numel() // x.shape[-1]
            rows.append(torch.arange(x.shape[0], device=x.device).repeat_interleave(per_row))
        return torch.cat(rows)

    def __enter__(self) -> GradientFactors:
        return super().__enter__()


class RowDeltas(_Hooks):
    """Run a batch in which every row sees its own edit of some linear-layer weights and biases.

    ``deltas`` maps a parameter name (as in ``model.named_parameters()``: the ``weight`` or ``bias``
    of an ``nn.Linear`` or GPT-2 ``Conv1D``) to a stack ``[E, *shape]`` of ``E`` updates in the
    parameter's own layout; ``rows`` (``[N]``) names the update each batch row gets (row ``n`` is
    computed with ``W + deltas[name][rows[n]]``).  A forward hook on each owning module adds that
    row's term to the output: ``x ΔWᵀ`` for ``nn.Linear`` (weight ``(out, in)``), ``x ΔW`` for
    ``Conv1D`` (weight ``(in, out)``), ``Δb`` for a bias.  The model's own tensors are never written
    and gradients flow into ``deltas``; every hook is removed on exit.  ``rows=None``: row ``n``
    gets update ``n``.

    Example::

        with RowDeltas(model, {"transformer.h.0.mlp.c_fc.weight": stack}):
            logits = model(**inputs).logits   # row n edited by stack[n]
    """

    def __init__(self, model: nn.Module, deltas: Mapping[str, torch.Tensor],
                 rows: torch.Tensor | None = None) -> None:
        super().__init__()
        if not deltas:
            raise ValueError("RowDeltas needs at least one weight update")
        self.model = model
        self.deltas = dict(deltas)
        self.rows = rows
        counts = {d.shape[0] for d in self.deltas.values()}
        if len(counts) != 1:
            raise ValueError("RowDeltas: every stack must hold the same number of updates, "
                             f"got {sorted(counts)}")

    def _make_hook(self, name: str, kind: str):
        def hook(module, args, output):
            if not isinstance(output, torch.Tensor) or not args or not isinstance(args[0], torch.Tensor):
                raise TypeError(f"RowDeltas: {name!r} must belong to a module mapping one tensor to "
                                "one tensor")
            x = args[0]
            n = x.shape[0]
            rows = self.rows if self.rows is not None else torch.arange(n, device=x.device)
            if rows.shape[0] != n:
                raise ValueError(f"RowDeltas: {rows.shape[0]} row indices for a batch of {n} rows ({name!r})")
            # [n, out, in] (Linear weight), [n, in, out] (Conv1D weight) or [n, out] (bias)
            delta = self.deltas[name][rows].to(x.dtype)
            if kind == "bias":
                return output + delta.reshape(n, *([1] * (output.dim() - 2)), delta.shape[-1])
            flat = x.reshape(n, -1, x.shape[-1])
            extra = torch.bmm(flat, delta if kind == "conv1d_weight" else delta.transpose(1, 2))
            return output + extra.reshape(output.shape)

        return hook

    def _register(self) -> None:
        named = dict(self.model.named_parameters())
        for name, stack in self.deltas.items():
            path, _, leaf = name.rpartition(".")
            if name not in named or leaf not in ("weight", "bias"):
                raise KeyError(f"RowDeltas: {name!r} is not a weight or bias of the model")
            if tuple(stack.shape[1:]) != tuple(named[name].shape):
                raise ValueError(f"RowDeltas: updates of {name!r} have shape {tuple(stack.shape[1:])}, "
                                 f"the parameter {tuple(named[name].shape)}")
            module = get_module(self.model, path)
            if not isinstance(module, (nn.Linear, Conv1D)):
                raise TypeError(f"RowDeltas: {name!r} belongs to a {type(module).__name__}, not a "
                                "linear layer (nn.Linear or Conv1D); edit it with batch_edits='joint'")
            if leaf == "bias":
                kind = "bias"
            else:
                kind = "conv1d_weight" if isinstance(module, Conv1D) else "linear_weight"
            self._handles.append(module.register_forward_hook(self._make_hook(name, kind)))

    def __enter__(self) -> RowDeltas:
        return super().__enter__()


def replay_layers(
    model: nn.Module,
    layer_paths: list[str],
    calls: Mapping[str, LayerCall],
    hidden: torch.Tensor,
    overrides: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Run a contiguous run of blocks again from ``hidden``, with the recorded call arguments.

    ``overrides`` maps a block path to ``{parameter name relative to the block: tensor}``; those
    blocks run through :func:`torch.func.functional_call`, so gradients flow to the override
    tensors and the model's own parameters are never written.
    """
    overrides = overrides or {}
    for path in layer_paths:
        block = get_module(model, path)
        args, kwargs = calls[path].with_hidden(hidden)
        if path in overrides:
            out = torch.func.functional_call(block, dict(overrides[path]), args, kwargs, strict=False)
        else:
            out = block(*args, **kwargs)
        hidden = first_tensor(out)
    return hidden
