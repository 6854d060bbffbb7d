"""MEND: Model Editor Networks with Gradient Decomposition.

Mitchell, Lin, Bosselut, Finn, Manning 2022, "Fast Model Editing at Scale" (ICLR 2022); reference
repository eric-mitchell/mend (``algs/mend.py``, ``nn.py``, ``hooks.py``), ported to EasyEdit
(``easyeditor/trainer/algs/MEND.py``, ``local_nn.py``; defaults in
``hparams/TRAINING/MEND/gpt-j-6B.yaml``).

For a linear layer ``y = W x`` the gradient of a loss is a sum of rank-one terms,
``∇_W L = Σ_t δ_t x_tᵀ`` with ``x_t`` the layer input and ``δ_t = ∂L/∂y_t`` at position ``t``.
MEND edits with a learned transform of these factors:

1. capture ``(x_t, δ_t)`` of every edited weight for the edit loss (teacher-forced NLL of the new
   target, :func:`~editlab.methods.hyper.target_nll`) with :class:`~editlab.tracing.GradientFactors`;
   rows where ``x_t`` or ``δ_t`` is all zero (padding, positions after the last target) are
   dropped, as the reference's ``nz_mask`` does;
2. normalise ``x`` and ``δ`` with running statistics (mean and unbiased variance, Welford's
   update, refreshed on every training call, frozen in eval);
3. transform ``[x; δ]`` jointly (``combine``) with an identity-initialised low-rank MLP (IDMLP:
   ``n_hidden + 1`` layers ``h + act(u v h + b)``, ``u = 0`` at init, so the transform starts as
   the identity), shared by the edited weights of one shape (``shared``) and told apart by a learned
   per-parameter scale/shift (the "mode" embedding);
4. form the pseudo-gradient ``∇̃W = Σ_t δ̃_t x̃_tᵀ`` (``Σ_t x̃_t δ̃_tᵀ`` for GPT-2's ``Conv1D``, whose
   weight is stored ``(in, out)``; the architecture table's ``transposed`` flag) and return
   ``W̃ = W − α_l ∇̃W`` with a learned step ``α_l`` per edited parameter (initialised to
   ``edit_lr``, trained with its own learning rate ``lr_lr``).

Training minimises :meth:`~editlab.methods.hyper.TrainableEditor.training_losses` (MEND's
``c_edit · NLL(rephrase; W̃) + c_loc · KL(pre ‖ post)`` on locality inputs).

Deviations from the reference, each deliberate:

* the update is ``W − α ∇̃W`` as in the paper (eq. 4); the reference code adds ``+ α ∇̃W``.  With
  learned, signed ``α`` and transform both parametrisations reach the same edits; with ours the
  identity transform (norm off) is a plain gradient-descent step on the edit loss.
* the edit loss averages token NLLs per edit, then over edits (editlab's ``target_nll``); the
  reference averages over all target tokens of the batch.  Identical for single edits.
* the normalisation statistics are updated with the batched (Chan et al.) form of Welford's
  update rather than row by row — the same numbers up to rounding; before any training call the
  statistics are empty and an edit with ``norm=True`` raises :class:`EditError` (the reference
  would produce NaN).
* the edited model is run with :func:`torch.func.functional_call` instead of ``higher``, and the
  factors are captured inside a context manager instead of by hooks left on the model.
* the reference keeps the activation flag of IDMLP unused (every layer is ``clamp(min=0)``); here
  ``act="relu"`` is that clamp (gradient 1 at 0, so ``u = 0`` still learns), ``act="linear"`` drops it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from editlab.data.collate import PairBatch
from editlab.errors import SettingError, require, require_bool, require_choice, require_float, require_int
from editlab.methods.base import EditError
from editlab.methods.hyper import TrainableEditor, edit_gradient_factors
from editlab.models.arch import UnknownArchitecture, arch_for, get_module

__all__ = ["MEND"]

INITS = ("id", "xavier")
ACTS = ("relu", "linear")


class _LowRankLayer(nn.Module):
    """One IDMLP layer: ``h + act((u v h + b) · scale[mode] + shift[mode])`` (``init="id"``: u = 0,
    so the layer is the identity at init) or, with ``init="xavier"``, ``act(...)`` without the
    residual (the reference's ``LRLinear``).  ``mode_after_act``: ``h + act(u v h + b) ·
    scale[mode] + shift[mode]`` instead (MALMEN's and RLEdit's block)."""

    def __init__(self, dim: int, rank: int, init: str, act: str, n_modes: int | None,
                 mode_after_act: bool = False) -> None:
        super().__init__()
        mid = min(rank, dim)
        if init == "id":
            self.u = nn.Parameter(torch.zeros(dim, mid))
            self.v = nn.Parameter(torch.randn(mid, dim))
        else:
            self.u = nn.Parameter(torch.empty(dim, mid))
            self.v = nn.Parameter(torch.empty(mid, dim))
            nn.init.xavier_uniform_(self.u, gain=nn.init.calculate_gain("relu"))
            nn.init.xavier_uniform_(self.v, gain=1.0)
        self.bias = nn.Parameter(torch.zeros(dim))
        if n_modes is not None:
            self.mode_scale = nn.Parameter(torch.ones(n_modes, dim))
            self.mode_shift = nn.Parameter(torch.zeros(n_modes, dim))
        self.n_modes = n_modes
        self.residual = init == "id"
        self.act = act
        self.mode_after_act = mode_after_act

    def forward(self, h: torch.Tensor, mode: int | None) -> torch.Tensor:
        pre = (h @ self.v.t()) @ self.u.t() + self.bias
        if mode is not None and not self.mode_after_act:
            pre = pre * self.mode_scale[mode] + self.mode_shift[mode]
        out = pre.clamp(min=0) if self.act == "relu" else pre
        if mode is not None and self.mode_after_act:
            out = out * self.mode_scale[mode] + self.mode_shift[mode]
        return h + out if self.residual else out


class _IDMLP(nn.Module):
    """``n_hidden + 1`` low-rank layers of width ``dim`` (the reference's ``IDMLP``)."""

    def __init__(self, dim: int, rank: int, n_hidden: int, init: str, act: str, n_modes: int | None,
                 mode_after_act: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_LowRankLayer(dim, rank, init, act, n_modes, mode_after_act)
                                    for _ in range(n_hidden + 1))

    def forward(self, h: torch.Tensor, mode: int | None = None) -> torch.Tensor:
        for layer in self.layers:
            h = layer(h, mode)
        return h


class _GradientTransform(nn.Module):
    """Normalise ``(x, δ)`` with running statistics and transform them (the reference's
    ``GradientTransform``).  ``n_modes``: number of parameters sharing this transform;
    ``mode_after_act``: where the layers apply the per-parameter scale/shift (:class:`_LowRankLayer`);
    ``owner``: the editor named in errors."""

    def __init__(self, x_dim: int, delta_dim: int, *, rank: int, n_hidden: int, init: str, act: str,
                 norm: bool, combine: bool, one_sided: bool, x_only: bool, delta_only: bool,
                 n_modes: int | None, mode_after_act: bool = False, owner: str = "MEND") -> None:
        super().__init__()
        self.owner = owner  # the editor named in errors
        self.x_dim, self.delta_dim = x_dim, delta_dim
        self.norm = norm
        self.combine = combine
        for side, dim in (("x", x_dim), ("delta", delta_dim)):
            self.register_buffer(f"{side}_mean", torch.zeros(dim))
            self.register_buffer(f"{side}_m2", torch.zeros(dim))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

        def net(dim: int) -> _IDMLP:
            return _IDMLP(dim, rank, n_hidden, init, act, n_modes, mode_after_act)

        self.mlp = self.x_mlp = self.delta_mlp = None
        if combine:
            self.mlp = net(x_dim + delta_dim)
        else:
            transform_x = not delta_only and not (one_sided and x_dim > delta_dim)
            transform_delta = not x_only and not (one_sided and x_dim <= delta_dim)
            self.x_mlp = net(x_dim) if transform_x else None
            self.delta_mlp = net(delta_dim) if transform_delta else None

    @torch.no_grad()
    def _update_statistics(self, x: torch.Tensor, delta: torch.Tensor) -> None:
        n_new = x.shape[0]
        if n_new == 0:
            return
        n_old = int(self.count)
        n = n_old + n_new
        for side, rows in (("x", x), ("delta", delta)):
            mean_new = rows.mean(0)
            m2_new = ((rows - mean_new) ** 2).sum(0)
            if n_old == 0:
                mean, m2 = mean_new, m2_new
            else:
                mean_old, m2_old = getattr(self, f"{side}_mean"), getattr(self, f"{side}_m2")
                diff = mean_new - mean_old
                mean = mean_old + diff * (n_new / n)
                m2 = m2_old + m2_new + diff**2 * (n_old * n_new / n)
            # in place (buffers keep their identity, e.g. for DDP's buffer broadcast); no graph
            # holds them: _normalise only saves tensors derived from them
            getattr(self, f"{side}_mean").copy_(mean)
            getattr(self, f"{side}_m2").copy_(m2)
        self.count.fill_(n)

    def _normalise(self, rows: torch.Tensor, side: str) -> torch.Tensor:
        count = int(self.count)
        if count < 2:
            raise EditError(
                f"{self.owner}: the normalisation statistics hold {count} sample(s); train the editor (or load "
                "a trained one) before editing, or set norm=False"
            )
        std = (getattr(self, f"{side}_m2") / (count - 1)).sqrt()
        return (rows - getattr(self, f"{side}_mean")) / (std + 1e-7)

    def forward(self, x: torch.Tensor, delta: torch.Tensor, mode: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        x, delta = x.float(), delta.float()
        if self.training:
            self._update_statistics(x, delta)
        if self.norm:
            x, delta = self._normalise(x, "x"), self._normalise(delta, "delta")
        if self.mlp is not None:
            out = self.mlp(torch.cat([x, delta], dim=-1), mode)
            return out[:, : self.x_dim], out[:, self.x_dim :]
        x_out = self.x_mlp(x, mode) if self.x_mlp is not None else x
        delta_out = self.delta_mlp(delta, mode) if self.delta_mlp is not None else delta
        return x_out, delta_out


def weight_layout(model: nn.Module, spec, name: str, param: torch.Tensor, owner: str
                  ) -> tuple[bool, tuple[int, int]]:
    """Whether the 2-D weight ``name`` of a linear-like module is stored transposed (GPT-2's
    ``Conv1D``: ``(in, out)``; architecture table ``spec``) and its ``(x_dim, delta_dim)``
    (input, output widths).  Anything else raises :class:`EditError` naming ``owner``."""
    path, _, leaf = name.rpartition(".")
    module = get_module(model, path)
    if isinstance(module, nn.Linear):
        transposed = False
    elif spec.transposed and isinstance(module, Conv1D):
        transposed = True  # GPT-2's Conv1D stores (in, out)
    else:
        raise EditError(f"{owner} edits weights of linear layers; {name!r} belongs to a "
                        f"{type(module).__name__}")
    if leaf != "weight" or param.dim() != 2:
        raise EditError(f"{owner} edits 2-D weights of linear layers; {name!r} is not one "
                        f"(shape {tuple(param.shape)})")
    rows, cols = param.shape
    return transposed, ((rows, cols) if transposed else (cols, rows))


class MEND(TrainableEditor):
    """MEND's gradient-transform editor (see the module docstring).

    Args:
        edit_params: base-model weights to edit (2-D weights of linear-like modules: ``nn.Linear``
            or GPT-2 ``Conv1D``); None: the MLP input and output weights of the last three blocks
            from the architecture table (MEND's GPT-J/GPT-2 setting; Llama-type models: ``up_proj``
            and ``down_proj``).
        rank: rank of each IDMLP layer (``min(rank, width)``); MEND 1920.
        n_hidden: hidden layers of the IDMLP (it has ``n_hidden + 1`` layers); MEND 1.
        init: ``id`` (identity init, MEND) or ``xavier``.
        act: ``relu`` (MEND's ``clamp(min=0)``) or ``linear``.
        norm: normalise ``x`` and ``δ`` with running statistics; MEND True.
        combine: transform ``[x; δ]`` with one network; MEND True.
        shared: one transform per weight shape, with a per-parameter mode embedding; MEND True.
        one_sided, x_only, delta_only: transform only one factor (the smaller one / ``x`` / ``δ``);
            need ``combine=False``.  MEND False.
        edit_lr: initial per-parameter edit step ``α_l``; MEND 1e-4.
        lr_lr: learning rate of the ``α_l`` (see :meth:`optimizer_groups`); MEND 1e-4.
        c_edit, c_loc: weights of the edit and locality losses; MEND 0.1 and 1.0.
        edit_outer: inputs of the edit loss after the edit: ``rephrase`` (MEND's default),
            ``prompt`` (the edit input; MEND ``data.rephrase: false``) or ``both`` (their mean).
        loc_positions: positions of the locality input the KL is averaged over: ``all`` (MEND)
            or ``answer`` (those that predict its answer, where locality is measured).
        batch_edits: records of a training batch edited together (``joint``, MEND) or each on
            its own in one batched pass (``independent``: :meth:`row_deltas`).
        base_model: name of the base model the editor is trained for (kept in checkpoints).
    """

    def __init__(
        self,
        edit_params: Sequence[str] | None = None,
        rank: int = 1920,
        n_hidden: int = 1,
        init: str = "id",
        act: str = "relu",
        norm: bool = True,
        combine: bool = True,
        shared: bool = True,
        one_sided: bool = False,
        x_only: bool = False,
        delta_only: bool = False,
        edit_lr: float = 1e-4,
        lr_lr: float = 1e-4,
        c_edit: float = 0.1,
        c_loc: float = 1.0,
        edit_outer: str = "rephrase",
        loc_positions: str = "all",
        batch_edits: str = "joint",
        base_model: str | None = None,
    ) -> None:
        super().__init__(edit_params, c_edit=c_edit, c_loc=c_loc, edit_outer=edit_outer,
                         base_model=base_model, loc_positions=loc_positions, batch_edits=batch_edits)
        self.rank = require_int(rank, "rank", ge=1)
        self.n_hidden = require_int(n_hidden, "n_hidden", ge=0)
        self.init = require_choice(init, "init", INITS)
        self.act = require_choice(act, "act", ACTS)
        self.norm = require_bool(norm, "norm")
        self.combine = require_bool(combine, "combine")
        self.shared = require_bool(shared, "shared")
        self.one_sided = require_bool(one_sided, "one_sided")
        self.x_only = require_bool(x_only, "x_only")
        self.delta_only = require_bool(delta_only, "delta_only")
        chosen = [name for name in ("one_sided", "x_only", "delta_only") if getattr(self, name)]
        for name in chosen:
            require(not combine, name, "needs combine=false (combine transforms both factors together)", True)
        if len(chosen) > 1:
            raise SettingError(chosen[1], f"cannot be used with {chosen[0]}: choose at most one", True)
        self.edit_lr = require_float(edit_lr, "edit_lr", gt=0)
        self.lr_lr = require_float(lr_lr, "lr_lr", ge=0)
        self.transforms = nn.ModuleDict()
        self._route: dict[str, tuple[str, int | None]] = {}
        self._transposed: dict[str, bool] = {}

    # ---------------------------------------------------------------- setup
    def build(self, model: nn.Module, params: dict[str, nn.Parameter]) -> None:
        try:
            spec = arch_for(model)
        except UnknownArchitecture as err:
            raise EditError(f"MEND: {err}") from err
        shapes: dict[str, tuple[int, int]] = {}
        for name, param in params.items():
            self._transposed[name], shapes[name] = weight_layout(model, spec, name, param, "MEND")
        groups: dict[str, list[str]] = {}
        for name, (x_dim, delta_dim) in shapes.items():
            key = f"{x_dim}x{delta_dim}" if self.shared else name.replace(".", "#")
            groups.setdefault(key, []).append(name)
        for key, names in groups.items():
            x_dim, delta_dim = shapes[names[0]]
            self.transforms[key] = _GradientTransform(
                x_dim, delta_dim, rank=self.rank, n_hidden=self.n_hidden, init=self.init, act=self.act,
                norm=self.norm, combine=self.combine, one_sided=self.one_sided, x_only=self.x_only,
                delta_only=self.delta_only, n_modes=len(names) if self.shared else None,
            )
            for mode, name in enumerate(names):
                self._route[name] = (key, mode if self.shared else None)
        self.edit_lrs = nn.Parameter(torch.full((len(params),), float(self.edit_lr)))
        self.to(next(iter(params.values())).device)

    # ---------------------------------------------------------------- editing
    def gradient_factors(self, model: nn.Module, batch: PairBatch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per edited parameter, the rank-one factors ``(x [n, in], δ [n, out])`` of the edit
        loss's gradient on the unedited model, over every position where both are non-zero
        (detached, float32).  ``Σ_t δ_t x_tᵀ`` is the exact gradient ``∂L/∂W``."""
        return {name: (x, delta) for name, (x, delta, _) in self._factors(model, batch).items()}

    def _factors(self, model: nn.Module, batch: PairBatch
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """:meth:`gradient_factors` with, third, the batch row each factor comes from."""
        self._check_bound()
        return edit_gradient_factors(model, self.edit_params, batch, owner="MEND")

    def _combine(self, name: str, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``Σ_t δ_t x_tᵀ`` in the layout of parameter ``name``."""
        return x.t() @ delta if self._transposed[name] else delta.t() @ x

    def pseudo_gradients(self, model: nn.Module, batch: PairBatch) -> dict[str, torch.Tensor]:
        """The transformed gradients ``∇̃W`` (parameter layout, float32), differentiable w.r.t.
        the editor.  In training mode this updates the normalisation statistics."""
        factors = self.gradient_factors(model, batch)
        out = {}
        for name in self.edit_params:
            key, mode = self._route[name]
            x, delta = factors[name]
            x_t, delta_t = self.transforms[key](x, delta, mode)
            out[name] = self._combine(name, x_t, delta_t)
        return out

    def row_deltas(self, model: nn.Module, batch: PairBatch) -> dict[str, torch.Tensor]:
        """Each row's own update ``−α_l ∇̃W`` (``[len(batch), *shape]``, float32) from one
        forward and backward of the whole batch.  The edit loss averages over the batch's edits,
        so each row's ``δ`` is rescaled by ``len(batch)`` to that row's own gradient; the factors
        of all rows go through the transform together and are then summed row by row.  Equal to
        editing each row alone (:meth:`edited_parameters` of a one-row batch) when the
        normalisation statistics are frozen (eval mode); in training mode the statistics are
        updated with the whole batch before any row is normalised."""
        factors = self._factors(model, batch)
        n = len(batch)
        out = {}
        for i, name in enumerate(self.edit_params):
            key, mode = self._route[name]
            x, delta, rows = factors[name]
            x_t, delta_t = self.transforms[key](x, delta * n, mode)
            grads = torch.stack([self._combine(name, x_t[rows == r], delta_t[rows == r]) for r in range(n)])
            out[name] = -self.edit_lrs[i] * grads
        return out

    def edited_parameters(self, model: nn.Module, batch: PairBatch,
                          cond: PairBatch | None = None) -> dict[str, torch.Tensor]:
        grads = self.pseudo_gradients(model, batch)
        named = dict(model.named_parameters())
        new = {}
        for i, name in enumerate(self.edit_params):
            weight = named[name].detach()
            new[name] = weight - (self.edit_lrs[i] * grads[name]).to(weight.dtype)
        return new

    # ---------------------------------------------------------------- training
    def optimizer_groups(self, lr: float) -> list[dict]:
        """The transforms at ``lr`` (MEND's outer lr, 1e-6 for GPT-J) and the edit steps
        ``α_l`` at ``lr_lr``."""
        self._check_bound()
        return [
            {"params": [p for p in self.transforms.parameters() if p.requires_grad], "lr": lr},
            {"params": [self.edit_lrs], "lr": self.lr_lr},
        ]
