"""UltraEdit: training-, subject- and memory-free lifelong editing by closed-form least squares.

Gu, Chen, Li, Zhang, Hu, Chen, Chen and Wang 2025, "UltraEdit: Training-, Subject-, and
Memory-Free Lifelong Editing in Large Language Models"; reference repository XiaojieGu/UltraEdit
(files and lines below are of its commit 0beb222).  Defaults follow that repository.

Per batch ("turn") of edits, for each edited linear module ``W`` (several MLP projections of the
upper blocks, ``config/model/*.yaml`` ``edit_modules``):

1. **features** from one forward and backward over the batch's edit pairs (prompt + new target,
   teacher-forced): the module's inputs ``k`` ("keys") and the gradient ``g = ∂L/∂y`` of the edit
   loss with respect to its outputs, at every position that predicts a target token
   (``util.py`` ``Tracer`` l. 154/161 with the answer mask of ``TracerDict`` l. 193-194,
   ``token: ans`` in ``config/editor/ultraedit.yaml`` l. 4).  The loss is the mean cross-entropy
   over the target tokens of each chunk of ``chunk_size`` records (the reference runs one forward
   and backward per chunk, ``editor/ultraedit.py`` l. 103-114, ``util.py`` l. 51-56); here
   records are grouped by length into micro-batches (less padding) and the loss of each is its
   records' terms of the sum of the chunk means, which gives each chunk exactly its own gradient.
2. **lifelong normalisation**: running count, mean and variance of ``z = [k, g]`` over every
   feature row of the stream so far, this batch included (the statistics are updated before they
   are used: ``editor/base.py`` l. 165-166, ``editor/ultraedit.py`` l. 120), shared by all edited
   modules of the same shape (``editor/ultraedit.py`` l. 53-58, 67: a Llama's ``gate_proj`` and
   ``up_proj`` share one); ``ẑ = (z − mean) / (std + ε)`` with ``std = sqrt(M2 / (n − 1 + ε))``,
   ε the float32 machine epsilon (``nets.py`` ``RunningMeanStd`` l. 16-30).
3. **values**: ``v = −lr · ‖k̂‖² · ĝ`` per row (``editor/ultraedit.py`` l. 86-90).
4. **closed-form update** of the ``(in, out)``-shaped weight: the ridge regression of the values
   on the *raw* keys, ``ΔW = (KᵀK + λI)⁻¹ Kᵀ V`` (l. 92-94, where λ = 1); computed in float64,
   through the equal form ``Kᵀ (KKᵀ + λI)⁻¹ V`` when there are fewer rows than input features.

The stream state (:attr:`Editor.stateful`) is the normalisation statistics per module shape:
``{"stats": {"<in>x<out>": {"count": int, "mean": [in+out], "m2": [in+out]}}}`` (float64, CPU),
returned in :attr:`Edit.state`; its size does not depend on the number of edits, and nothing else
is kept (no keys, no edit memory).  The state is never changed in place.

Differences from the reference (docs/methods/ultraedit.md):

* The statistics are pooled exactly (Chan et al.'s parallel update of the sum of squared
  deviations ``M2``); ``RunningMeanStd.update`` (``nets.py`` l. 22) adds ``b · var_unbiased``
  of a batch of ``b`` rows, i.e. ``b/(b−1)`` times its ``M2``, which is not the pooled value (and
  NaN for a single row).  Kept in float64 (float32 in the reference) for 10,000-edit streams.
* Chunks are consecutive records in the given order; the reference's loader sorts each turn by
  length before chunking (``data/base.py`` l. 43-50).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from editlab.data.collate import encode_pairs
from editlab.data.records import EditRecord
from editlab.errors import require, require_float, require_int, require_ints
from editlab.methods.base import Edit, EditError, Editor
from editlab.models.arch import arch_for, get_module, is_encoder_decoder
from editlab.scoring import head_nll
from editlab.tracing import CallRecorder, GradientFactors

__all__ = ["UltraEdit", "merge_moments", "normalise", "ridge_update"]

ROLES = ("mlp_gate", "mlp_in", "mlp_out")  # architecture-table roles, in the order modules are listed
EPS = torch.finfo(torch.float32).eps  # nets.py l. 23, 30 (the features are float32 there)


def merge_moments(stats: Mapping[str, Any] | None, rows: torch.Tensor) -> dict[str, Any]:
    """The statistics (``count``, ``mean``, ``m2`` = sum of squared deviations) of the rows seen
    so far (``stats``; None: none) and ``rows`` ``[b, d]`` pooled, exactly; new tensors (float64),
    ``stats`` is left as it was."""
    x = rows.to(torch.float64)
    b = x.shape[0]
    mean_b = x.mean(0)
    m2_b = (x - mean_b).pow(2).sum(0)
    if stats is None:
        return {"count": b, "mean": mean_b, "m2": m2_b}
    n_a = int(stats["count"])
    n = n_a + b
    mean_a = stats["mean"].to(x.device, torch.float64)
    delta = mean_b - mean_a
    return {
        "count": n,
        "mean": mean_a + delta * (b / n),
        "m2": stats["m2"].to(x.device, torch.float64) + m2_b + delta.pow(2) * (n_a * b / n),
    }


def normalise(stats: Mapping[str, Any], rows: torch.Tensor) -> torch.Tensor:
    """``(rows − mean) / (std + ε)`` with ``std = sqrt(M2 / (n − 1 + ε))`` (``nets.py`` l. 23, 30)."""
    mean = stats["mean"].to(rows.device, rows.dtype)
    std = (stats["m2"].to(rows.device, rows.dtype) / (int(stats["count"]) - 1 + EPS)).sqrt()
    return (rows - mean) / (std + EPS)


def ridge_update(keys: torch.Tensor, values: torch.Tensor, lam: float) -> torch.Tensor:
    """``(KᵀK + λI)⁻¹ Kᵀ V`` for keys ``K`` ``[n, in]`` and values ``V`` ``[n, out]``: the
    ``(in, out)`` matrix ``ΔW`` minimising ``‖K ΔW − V‖² + λ‖ΔW‖²``; float64.  With ``n < in`` it
    is computed as ``Kᵀ (KKᵀ + λI)⁻¹ V`` (the same matrix, an ``n × n`` system)."""
    k, v = keys.to(torch.float64), values.to(torch.float64)
    n, d = k.shape
    if n < d:
        a = k @ k.T
        a.diagonal().add_(lam)
        return k.T @ _spd_solve(a, v)
    a = k.T @ k
    a.diagonal().add_(lam)
    return _spd_solve(a, k.T @ v)


def _spd_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(b, chol)
    return torch.linalg.solve(a, b)


@contextlib.contextmanager
def _gradient_from(block: nn.Module) -> Iterator[None]:
    """Inside the block, ``block``'s hidden-state input is cut from the graph below and requires
    grad: everything from there on is differentiable (whatever the ``requires_grad`` flags of the
    weights), and no backward reaches the blocks below."""

    def hook(module, args, kwargs):
        if args and isinstance(args[0], torch.Tensor):
            return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
        if isinstance(kwargs.get("hidden_states"), torch.Tensor):
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach().requires_grad_(True)}
        raise EditError(f"UltraEdit: block {type(module).__name__} got no hidden-state tensor")

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _shape_key(module: nn.Module, transposed: bool) -> str:
    w = module.weight
    d_in, d_out = (w.shape[0], w.shape[1]) if transposed else (w.shape[1], w.shape[0])
    return f"{d_in}x{d_out}"


class UltraEdit(Editor):
    """UltraEdit (see the module docstring): lifelong editing by closed-form least squares on
    normalised key / gradient features, with running normalisation statistics as stream state.

    Args:
        mlp_gate_layers: blocks whose MLP gate projection is edited (Llama ``gate_proj``).
        mlp_in_layers: blocks whose MLP input (up) projection is edited (Llama ``up_proj``,
            GPT-J ``fc_in``).
        mlp_out_layers: blocks whose MLP output (down) projection is edited (Llama ``down_proj``,
            GPT-J ``fc_out``).  The three lists together name the reference's ``edit_modules``.
        lr: scale of the values, ``v = −lr ‖k̂‖² ĝ`` (``config/editor/ultraedit.yaml`` l. 2).
        lam: ridge regulariser λ of ``(KᵀK + λI)⁻¹ KᵀV`` (the identity of
            ``editor/ultraedit.py`` l. 92: λ = 1).
        chunk_size: records per forward/backward chunk whose mean target cross-entropy is the edit
            loss (``config/dataset/*.yaml`` ``batch_size: 10``); it sets the gradients' scale.
        micro_batch: records per forward and backward, grouped by length (compute only: the
            features are the same for any value).
    """

    stateful = True

    def __init__(
        self,
        mlp_gate_layers: Sequence[int] = (11, 12, 13, 14, 15),
        mlp_in_layers: Sequence[int] = (18, 19, 20, 21, 22, 23, 24),
        mlp_out_layers: Sequence[int] = (),
        lr: float = 1e-6,
        lam: float = 1.0,
        chunk_size: int = 10,
        micro_batch: int = 32,
    ) -> None:
        self.mlp_gate_layers = sorted(require_ints(mlp_gate_layers, "mlp_gate_layers", ge=0, empty=True, unique=True))
        self.mlp_in_layers = sorted(require_ints(mlp_in_layers, "mlp_in_layers", ge=0, empty=True, unique=True))
        self.mlp_out_layers = sorted(require_ints(mlp_out_layers, "mlp_out_layers", ge=0, empty=True, unique=True))
        require(bool(self.mlp_gate_layers or self.mlp_in_layers or self.mlp_out_layers), "mlp_out_layers",
                "must name at least one block when mlp_gate_layers and mlp_in_layers are empty",
                list(mlp_out_layers))
        self.lr = require_float(lr, "lr", gt=0)
        self.lam = require_float(lam, "lam", gt=0)
        self.chunk_size = require_int(chunk_size, "chunk_size", ge=1)
        self.micro_batch = require_int(micro_batch, "micro_batch", ge=1)

    # ------------------------------------------------------------------ modules
    def module_paths(self, model: nn.Module) -> list[str]:
        """Dotted paths of the edited modules of ``model``, gate, then up, then down projections."""
        arch = arch_for(model)
        n_layers = arch.num_layers(model)
        paths = []
        for role, layers in zip(ROLES, (self.mlp_gate_layers, self.mlp_in_layers, self.mlp_out_layers)):
            for layer in layers:
                if layer >= n_layers:
                    raise EditError(f"UltraEdit: block {layer} ({role}) out of range: the model has {n_layers} blocks")
                try:
                    paths.append(arch.module_path(model, role, layer))
                except KeyError as err:  # UnknownArchitecture: e.g. no gate projection in GPT-J
                    raise EditError(f"UltraEdit: {err.args[0]}") from err
        return paths

    # ----------------------------------------------------------------- features
    def features(self, model: nn.Module, tokenizer, records: Sequence[EditRecord]
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per edited module, the keys ``[n, in]`` and output gradients ``[n, out]`` (float32) at
        the ``n`` positions of ``records`` that predict a target token, row-major by record.

        The forward and backward run in micro-batches of :attr:`micro_batch` records of similar
        length (padding is most of a CounterFact batch's tokens otherwise); every record's loss
        term is its target cross-entropy over its chunk's target-token count, counted over the
        whole batch first, so the features are those of one pass over all records."""
        records = list(records)
        if not records:
            raise EditError("UltraEdit got no records")
        arch = arch_for(model)
        paths = self.module_paths(model)
        layers = self.mlp_gate_layers + self.mlp_in_layers + self.mlp_out_layers
        device = next(model.parameters()).device
        order = sorted(range(len(records)), key=lambda i: len(records[i].prompt) + len(records[i].target_new))
        groups = [order[lo:lo + self.micro_batch] for lo in range(0, len(order), self.micro_batch)]
        batches = [encode_pairs(tokenizer, [records[i].prompt for i in group], [records[i].target_new for i in group],
                                seq2seq=is_encoder_decoder(model),
                                decoder_start_token_id=getattr(model.config, "decoder_start_token_id", None))
                   for group in groups]
        chunk_of = torch.tensor([i // self.chunk_size for i in range(len(records))])
        tokens = torch.zeros(int(chunk_of[-1]) + 1, dtype=torch.float64)  # target tokens per chunk
        for group, batch in zip(groups, batches):
            tokens.index_add_(0, chunk_of[group], batch.target_mask.sum(1).to(torch.float64))
        first = get_module(model, arch.layer_path(min(layers)))
        per_record: dict[str, list[tuple[torch.Tensor, torch.Tensor] | None]] = {p: [None] * len(records) for p in paths}
        for group, batch in zip(groups, batches):
            batch = batch.to(device)
            rows, pos = batch.gather_index()
            targets = batch.target_ids[batch.target_mask]
            with torch.enable_grad(), _gradient_from(first), GradientFactors(model, paths) as capture:
                with CallRecorder(model, [], stop_at=arch.lm_head) as head:
                    model(**batch.model_inputs(), use_cache=False)
                if head.stopped_input is None:
                    raise EditError("UltraEdit: the forward never reached the LM head")
                nll = head_nll(model, head.stopped_input[rows, pos], targets)
                chunk = chunk_of[group].to(device)[rows]
                # Σ over chunks of each chunk's mean cross-entropy, this micro-batch's terms of it
                loss = (nll / tokens.to(device, nll.dtype)[chunk]).sum()
                if not torch.isfinite(loss):
                    raise EditError(f"UltraEdit: the edit loss is {loss.item()} on records "
                                    f"{[records[i].record_id for i in group][:5]}")
                outputs = capture.grad_targets()
                if not outputs:
                    raise EditError(f"UltraEdit: none of the modules {paths} ran in the forward")
                torch.autograd.grad(loss, outputs, allow_unused=True)
            for path in paths:
                xs, gs = capture.inputs[path], capture.grads[path]
                if len(xs) != 1 or gs[0] is None:
                    raise EditError(f"UltraEdit: module {path!r} ran {len(xs)} times in the forward or got no "
                                    "gradient; it must run once, in the path to the LM head")
                x, g = xs[0][rows, pos].float(), gs[0][rows, pos].float()
                for j, i in enumerate(group):
                    mine = rows == j
                    per_record[path][i] = (x[mine], g[mine])
        return {path: (torch.cat([kg[0] for kg in found]), torch.cat([kg[1] for kg in found]))
                for path, found in per_record.items()}

    # ------------------------------------------------------------------- edit
    def compute_edit(self, model: nn.Module, tokenizer, records: Sequence[EditRecord], state: Any = None) -> Edit:
        arch = arch_for(model)
        feats = self.features(model, tokenizer, records)
        groups: dict[str, list[str]] = {}
        for path in feats:
            groups.setdefault(_shape_key(get_module(model, path), arch.transposed), []).append(path)
        old = self._stats_of(state, groups)
        work = torch.float32 if next(model.parameters()).device.type == "mps" else torch.float64
        stats, deltas = {}, {}
        for key, paths in groups.items():
            # one update with every row of the group: exact pooling makes it the same as one per module
            rows = torch.cat([torch.cat(feats[p], dim=-1) for p in paths]).to(work)
            new = merge_moments(old.get(key), rows)
            stats[key] = {"count": new["count"], "mean": new["mean"].cpu(), "m2": new["m2"].cpu()}
            for path in paths:
                keys, grads = feats[path]
                d_in = keys.shape[-1]
                z = normalise(new, torch.cat([keys, grads], dim=-1).to(work))
                keys_hat, grads_hat = z[:, :d_in], z[:, d_in:]
                values = -self.lr * keys_hat.pow(2).sum(-1, keepdim=True) * grads_hat
                update = ridge_update(keys.to(work), values, self.lam)  # (in, out)
                if not torch.isfinite(update).all():
                    raise EditError(f"UltraEdit: the update of {path!r} is not finite")
                deltas[f"{path}.weight"] = arch.delta_to_param(update.T).float()
        return Edit(deltas=deltas, state={"stats": stats})

    @staticmethod
    def _stats_of(state: Any, groups: Mapping[str, Any]) -> dict[str, Any]:
        if state is None:
            return {}
        stats = state.get("stats") if isinstance(state, Mapping) else None
        if not isinstance(stats, Mapping) or set(stats) != set(groups):
            have = sorted(stats) if isinstance(stats, Mapping) else type(state).__name__
            raise EditError(f"UltraEdit: the stream state holds statistics for module shapes {have}, "
                            f"these edited modules have shapes {sorted(groups)}: it comes from another editor")
        return dict(stats)
