"""GRACE: a discrete key-value codebook with deferral radii at one layer.

Hartvigsen et al. 2023, "Aging with GRACE: Lifelong Model Editing with Discrete Key-Value
Adaptors" (NeurIPS 2023); reference repository Thartvigsen/GRACE (``grace/editors/grace.py``,
``grace/config/editor/grace.yaml``, ``grace/config/model/gpt2xl.yaml``), whose rules and defaults are
followed; EasyEdit's port (zjunlp/EasyEdit ``easyeditor/models/grace/GRACE.py``,
``hparams/GRACE/*.yaml``) supplies the per-model presets.

The adaptor wraps one module of one block (``module``: a role of the architecture table,
``mlp_in`` or ``mlp_out``; the reference wraps GPT-2 XL's ``transformer.h[35].mlp.c_fc`` — the
``mlp_in`` of block 35 — and EasyEdit GPT-J's ``fc_out`` / Llama's ``down_proj``, the ``mlp_out``).
It holds a codebook of entries (key ``k``: an input of the module; value ``v``: an output of it;
radius ``ε``; label: the edit's target).  For a query ``q`` (the module's input at a position) the
nearest key by Euclidean distance decides: ``‖q − k‖ ≤ ε`` → the module's output there *is* ``v``;
otherwise the module runs unchanged.

One edit (prompt → target), the reference's ``GRACEAdapter.forward`` at iteration 0:

1. the query is the module's input at the last prompt token (the reference's ``key_id``: the number
   of prompt tokens − 1);
2. empty codebook, or the nearest key farther than ``ε_nearest + eps`` → a new entry
   ``(q, v_init, eps, target)``;
3. within, and the nearest entry's label differs → a new entry, and both radii are split: the
   nearest one's to ``d/2 − 1e-5``, the new one's to ``d/2`` (``split_epsilons_in_half``);
4. within, same label → if ``d > ε_nearest`` the radius grows to ``d`` (``eps_expand`` "coverage";
   "moving_average" also moves the key halfway to ``q``), and no entry is added;
5. the chosen entry (the nearest to ``q`` after the update) has its value trained: Adam, lr
   ``edit_lr`` = 1.0, ``n_iter`` = 100 steps, on the teacher-forced NLL of the target after the
   prompt, with the model frozen.  A new value starts ``cold`` (``U[0, 1)``, the reference's
   ``torch.rand``) or ``warm`` (the module's own output at the query).

Inference ("replace_last", EasyEdit's setting): every position is a query of its own, so the
position whose input lies within an entry's radius — the last prompt token of an edited prompt —
gets the value, and nothing else changes.  (The reference knows where the prompt ends from the
labels at training time and reuses that index at inference; an editlab patch sees only the
module's input, hence the per-position test.  With KV-cached generation the reference tests the
newest token at each step, which is the same.)

In editlab terms GRACE is stateful: the codebook (keys, values, radii, labels, record ids, the host
path) is the stream state, plain tensors and lists in :attr:`Edit.state`; every edit returns the
whole codebook as one :class:`GraceAdapter` at the host with ``replace=True``.  The session adds
``adapter(input)`` to the host's output; the adapter returns ``value − host(input)`` at the
positions in range (the host's own forward, without hooks) and zero elsewhere, so the sum is the
value there and bit-identical to the unedited output everywhere else.  Several records in one call
are edited one after the other, each seeing the codebook the previous one left (GRACE's edits are
sequential).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from editlab.data.records import EditRecord
from editlab.errors import require_choice, require_float, require_int
from editlab.methods.base import Edit, EditError, Editor
from editlab.methods.patches import HostReplay, check_records, resolve_layer
from editlab.models.arch import arch_for, get_module, is_encoder_decoder
from editlab.tracing import Trace

log = logging.getLogger(__name__)

__all__ = ["GRACE", "GraceAdapter", "codebook_delta", "empty_codebook", "update_codebook"]

SPLIT_MARGIN = 1e-5  # the reference's split: nearest radius d/2 − 1e-5, new radius d/2


def codebook_delta(x: torch.Tensor, host: nn.Module, keys: torch.Tensor, values: torch.Tensor,
                   radii: torch.Tensor) -> torch.Tensor:
    """What to add to ``host(x)`` so that it becomes the codebook's value wherever the input lies
    in range: ``value − host(x)`` at those positions, exactly zero elsewhere (``[..., d_out]``).

    Each position of ``x`` (``[..., d_in]``) is a query: its nearest key (Euclidean distance, in
    float32) decides, and the position is in range when the distance is at most that key's
    radius.  Differentiable w.r.t. ``values`` (training goes through this function too).
    """
    flat = x.reshape(-1, x.shape[-1])
    dist, nearest = torch.cdist(flat.float(), keys.float()).min(dim=-1)
    hit = (dist <= radii[nearest]).nonzero().flatten()
    d_out = values.shape[-1]
    out = flat.new_zeros(flat.shape[0], d_out)
    if hit.numel():
        base = host.forward(flat[hit])  # the host's own function, without the session's hooks
        out = out.to(base.dtype).index_put((hit,), values[nearest[hit]].to(base.dtype) - base)
    return out.reshape(*x.shape[:-1], d_out)


class GraceAdapter(nn.Module):
    """A GRACE codebook installed beside its host module (see the module docstring).

    ``keys`` ``[K, d_in]``, ``values`` ``[K, d_out]`` and ``radii`` ``[K]`` are float32 buffers;
    ``forward(x)`` is :func:`codebook_delta` with them.  The host is referenced, not registered as
    a submodule (the adapter is itself registered on the host).
    """

    def __init__(self, host: nn.Module, keys: torch.Tensor, values: torch.Tensor,
                 radii: torch.Tensor) -> None:
        super().__init__()
        if keys.dim() != 2 or values.dim() != 2 or radii.dim() != 1 or not (
                keys.shape[0] == values.shape[0] == radii.shape[0] > 0):
            raise ValueError(f"keys [K, d_in], values [K, d_out] and radii [K] expected, K > 0; got "
                             f"{tuple(keys.shape)}, {tuple(values.shape)}, {tuple(radii.shape)}")
        self._host = (host,)  # a tuple: not a submodule (that would make a cycle host → adapter → host)
        for name, t in (("keys", keys), ("values", values), ("radii", radii)):
            self.register_buffer(name, t.detach().to(torch.float32).clone())

    @property
    def num_keys(self) -> int:
        return int(self.keys.shape[0])

    def stream_args(self) -> dict[str, Any]:
        """The constructor's arguments but the host (a stream checkpoint rebuilds the adapter at its
        host's path: :mod:`editlab.lit.stream`)."""
        return {"keys": self.keys.detach(), "values": self.values.detach(), "radii": self.radii.detach()}

    def in_range(self, x: torch.Tensor) -> torch.Tensor:
        """``[...]`` bool: the positions of ``x`` whose nearest key is within its radius."""
        dist, nearest = torch.cdist(x.reshape(-1, x.shape[-1]).float(), self.keys).min(dim=-1)
        return (dist <= self.radii[nearest]).reshape(x.shape[:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return codebook_delta(x, self._host[0], self.keys, self.values, self.radii)

    def extra_repr(self) -> str:
        return f"keys={self.num_keys}, d_in={self.keys.shape[1]}, d_out={self.values.shape[1]}"


def empty_codebook(host_path: str) -> dict[str, Any]:
    """The stream state before the first edit: no entries."""
    return {"host": host_path, "keys": None, "values": None, "radii": None, "labels": [], "ids": []}


def update_codebook(codebook: dict[str, Any], query: torch.Tensor, init_value: torch.Tensor, label: str,
                    record_id: Any, eps: float, eps_expand: str) -> tuple[dict[str, Any], int, str]:
    """The reference's codebook update for one edit (module docstring, steps 2-4), on a copy.

    Args:
        codebook: the state (:func:`empty_codebook` or an earlier result); not modified.
        query: ``[d_in]`` the module's input at the last prompt token.
        init_value: ``[d_out]`` the value of a new entry.
        label: the edit's target (entries conflict when their labels differ).

    Returns:
        ``(new codebook, index of the entry whose value is to be trained, what happened)``, the
        last being ``"add"``, ``"split"``, ``"expand"`` or ``"within"`` (same label, already
        inside the nearest radius: nothing changes but the value's training).
    """
    q = query.detach().to(torch.float32).cpu().reshape(1, -1)
    v = init_value.detach().to(torch.float32).cpu().reshape(1, -1)
    new = dict(codebook, labels=list(codebook["labels"]), ids=list(codebook["ids"]))
    keys = codebook["keys"]
    if keys is None or keys.shape[0] == 0:
        new.update(keys=q.clone(), values=v.clone(), radii=torch.tensor([eps]), labels=[label],
                   ids=[record_id])
        return new, 0, "add"
    keys, values, radii = keys.clone(), codebook["values"].clone(), codebook["radii"].clone()
    dists = torch.cdist(keys, q).flatten()
    d, n = dists.min(dim=0)
    d, n = float(d), int(n)
    action = "within"
    if d > eps + float(radii[n]) or label != new["labels"][n]:
        keys = torch.cat([keys, q])
        values = torch.cat([values, v])
        radii = torch.cat([radii, torch.tensor([eps])])
        new["labels"].append(label)
        new["ids"].append(record_id)
        action = "add"
        if d <= eps + float(radii[n]):  # within reach but another label: split the difference
            radii[n] = d / 2 - SPLIT_MARGIN
            radii[-1] = d / 2
            action = "split"
    elif d > float(radii[n]):
        if eps_expand == "moving_average":
            keys[n] = 0.5 * keys[n] + 0.5 * q[0]
        radii[n] = d
        action = "expand"
    new.update(keys=keys, values=values, radii=radii)
    chosen = int(torch.cdist(keys, q).flatten().argmin())  # the reference picks the nearest after the update
    return new, chosen, action


class GRACE(Editor):
    """GRACE (see the module docstring).

    Args:
        layer: block whose module holds the codebook (negative: from the last).  Reference: 35 of
            GPT-2 XL's 48 (``grace/config/model/gpt2xl.yaml``).
        module: the block's module that is wrapped, a role of the architecture table: ``mlp_in``
            (the reference's GPT-2 XL ``mlp.c_fc``) or ``mlp_out`` (EasyEdit's GPT-J ``fc_out``,
            Llama ``down_proj``).
        eps: the radius of a new entry, also the reach for conflicts (reference ``eps`` 1.0).
        edit_lr: Adam learning rate of the value (reference ``edit_lr`` 1.0).
        n_iter: Adam steps per edit (reference 100; EasyEdit 200 for GPT-2 XL / GPT-J, 50 for Llama).
        value_init: ``cold`` (``U[0, 1)``, the reference's default) or ``warm`` (the module's output
            at the query).
        eps_expand: ``coverage`` (the radius grows to the distance, the reference's default) or
            ``moving_average`` (the key also moves halfway to the query).
        seed: seed of the cold initialisation (drawn per entry: ``seed`` + the entry's index).
    """

    stateful = True

    def __init__(
        self,
        layer: int = 35,
        module: str = "mlp_in",
        eps: float = 1.0,
        edit_lr: float = 1.0,
        n_iter: int = 100,
        value_init: str = "cold",
        eps_expand: str = "coverage",
        seed: int = 0,
    ) -> None:
        self.layer = require_int(layer, "layer")
        self.module = require_choice(module, "module", ("mlp_in", "mlp_out"))
        self.eps = require_float(eps, "eps", gt=0)
        self.edit_lr = require_float(edit_lr, "edit_lr", gt=0)
        self.n_iter = require_int(n_iter, "n_iter", ge=1)
        self.value_init = require_choice(value_init, "value_init", ("cold", "warm"))
        self.eps_expand = require_choice(eps_expand, "eps_expand", ("coverage", "moving_average"))
        self.seed = require_int(seed, "seed")
        self.last_losses: list[list[float]] = []  # per record of the last call (diagnostics only)

    def host_path(self, model: nn.Module) -> str:
        """Dotted path of the module that holds the codebook in ``model``."""
        return arch_for(model).module_path(model, self.module, resolve_layer(model, self.layer, "GRACE"))

    def compute_edit(self, model: nn.Module, tokenizer, records: Sequence[EditRecord],
                     state: dict[str, Any] | None = None) -> Edit:
        check_records(records, "GRACE")
        if is_encoder_decoder(model):
            raise EditError("GRACE: encoder-decoder models are not supported here (the key is the wrapped "
                            "module's input at the last prompt token of a decoder-only model)")
        layer = resolve_layer(model, self.layer, "GRACE")
        path = self.host_path(model)
        host = get_module(model, path)
        codebook = empty_codebook(path) if state is None else state
        if not isinstance(codebook, dict) or codebook.get("host") != path:
            where = codebook.get("host") if isinstance(codebook, dict) else type(codebook).__name__
            raise EditError(f"GRACE: the stream's codebook is at {where!r}, this editor edits {path!r}")
        self.last_losses = []
        for record in records:
            codebook = self._edit_one(model, tokenizer, record, layer, path, host, codebook)
        device = next(model.parameters()).device
        adapter = GraceAdapter(host, codebook["keys"], codebook["values"], codebook["radii"]).to(device)
        if not all(torch.isfinite(t).all() for t in adapter.buffers()):
            raise EditError(f"GRACE: non-finite codebook after records {[r.record_id for r in records]}")
        return Edit(patches={path: adapter}, replace=True, state=codebook)

    def _edit_one(self, model: nn.Module, tokenizer, record: EditRecord, layer: int, path: str,
                  host: nn.Module, codebook: dict[str, Any]) -> dict[str, Any]:
        replay = HostReplay(model, tokenizer, [record], layer, "GRACE")
        last = int(replay.batch.prompt_lengths[0]) - 1
        with torch.no_grad(), Trace(model, [path], retain_input=True, retain_output=True, stop=True) as trace:
            model(**replay.batch.model_inputs(), use_cache=False)
        query = trace.inputs[path][0, last].float()
        if not torch.isfinite(query).all():
            raise EditError(f"GRACE: record {record.record_id!r}: non-finite input of {path!r}")
        index = 0 if codebook["keys"] is None else int(codebook["keys"].shape[0])
        if self.value_init == "cold":
            generator = torch.Generator().manual_seed(self.seed + index)
            d_out = trace.outputs[path].shape[-1]
            init = torch.rand(d_out, generator=generator)
        else:
            with torch.no_grad():
                init = host.forward(trace.inputs[path][0, last]).float()
        codebook, chosen, action = update_codebook(codebook, query, init, record.target_new.strip(),
                                                   record.record_id, self.eps, self.eps_expand)
        log.debug("GRACE: record %r: %s (entry %d of %d)", record.record_id, action, chosen,
                  codebook["keys"].shape[0])

        device = query.device
        keys, radii = codebook["keys"].to(device), codebook["radii"].to(device)
        others = codebook["values"].to(device)
        value = others[chosen].clone().requires_grad_(True)
        row = torch.zeros(others.shape[0], 1, dtype=torch.bool, device=device)
        row[chosen] = True
        opt = torch.optim.Adam([value], lr=self.edit_lr)
        losses: list[float] = []

        def output(module: nn.Module, args: tuple, out: Any) -> torch.Tensor:
            # the host's output as it will be once this codebook replaces the installed one
            values = torch.where(row, value, others)
            return module.forward(args[0]) + codebook_delta(args[0], module, keys, values, radii)

        handle = host.register_forward_hook(output)
        try:
            with torch.enable_grad():
                for _ in range(self.n_iter):
                    loss = replay.nll(replay.hidden(None))
                    if not torch.isfinite(loss):
                        raise EditError(f"GRACE: record {record.record_id!r}: loss became {loss.item()}")
                    losses.append(loss.item())
                    (grad,) = torch.autograd.grad(loss, [value], allow_unused=True)
                    if grad is None:  # the query is out of every radius (a split at distance 0)
                        break
                    value.grad = grad
                    opt.step()
                    opt.zero_grad(set_to_none=True)
        finally:
            handle.remove()
        self.last_losses.append(losses)
        values = codebook["values"].clone()
        values[chosen] = value.detach().to(values.device)
        return dict(codebook, values=values)
