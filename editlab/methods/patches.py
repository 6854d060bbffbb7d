"""What the parameter-adding editors share: the FFN-like patch and the forward they train it in.

T-Patcher (Huang et al. 2023) adds one neuron per edit beside the last FFN; CaliNet (Dong et al.
2022) adds a block of calibration memory slots beside a chosen FFN.  Both are the same object: a
small key-value memory read like an FFN,

    out = act(h Kᵀ + b) V                    (ungated)
    out = (act(h Gᵀ) ⊙ (h Kᵀ + b)) V         (gated, as the host's SwiGLU / GeGLU MLP)

with ``n`` slots (keys ``K`` and gates ``G``: ``[n, d]``, bias ``b``: ``[n]``, values ``V``:
``[n, d]``), :class:`FFNPatch`.  An editor returns it in ``Edit(patches={"<mlp path>": patch})``
and the :class:`~editlab.methods.base.WeightEditSession` attaches it beside the host MLP (the
host's output becomes ``output + patch(input)``) and removes it on restore.

:class:`HostReplay` is the training side: it runs an edit batch once through the frozen model,
records the host MLP's inputs at the positions that predict target tokens and, for decoder-only
models, the call arguments of the blocks from the host's block up; each optimisation step then
replays only those blocks with a patch function hooked beside the host (a context manager: the
hook is gone when the step ends, whatever happens) and projects to the vocabulary only at the
target positions.  The model is never written: the patch's tensors are the only leaves that
receive gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from transformers.activations import ACT2FN

from editlab.data.collate import PairBatch, encode_pairs
from editlab.data.records import EditRecord
from editlab.methods.base import EditError
from editlab.models.arch import ArchSpec, arch_for, get_module, is_encoder_decoder
from editlab.scoring import head_logits, head_nll
from editlab.tracing import CallRecorder, Trace, replay_layers

__all__ = ["FFNPatch", "HostReplay", "attached", "check_records", "host_patches", "resolve_layer"]

PatchFn = Callable[[torch.Tensor], torch.Tensor]


class FFNPatch(nn.Module):
    """A key-value memory added beside an MLP: ``act(h Kᵀ + b) V`` (or gated, see the module docstring).

    Args:
        keys: ``[n, d]``; one row per slot (T-Patcher: one per edit; CaliNet: ``num_slots``).
        values: ``[n, d_out]``, what each slot adds to the host's output when it fires.
        bias: ``[n]`` or None (no bias, as CaliNet's slots).
        gates: ``[n, d]`` for a gated memory (``act`` applied to ``h Gᵀ``, multiplied with the
            linear ``h Kᵀ + b``), None for an ungated one.
        activation: a key of ``transformers.activations.ACT2FN`` (``relu``, ``gelu_new``, ``silu``...).
        anchors: ``[m, d]`` host inputs this patch was trained to fire on (T-Patcher keeps the
            edit's; later edits learn to stay silent on them).  A non-persistent buffer: it moves
            with the patch but is not part of a state dict.

    Parameters are stored in float32 and do not require grad (an installed patch is a fixed
    edit); inputs of another dtype are computed in float32 and the output cast back.
    """

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        bias: torch.Tensor | None = None,
        gates: torch.Tensor | None = None,
        activation: str = "relu",
        anchors: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if keys.dim() != 2 or values.dim() != 2 or keys.shape[0] != values.shape[0]:
            raise ValueError(f"keys [n, d] and values [n, d_out] expected, got {tuple(keys.shape)} and "
                             f"{tuple(values.shape)}")
        if bias is not None and tuple(bias.shape) != (keys.shape[0],):
            raise ValueError(f"bias must have shape ({keys.shape[0]},), got {tuple(bias.shape)}")
        if gates is not None and gates.shape != keys.shape:
            raise ValueError(f"gates must have the keys' shape {tuple(keys.shape)}, got {tuple(gates.shape)}")
        if activation not in ACT2FN:
            raise ValueError(f"unknown activation {activation!r}; known: {sorted(ACT2FN)}")

        def param(t: torch.Tensor) -> nn.Parameter:
            return nn.Parameter(t.detach().to(torch.float32).clone(), requires_grad=False)

        self.keys = param(keys)
        self.values = param(values)
        self.bias = param(bias) if bias is not None else None
        self.gates = param(gates) if gates is not None else None
        self.activation = activation
        anchors = anchors.detach().to(torch.float32).clone() if anchors is not None else keys.new_zeros(0, keys.shape[1])
        self.register_buffer("anchors", anchors, persistent=False)

    def stream_args(self) -> dict[str, Any]:
        """The constructor's keyword arguments that rebuild this patch (anchors included, which a
        state dict leaves out): how a stream checkpoint saves it (:mod:`editlab.lit.stream`)."""
        return {"keys": self.keys.detach(), "values": self.values.detach(),
                "bias": None if self.bias is None else self.bias.detach(),
                "gates": None if self.gates is None else self.gates.detach(),
                "activation": self.activation, "anchors": self.anchors}

    @property
    def num_slots(self) -> int:
        return int(self.keys.shape[0])

    @staticmethod
    def compute(
        hidden: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        bias: torch.Tensor | None,
        gates: torch.Tensor | None,
        activation: str,
    ) -> torch.Tensor:
        """The patch's output for ``hidden`` (``[..., d]`` → ``[..., d_out]``, ``hidden``'s dtype),
        from explicit tensors, so that an editor can train them (gradients reach every argument)."""
        h = hidden.to(keys.dtype)
        slots = FFNPatch.slot_inputs(h, keys, bias)
        act = ACT2FN[activation]
        slots = act(h @ gates.t()) * slots if gates is not None else act(slots)
        return (slots @ values).to(hidden.dtype)

    @staticmethod
    def slot_inputs(hidden: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``h Kᵀ + b``: each slot's pre-activation (ungated) or linear branch (gated), ``[..., n]``."""
        out = hidden.to(keys.dtype) @ keys.t()
        return out + bias if bias is not None else out

    def pre_activation(self, hidden: torch.Tensor) -> torch.Tensor:
        """``h Kᵀ + b`` in float32, ``[..., n]``: a slot of an ungated patch fires where this is
        positive (for ReLU exactly; GELU-like activations are ≈ 0 well below zero)."""
        return self.slot_inputs(hidden, self.keys, self.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.compute(hidden, self.keys, self.values, self.bias, self.gates, self.activation)

    def extra_repr(self) -> str:
        kind = "gated" if self.gates is not None else "ungated"
        return (f"slots={self.num_slots}, d={self.keys.shape[1]}, {kind} {self.activation}, "
                f"bias={self.bias is not None}, anchors={self.anchors.shape[0]}")


@contextlib.contextmanager
def attached(host: nn.Module, fn: PatchFn) -> Iterator[None]:
    """Add ``fn(input)`` to ``host``'s output for the duration of the block (a forward hook that is
    removed on exit, exceptions included) — what the session does with an installed patch."""

    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        extra = fn(args[0])
        if isinstance(output, tuple):
            return (output[0] + extra, *output[1:])
        return output + extra

    handle = host.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def check_records(records: Sequence[EditRecord], method: str) -> None:
    """Every record needs a non-empty prompt and new target (EditError names the record and field)."""
    if not records:
        raise EditError(f"{method} got no records")
    for r in records:
        for name in ("prompt", "target_new"):
            value = getattr(r, name, None)
            if not isinstance(value, str) or not value.strip():
                raise EditError(f"{method}: record {getattr(r, 'record_id', '?')!r}: field {name!r} is empty")


def resolve_layer(model: nn.Module, layer: int, method: str) -> int:
    """``layer`` as a block index (negative counts from the last block: -1 is the last)."""
    n = arch_for(model).num_layers(model)
    index = layer + n if layer < 0 else layer
    if not 0 <= index < n:
        raise EditError(f"{method}: layer {layer} out of range: the model has {n} blocks")
    return index


def host_patches(host: nn.Module) -> list[FFNPatch]:
    """The :class:`FFNPatch` modules installed on ``host`` so far (e.g. earlier edits of a
    sequential stream), in attachment order."""
    return [m for m in host.modules() if isinstance(m, FFNPatch)]


class HostReplay:
    """An edit batch run up to the host MLP once, then replayed from there with a patch hooked in.

    Attributes:
        arch, host_path, host: the architecture entry, the host MLP's path and module.
        batch: the teacher-forced (prompt, target_new) batch of the records.
        inputs: ``[M, d]`` the host's inputs at the M positions that predict target tokens
            (row-major over records).
        rows: ``[M]`` the record each of those positions belongs to.
        targets: ``[M]`` the target token each position predicts.
    """

    def __init__(self, model: nn.Module, tokenizer, records: Sequence[EditRecord], layer: int, method: str) -> None:
        self.model = model
        self.arch: ArchSpec = arch_for(model)
        self.layer = layer
        self.host_path = self.arch.module_path(model, "mlp", layer)
        self.host = get_module(model, self.host_path)
        self.seq2seq = is_encoder_decoder(model)
        device = next(model.parameters()).device
        try:
            batch = encode_pairs(
                tokenizer, [r.prompt for r in records], [r.target_new for r in records], seq2seq=self.seq2seq,
                decoder_start_token_id=getattr(model.config, "decoder_start_token_id", None),
            )
        except ValueError as err:
            bad = next((r for r in records if not tokenizer(r.target_new, add_special_tokens=False)["input_ids"]),
                       None)
            where = f"record {bad.record_id!r}: field 'target_new'" if bad is not None else "records"
            raise EditError(f"{method}: {where}: {err}") from err
        self.batch: PairBatch = batch.to(device)
        rows, pos = self.batch.gather_index()
        self.rows, self.positions = rows, pos
        self.targets = self.batch.target_ids[self.batch.target_mask]
        self.blocks = [self.arch.layer_path(i) for i in range(layer, self.arch.num_layers(model))]
        self.final_norm = get_module(model, self.arch.final_norm)
        with torch.no_grad():
            if self.seq2seq:
                with Trace(model, [self.host_path], retain_input=True, stop=True) as trace:
                    model(**self.batch.model_inputs(), use_cache=False)
                self.calls = None
            else:
                with CallRecorder(model, self.blocks, stop_at=self.arch.lm_head) as rec, \
                        Trace(model, [self.host_path], retain_input=True) as trace:
                    model(**self.batch.model_inputs(), use_cache=False)
                if len(rec.calls) != len(self.blocks):
                    raise EditError(f"{method}: could not record the calls of blocks {self.blocks}")
                self.calls = rec.calls
        host_in = trace.inputs.get(self.host_path)
        if host_in is None:
            raise EditError(f"{method}: the host MLP {self.host_path!r} did not run")
        self.inputs = host_in[rows, pos]

    def record_mask(self, i: int) -> torch.Tensor:
        return self.rows == i

    def hidden(self, fn: PatchFn | None) -> torch.Tensor:
        """``[M, d]`` LM-head inputs at the target positions with ``fn`` beside the host."""
        hook = attached(self.host, fn) if fn is not None else contextlib.nullcontext()
        with hook:
            if self.calls is not None:
                first = self.blocks[0]
                out = replay_layers(self.model, self.blocks, self.calls, self.calls[first].hidden)
                out = self.final_norm(out)
            else:
                with CallRecorder(self.model, [], stop_at=self.arch.lm_head) as rec:
                    self.model(**self.batch.model_inputs(), use_cache=False)
                out = rec.stopped_input
        return out[self.rows, self.positions]

    def nll(self, hidden: torch.Tensor) -> torch.Tensor:
        """Mean over records of the mean target-token NLL, from :meth:`hidden`'s output."""
        tok = head_nll(self.model, hidden, self.targets)
        n = len(self.batch)
        per_row = torch.zeros(n, device=tok.device, dtype=tok.dtype).index_add(0, self.rows, tok)
        counts = torch.zeros(n, device=tok.device, dtype=tok.dtype).index_add(0, self.rows, torch.ones_like(tok))
        return (per_row / counts.clamp(min=1)).mean()

    @torch.no_grad()
    def wrong(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[M]`` bool: the target positions whose argmax is not the target token, from
        :meth:`hidden`'s output."""
        return head_logits(self.model, hidden).argmax(-1) != self.targets

    @torch.no_grad()
    def correct(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[N]`` bool: every target token of the record is the argmax (greedy decoding would
        produce the target), from :meth:`hidden`'s output."""
        errors = torch.zeros(len(self.batch), dtype=torch.long, device=hidden.device)
        errors.index_add_(0, self.rows, self.wrong(hidden).long())
        return errors == 0
