"""The editor interface and the one mechanism that applies and restores weight edits.

A non-trained editor (FT-L, ROME, MEMIT, KN, ...) *computes* an edit and never writes to the
model itself: :meth:`Editor.compute_deltas` returns :data:`Deltas`, a dict from parameter name to
an additive update in the parameter's own layout.  Applying and undoing deltas is the job of
:class:`WeightEditSession` alone — the edit loop, the Lightning callback and the Python context
manager :func:`applied` all go through it.  It checks every delta (name, shape, finiteness)
before it writes anything and the result after (the edited weights, and with
:func:`verify_outputs` the edited model's logits, must be finite), keeps a bit-exact copy of each
touched parameter, and restores those copies exactly, so a failed or finished edit leaves the
model as it was.

Not every editor changes weights.  :meth:`Editor.compute_edit` returns an :class:`Edit`, which
may hold, besides deltas, *patches* (modules added beside an existing module: T-Patcher's
neurons, CaliNet's memory slots; the module's output becomes ``output + patch(input)``) and
*memory* (records kept by an editor that changes how inputs are answered rather than the
weights: IKE's in-context facts, SERAC's edit memory).  The session installs all three and
undoes all three; while it holds memory, :attr:`WeightEditSession.forward_model` is the editor's
wrapper around the model (same call signature, logits aligned with the inputs, ``generate``),
and every metric scores through it unchanged.
"""

from __future__ import annotations

import contextlib
from abc import ABC
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any
from dataclasses import dataclass, field

import torch
from torch import nn

from editlab.data.collate import check_lengths
from editlab.data.records import EditRecord
from editlab.models.arch import arch_for, get_module
from editlab.scoring import broken_pairs

__all__ = ["Deltas", "Edit", "Editor", "EditError", "Verifier", "Wrapper", "WeightEditSession", "applied",
           "verify_outputs"]

Deltas = dict[str, torch.Tensor]
"""Parameter name (as in ``model.named_parameters()``) → additive update, same shape as the parameter."""


class EditError(RuntimeError):
    """An edit could not be computed or applied; the model is unchanged."""


Wrapper = Callable[[nn.Module, Sequence[EditRecord]], nn.Module]
"""``(model, memory) → edited model``: a memory-based editor's view of ``model`` given its memory."""

Verifier = Callable[["WeightEditSession"], None]
"""Called by :meth:`WeightEditSession.apply` once an edit is installed; raises :class:`EditError`
to have it undone (:func:`verify_outputs`)."""

PATCH_PREFIX = "editlab_patch_"  # name under which an added module is registered on its host


@dataclass
class Edit:
    """Everything one editor call installs; any part may be empty.

    Attributes:
        deltas: additive weight updates (:data:`Deltas`).
        patches: dotted module path → module added beside it; the host's output becomes
            ``output + patch(first positional input)``.  Registered as a submodule of the host
            while applied (so it moves, saves and counts with the model) and removed on restore.
            A patch whose ``uses_attention_mask`` is true is called as ``patch(input,
            attention_mask=mask)``: the ``attention_mask`` the (decoder-only) model was called
            with, ``[B, past + T]`` (None when it was called without one, or called through a
            submodule): a patch that decides per row can leave padded positions out.
        memory: records a memory-based editor keeps; they accumulate over a sequential stream.
        wrap: builds the edited model from the base model and the memory so far (required with
            ``memory``).
        replace: the patches replace every patch installed earlier at the same module paths,
            instead of adding to them: an editor whose one module holds all its edits so far
            (GRACE's codebook, WISE's side memory) returns that module anew with each edit.
        state: a stateful editor's stream state after this edit (:attr:`Editor.stateful`); the
            session keeps it while the edit is installed.  Tensors and plain data only (lists,
            dicts, numbers, strings), so a stream checkpoint can hold it.
    """

    deltas: Deltas = field(default_factory=dict)
    patches: Mapping[str, nn.Module] = field(default_factory=dict)
    memory: Sequence[EditRecord] = ()
    wrap: Wrapper | None = None
    replace: bool = False
    state: Any = None

    def __post_init__(self) -> None:
        if self.memory and self.wrap is None:
            raise ValueError("an Edit with memory needs `wrap`, the editor's view of the model given its memory")


class Editor(ABC):
    """A non-trained editor.  Constructor keyword arguments are its hyperparameters.

    Weight editors implement :meth:`compute_deltas`; editors that add modules or keep a memory
    implement :meth:`compute_edit` instead (which by default wraps :meth:`compute_deltas`).
    Neither may modify ``model`` (parameters, buffers, hooks, ``requires_grad`` flags, mode).

    A *stateful* editor (:attr:`stateful`) carries more from one edit of a stream to the next
    than the weights it left: AlphaEdit the keys of earlier edits, GRACE its codebook, UltraEdit
    its running normalisation.  That state is the model's edit history, so it lives in the
    :class:`WeightEditSession` with the edits, not in the editor: :meth:`edit_in` passes the
    session's :attr:`~WeightEditSession.stream_state` as ``compute_edit(..., state=...)`` (None at
    a stream's start) and the editor returns the new state in :attr:`Edit.state`.  A failed edit
    leaves the state as it was; a restore forgets it; the editor object itself stays stateless.
    """

    stateful: bool = False
    """True when :meth:`compute_edit` takes ``state=`` (see the class docstring)."""

    def compute_deltas(self, model: nn.Module, tokenizer, records: Sequence[EditRecord]) -> Deltas:
        """Compute the weight updates that install ``records`` (all at once, as one batch)."""
        raise TypeError(f"{type(self).__name__} does not edit by weight deltas alone: use compute_edit")

    def compute_edit(self, model: nn.Module, tokenizer, records: Sequence[EditRecord]) -> Edit:
        """Compute the :class:`Edit` that installs ``records`` (all at once, as one batch)."""
        if type(self).compute_deltas is Editor.compute_deltas:
            raise TypeError(f"{type(self).__name__} implements neither compute_deltas nor compute_edit")
        return Edit(deltas=self.compute_deltas(model, tokenizer, records))

    @contextlib.contextmanager
    def apply(self, model: nn.Module, tokenizer, records: Sequence[EditRecord]) -> Iterator[WeightEditSession]:
        """Edit ``model`` for the duration of a ``with`` block; everything is restored bit-exactly after.

        Yields the :class:`WeightEditSession`; ``session.forward_model`` is the model to query (the
        model itself unless the editor keeps a memory) and ``session.deltas`` the weight updates.
        An edit that leaves a weight or the edited model's logits on the records non-finite is
        undone and raises :class:`EditError` (:func:`verify_outputs`).

        Example::

            with FTL(layers=[20]).apply(model, tok, records) as session:
                session.forward_model(...)  # the edited model
        """
        check_lengths(records, tokenizer, arch_for(model).max_positions(model))  # before any compute
        session = WeightEditSession(model)
        session.apply(self.edit_in(session, tokenizer, records),
                      verify=lambda s: verify_outputs(s, tokenizer, records))
        try:
            yield session
        finally:
            session.restore()

    def edit_in(self, session: WeightEditSession, tokenizer, records: Sequence[EditRecord]) -> Edit:
        """The :class:`Edit` that installs ``records`` on top of what ``session`` holds: computed on
        ``session.model`` as the session has left it, with the session's stream state for a
        stateful editor.  Nothing is installed here (``session.apply`` does that)."""
        if self.stateful:
            return self.compute_edit(session.model, tokenizer, records, state=session.stream_state)
        return self.compute_edit(session.model, tokenizer, records)


class WeightEditSession:
    """Install edits on a model, possibly in several steps, and undo them all.

    * :meth:`apply` validates everything first (delta names, shapes, finiteness; patch hosts),
      then adds the deltas, attaches the patches (or replaces earlier ones, :attr:`Edit.replace`),
      extends the memory and keeps the editor's stream state; a failure midway undoes that call.
    * :meth:`restore` copies back the saved originals of every touched parameter (bit-exact),
      removes every added module and hook, and forgets the memory and the stream state.
    * :meth:`suspended` temporarily shows the unedited model (original weights, patches off,
      :attr:`forward_model` the bare model), e.g. to score pre-edit state in a sequential stream,
      and puts the edits back afterwards, bit-exactly.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._originals: dict[str, torch.Tensor] = {}
        self._deltas: dict[str, torch.Tensor] = {}
        self._patches: list[tuple[nn.Module, str, torch.utils.hooks.RemovableHandle]] = []
        self._memory: list[EditRecord] = []
        self._wrap: Wrapper | None = None
        self._wrapped: nn.Module | None = None
        self._state: Any = None
        self._active = True
        self._mask: torch.Tensor | None = None  # the attention mask of the model call under way
        self._mask_hooks: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def edited(self) -> bool:
        return bool(self._originals or self._patches or self._memory)

    @property
    def touched(self) -> list[str]:
        return list(self._originals)

    @property
    def deltas(self) -> Deltas:
        """The weight updates installed so far, per parameter (summed over :meth:`apply` calls)."""
        return dict(self._deltas)

    @property
    def patches(self) -> list[nn.Module]:
        """The modules added so far, in the order they were attached."""
        return [host.get_submodule(name) for host, name, _ in self._patches]

    @property
    def installed_patches(self) -> list[tuple[str, nn.Module]]:
        """``(host path, patch)`` of every added module, in the order they were attached (the
        order their outputs are added up in at a shared host): what a stream checkpoint saves."""
        paths = {id(module): name for name, module in self.model.named_modules()}
        return [(paths[id(host)], host.get_submodule(name)) for host, name, _ in self._patches]

    @property
    def memory(self) -> list[EditRecord]:
        return list(self._memory)

    @property
    def memory_wrap(self) -> Wrapper | None:
        """The editor's wrapper of the memory installed (:attr:`Edit.wrap`), or None."""
        return self._wrap if self._memory else None

    @property
    def stream_state(self) -> Any:
        """The stream state of the stateful editor whose edits this session holds (the last
        installed :attr:`Edit.state`), or None."""
        return self._state

    @property
    def forward_model(self) -> nn.Module:
        """The model to query: the editor's wrapper while a memory is installed (and not
        suspended), the model itself otherwise (weight deltas and patches live inside it)."""
        if not self._active or not self._memory:
            return self.model
        if self._wrapped is None:
            self._wrapped = self._wrap(self.model, tuple(self._memory))
        return self._wrapped

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

    def _hosts(self, patches: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
        hosts = {}
        for path, patch in patches.items():
            if not isinstance(patch, nn.Module):
                raise EditError(f"patch for {path!r} is a {type(patch).__name__}, not an nn.Module")
            try:
                hosts[path] = get_module(self.model, path)
            except (AttributeError, IndexError, KeyError) as err:
                raise EditError(f"patch for unknown module {path!r}") from err
            for name, value in patch.state_dict().items():
                if value.is_floating_point() and not torch.isfinite(value).all():
                    raise EditError(f"patch for {path!r}: {name} contains NaN or Inf")
        return hosts

    def _attach(self, host: nn.Module, patch: nn.Module) -> None:
        name = f"{PATCH_PREFIX}{len(self._patches)}"
        while hasattr(host, name):
            name += "_"
        host.add_module(name, patch)
        masked = bool(getattr(patch, "uses_attention_mask", False))

        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            if not self._active:
                return output
            extra = patch(args[0], attention_mask=self._mask) if masked else patch(args[0])
            if isinstance(output, tuple):
                return (output[0] + extra, *output[1:])
            return output + extra

        self._patches.append((host, name, host.register_forward_hook(hook)))
        if masked:
            self._watch_mask()

    def _watch_mask(self) -> None:
        """Keep the attention mask of each call of the model while it runs (for patches that use
        it; a seq2seq model's mask is the encoder's, of other positions: none is kept)."""
        if self._mask_hooks or getattr(getattr(self.model, "config", None), "is_encoder_decoder", False):
            return

        def start(module: nn.Module, args: tuple, kwargs: dict) -> None:
            mask = kwargs.get("attention_mask")
            self._mask = mask if torch.is_tensor(mask) and mask.dim() == 2 else None

        def end(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            self._mask = None

        self._mask_hooks = [self.model.register_forward_pre_hook(start, with_kwargs=True),
                            self.model.register_forward_hook(end, with_kwargs=True, always_call=True)]

    def _unwatch_mask(self) -> None:
        """Drop the mask hooks once no attached patch uses the mask."""
        if self._mask_hooks and not any(getattr(host.get_submodule(name), "uses_attention_mask", False)
                                        for host, name, _ in self._patches):
            for handle in self._mask_hooks:
                handle.remove()
            self._mask_hooks, self._mask = [], None

    def _detach_from(self, count: int) -> None:
        while len(self._patches) > count:
            host, name, handle = self._patches.pop()
            handle.remove()
            delattr(host, name)
        self._unwatch_mask()

    def _retire(self, hosts: list[nn.Module]) -> list[tuple[nn.Module, nn.Module]]:
        """Detach every patch at ``hosts``; ``(host, patch)`` in the order they were attached."""
        retired, kept = [], []
        for host, name, handle in self._patches:
            if any(host is h for h in hosts):
                retired.append((host, host.get_submodule(name)))
                handle.remove()
                delattr(host, name)
            else:
                kept.append((host, name, handle))
        self._patches = kept
        self._unwatch_mask()
        return retired

    @torch.no_grad()
    def apply(self, edit: Edit | Deltas, verify: Verifier | None = None) -> None:
        """Install ``edit`` (an :class:`Edit`, or bare deltas) on top of what is installed.

        After writing, every touched parameter must still be finite (two finite deltas can sum to
        ``inf``), and ``verify(self)``, when given, must not raise (e.g. :func:`verify_outputs`:
        the edited model's logits are finite).  Otherwise this call is undone, bit-exactly, and
        :class:`EditError` is raised; earlier calls stay installed.
        """
        if not isinstance(edit, Edit):
            edit = Edit(deltas=dict(edit))
        params = self._params(edit.deltas)  # everything is checked before anything is written
        hosts = self._hosts(edit.patches)
        if edit.memory and self._wrap is not None and edit.wrap is not self._wrap and self._memory:
            raise EditError("this session already holds another editor's memory")
        before: dict[str, torch.Tensor] = {}
        applied_deltas: dict[str, torch.Tensor] = {}
        new_originals: list[str] = []
        patches = len(self._patches)
        memory, wrap, wrapped, state = len(self._memory), self._wrap, self._wrapped, self._state
        retired: list[tuple[nn.Module, nn.Module]] = []
        try:
            for name, param in params.items():
                if name not in self._originals:
                    self._originals[name] = param.detach().clone()
                    new_originals.append(name)
                before[name] = param.detach().clone()
                applied_deltas[name] = edit.deltas[name].to(device=param.device, dtype=param.dtype)
                param.add_(applied_deltas[name])
            broken = [name for name, param in params.items() if not torch.isfinite(param).all()]
            if broken:
                raise EditError(f"the edit makes {broken[0]!r}" + (f" and {len(broken) - 1} more" if len(broken) > 1
                                else "") + " non-finite (NaN or Inf) once added to the weights")
            if edit.replace:
                retired = self._retire(list(hosts.values()))
                patches = len(self._patches)
            for path, patch in edit.patches.items():
                self._attach(hosts[path], patch)
            if edit.memory:
                self._memory.extend(edit.memory)
                self._wrap = edit.wrap
                self._wrapped = None
            if edit.state is not None:
                self._state = edit.state
            if verify is not None:
                verify(self)
        except BaseException:
            for name, value in before.items():
                params[name].copy_(value)
            for name in new_originals:
                del self._originals[name]
            self._detach_from(patches)
            for host, patch in retired:  # back in their order: the host adds them up as before
                self._attach(host, patch)
            del self._memory[memory:]
            self._wrap, self._wrapped, self._state = wrap, wrapped, state
            raise
        for name, delta in applied_deltas.items():
            self._deltas[name] = self._deltas[name] + delta if name in self._deltas else delta

    @torch.no_grad()
    def reinstall(self, deltas: Deltas, weights: Mapping[str, torch.Tensor],
                  patches: Sequence[tuple[str, nn.Module]] = (), memory: Sequence[EditRecord] = (),
                  wrap: Wrapper | None = None, state: Any = None) -> None:
        """Put a stream's edit state back on an unedited session (a resumed stream checkpoint).

        ``deltas`` (the summed weight updates, as :attr:`deltas`), the ``patches`` in their
        attachment order (:attr:`installed_patches`), the ``memory`` with its ``wrap`` and the
        stream ``state`` are installed through :meth:`apply`, so the originals are the model's own
        weights and :meth:`restore` is bit-exact as ever.  Then every touched parameter is set to
        ``weights``, its value when the checkpoint was written: a stream adds its deltas one at a
        time, and floating-point addition is not associative, so ``original + sum(deltas)`` can
        differ from that value in the last bits.  Anything that does not fit undoes everything and
        raises :class:`EditError`.
        """
        if self.edited or self._state is not None:
            raise EditError("reinstall needs a session that holds no edit yet")
        if set(weights) != set(deltas):
            raise EditError(f"the stream's weights ({sorted(weights)}) and deltas ({sorted(deltas)}) name "
                            "different parameters")
        try:
            self.apply(Edit(deltas=dict(deltas), memory=tuple(memory), wrap=wrap, state=state))
            for path, patch in patches:
                self.apply(Edit(patches={path: patch}))
            named = dict(self.model.named_parameters())
            for name, value in weights.items():
                if tuple(value.shape) != tuple(named[name].shape):
                    raise EditError(f"the stream's weight {name!r} has shape {tuple(value.shape)}, the parameter "
                                    f"has {tuple(named[name].shape)}")
                named[name].copy_(value)
        except BaseException:
            self.restore()
            raise

    @torch.no_grad()
    def restore(self) -> None:
        named = dict(self.model.named_parameters())
        for name, original in self._originals.items():
            named[name].copy_(original)
        self._originals.clear()
        self._deltas.clear()
        self._detach_from(0)
        self._memory.clear()
        self._wrap = None
        self._wrapped = None
        self._state = None

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """Show the unedited model inside the block; the edits come back after it."""
        if not self.edited or not self._active:
            yield
            return
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            current = {name: named[name].detach().clone() for name in self._originals}
            for name, original in self._originals.items():
                named[name].copy_(original)
        self._active = False
        try:
            yield
        finally:
            self._active = True
            with torch.no_grad():
                for name, value in current.items():
                    named[name].copy_(value)


@contextlib.contextmanager
def applied(model: nn.Module, edit: Edit | Deltas, verify: Verifier | None = None) -> Iterator[WeightEditSession]:
    """Install ``edit`` on ``model`` inside a ``with`` block and undo it bit-exactly after
    (``verify``: see :meth:`WeightEditSession.apply`)."""
    session = WeightEditSession(model)
    session.apply(edit, verify)
    try:
        yield session
    finally:
        session.restore()


def verify_outputs(session: WeightEditSession, tokenizer, records: Sequence[EditRecord]) -> None:
    """Raise :class:`EditError` when the edited model is numerically broken on ``records``' edit
    prompts (prompt → new target): logits at the answer positions that are not finite, or a
    residual stream whose mean square overflows float32 (:func:`editlab.scoring.broken_pairs`).
    An edit whose weights are finite can still do that (a huge scale, a learning rate of 1e30).
    One teacher-forced forward over the records."""
    records = [r for r in records if isinstance(r, EditRecord) and r.prompt and r.target_new]
    if not records:
        return
    bad = broken_pairs(session.forward_model, tokenizer, [r.prompt for r in records],
                       [r.target_new for r in records], blocks_of=session.model)
    if bad:
        ids = [records[i].record_id for i in bad]
        raise EditError(f"the edited model is numerically broken (non-finite logits, or hidden states whose "
                        f"mean square overflows) on the edit prompt of record{'s' if len(ids) > 1 else ''} "
                        f"{', '.join(map(repr, ids[:5]))}{' ...' if len(ids) > 5 else ''}: the edit was undone")
