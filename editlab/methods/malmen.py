"""MALMEN: MAssive Language Model Editing Network.

Tan, Zhang, Fu 2024, "Massive Editing for Large Language Models via Meta Learning" (ICLR 2024);
reference repository ChenmienTan/malmen (``editor/malmen.py``, ``editor/base.py``, ``nets.py``,
``util.py``; defaults in ``config/editor/malmen.yaml``, edited layers in ``config/model/*.yaml``).

MALMEN keeps MEND's hypernetwork (a network on the rank-one factors of the edit loss's gradient)
and replaces MEND's sum of per-edit updates by a least-squares aggregation, so that thousands of
edits can be made at once.  For an edited linear layer with keys ``u`` (its inputs) and
value gradients ``d = ∂L/∂(output)``:

1. **factors**: for every edit, ``(u_t, d_t)`` at the positions that predict its answer tokens
   (the reference's ``token: ans``; ``token="all"``: every non-padding position) are captured with
   :func:`~editlab.methods.hyper.edit_gradient_factors`, ``capture_batch_size`` edits per forward
   and backward, so that any number of edits fits (the reference's ``data.batch_size``);
2. **value shifts**: a hypernetwork per weight shape (``nets.py`` ``MALMENNet``), shared by the
   edited weights of that shape, normalises ``[u; d]`` with running statistics, applies
   ``n_blocks`` residual low-rank blocks ``h + s_l · relu(h A B + b) + c_l`` (``A`` random, ``B = 0``:
   the identity at init; ``s_l``, ``c_l``: a scale and shift per edited layer ``l``), splits the
   result into ``(ũ, d̃)`` and returns the value shift ``v_t = −η_l ⟨u_t, ũ_t⟩ d̃_t``, with a learned
   step ``η_l`` per layer (initialised to ``edit_lr``);
3. **least squares**: the shifts of *all* edits are aggregated into one parameter shift, the
   solution of ``min_ΔW ‖U ΔW − V‖² + e^{λ_l} ‖ΔW‖²``, i.e. the normal equation
   ``ΔW = (UᵀU + e^{λ_l} I)⁻¹ UᵀV`` (``ΔW`` in ``(in, out)`` layout; transposed for ``nn.Linear``),
   with a learned ``λ_l`` per layer initialised to 0 (``editor/malmen.py``
   ``predict_param_shifts``).

**Training** minimises ``c_edit · NLL(target | rephrase; W + ΔW) + c_loc · KL(p_W ‖ p_{W+ΔW})`` on
the locality inputs (the KL at the positions predicting the locality answer, as the reference's
``kl_div``), back-propagated through the solve and the hypernetwork, with the paper's split that
keeps the language model's memory independent of the number of edits
(:meth:`MALMEN.training_losses`):

(1) the factors, value shifts and ``ΔW`` are computed without building any graph;
(2) the meta loss is computed with the edited model in sub-batches of ``capture_batch_size``,
    each back-propagated at once to ``ΔW`` only (the model's own weights take no gradient), the
    gradients ``G = ∂L/∂ΔW`` summed;
(3) ``G`` is back-propagated through the solve (to ``V`` and ``λ_l``) and through the hypernetwork,
    recomputed ``net_batch_size`` rows at a time (the reference's ``update_hypernet``).

Step (3) runs inside the backward of the returned loss (a custom autograd function whose inputs
are the editor's parameters), so that :class:`~editlab.lit.editor_train.EditorTrainModule`, DDP's
gradient all-reduce, gradient accumulation and clipping see one ordinary ``loss.backward()``.

Deviations from the reference, each deliberate:

* the factors of an edit are the gradient of *its own* mean token NLL (editlab's ``target_nll``
  of the sub-batch, times the number of edits in it); the reference takes the mean over all answer
  tokens of its 32-edit sub-batch, a scale that depends on how edits are grouped.  The running
  normalisation absorbs a constant scale; ours makes ``ΔW`` independent of ``capture_batch_size``.
* the meta loss is the mean over edits of the rephrase NLL (and of the locality KL over its
  positions); the reference sums the means of its sub-batches (``n_edits / 32`` times larger).
  Adam is invariant to that scale; gradient clipping (``max_grad_norm`` 1) is not.
* the normalisation statistics are updated by training calls only (the reference also updates
  them on validation batches); before any training call an edit raises :class:`EditError`.
* factors and the meta loss are kept in memory, not in ``cache_dir`` files; the edited model is
  run with :func:`torch.func.functional_call` instead of adding the shift to the weights in place.
* ``token="ans"`` needs a decoder-only model; for encoder-decoder models use ``token="all"``
  (the reference's T5 setting uses the attention masks when it edits encoder and decoder layers).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from editlab.data.collate import EditBatch, PairBatch
from editlab.data.records import EditRecord
from editlab.errors import require_choice, require_float, require_int
from editlab.methods.base import Deltas, EditError
from editlab.methods.hyper import (TrainableEditor, edit_gradient_factors, edited_forward, locality_terms,
                                   target_nll)
from editlab.models.arch import UnknownArchitecture, arch_for, get_module

__all__ = ["MALMEN"]

TOKENS = ("ans", "all")
EPS = torch.finfo(torch.float32).eps  # the reference's RunningMeanStd epsilon


class _Normaliser(nn.Module):
    """Running mean and unbiased standard deviation of the rows ``[u; d]`` (the reference's
    ``RunningMeanStd``; batched Welford/Chan update, in place)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(size))
        self.register_buffer("m2", torch.zeros(size))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, rows: torch.Tensor) -> None:
        n_new = rows.shape[0]
        if n_new == 0:
            return
        n_old = int(self.count)
        n = n_old + n_new
        mean_new = rows.mean(0)
        m2_new = ((rows - mean_new) ** 2).sum(0)
        diff = mean_new - self.mean
        if n_old == 0:
            self.mean.copy_(mean_new)
            self.m2.copy_(m2_new)
        else:
            self.mean.add_(diff * (n_new / n))
            self.m2.add_(m2_new + diff**2 * (n_old * n_new / n))
        self.count.fill_(n)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        count = int(self.count)
        if count < 2:
            raise EditError(f"MALMEN: the normalisation statistics hold {count} sample(s); train the editor "
                            "(or load a trained one) before editing")
        std = (self.m2 / (count - 1)).sqrt()
        return (rows - self.mean) / (std + EPS)


class _Block(nn.Module):
    """``h + scale[l] · relu(h A B + b) + shift[l]`` (the reference's ``MALMENBlock``)."""

    def __init__(self, size: int, rank: int, n_layers: int) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(size, rank))
        self.B = nn.Parameter(torch.zeros(rank, size))
        self.bias = nn.Parameter(torch.zeros(size))
        self.scale = nn.Parameter(torch.ones(n_layers, size))
        self.shift = nn.Parameter(torch.zeros(n_layers, size))

    def forward(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        out = (h @ self.A @ self.B + self.bias).clamp(min=0)
        return h + self.scale[layer] * out + self.shift[layer]


class _HyperNet(nn.Module):
    """The hypernetwork of the edited weights of one shape (the reference's ``MALMENNet``): keys and
    value gradients to value shifts, with a learned step ``lr`` and regulariser ``lamda`` (``λ``,
    used as ``e^λ``) per edited layer."""

    def __init__(self, key_size: int, value_size: int, rank: int, n_blocks: int, n_layers: int,
                 edit_lr: float) -> None:
        super().__init__()
        self.key_size, self.value_size = key_size, value_size
        self.normaliser = _Normaliser(key_size + value_size)
        self.blocks = nn.ModuleList(_Block(key_size + value_size, rank, n_layers) for _ in range(n_blocks))
        self.lr = nn.Parameter(torch.full((n_layers,), float(edit_lr)))
        self.lamda = nn.Parameter(torch.zeros(n_layers))

    def forward(self, keys: torch.Tensor, grads: torch.Tensor, layer: int) -> torch.Tensor:
        h = self.normaliser(torch.cat([keys, grads], dim=-1))
        for block in self.blocks:
            h = block(h, layer)
        pseudo_keys, pseudo_grads = h.split([self.key_size, self.value_size], dim=-1)
        return -self.lr[layer] * (keys * pseudo_keys).sum(-1, keepdim=True) * pseudo_grads


class _ThroughSolve(torch.autograd.Function):
    """Step (3) of the split: zero in the forward; in the backward, the gradient of the meta loss
    with respect to the editor's parameters from the saved ``∂L/∂ΔW`` (:meth:`MALMEN.meta_gradients`)."""

    @staticmethod
    def forward(ctx, editor, factors, weight_grads, *params):
        ctx.editor, ctx.factors, ctx.weight_grads = editor, factors, weight_grads
        return params[0].new_zeros(())

    @staticmethod
    def backward(ctx, out_grad):
        grads = ctx.editor.meta_gradients(ctx.factors, ctx.weight_grads, out_grad)
        return (None, None, None, *grads)


class MALMEN(TrainableEditor):
    """MALMEN's least-squares hypernetwork editor (see the module docstring).

    Args:
        edit_params: base-model weights to edit (2-D weights of ``nn.Linear`` or GPT-2 ``Conv1D``);
            None: the MLP output weights of the last six blocks (the reference's GPT-J and GPT-2
            ``edit_modules``: ``fc_out`` / ``c_proj`` of the last six layers; Llama-type models:
            ``down_proj``).
        rank: inner width of each block's ``A B``; MALMEN 1920.
        n_blocks: residual blocks of the hypernetwork; MALMEN 2.
        edit_lr: initial learned step ``η_l`` of every edited layer; MALMEN ``lr`` 1e-6.
        c_edit, c_loc: weights of the edit (generalisation) and locality losses; MALMEN 1 and
            ``loc_coef`` 1.
        edit_outer: inputs of the edit loss after the edit: ``rephrase`` (MALMEN's equivalent
            prompts), ``prompt`` or ``both``.
        loc_positions: positions of the locality input the KL averages: ``answer`` (MALMEN: those
            predicting the locality answer) or ``all``.
        token: positions whose factors are captured: ``ans`` (MALMEN: those predicting the
            answer; decoder-only models) or ``all`` (every non-padding position, as MEND).
        capture_batch_size: edits per forward/backward when capturing factors and computing the
            meta loss (the reference's ``data.batch_size``, 32); memory only, not the result.
        net_batch_size: rows per hypernetwork call (the reference's ``editor.batch_size``, 1024);
            memory only.
        base_model: name of the base model the editor is trained for (kept in checkpoints).
    """

    def __init__(
        self,
        edit_params: Sequence[str] | None = None,
        rank: int = 1920,
        n_blocks: int = 2,
        edit_lr: float = 1e-6,
        c_edit: float = 1.0,
        c_loc: float = 1.0,
        edit_outer: str = "rephrase",
        loc_positions: str = "answer",
        token: str = "ans",
        capture_batch_size: int = 32,
        net_batch_size: int = 1024,
        base_model: str | None = None,
    ) -> None:
        super().__init__(edit_params, c_edit=c_edit, c_loc=c_loc, edit_outer=edit_outer,
                         base_model=base_model, loc_positions=loc_positions, batch_edits="joint")
        self.rank = require_int(rank, "rank", ge=1)
        self.n_blocks = require_int(n_blocks, "n_blocks", ge=0)
        self.edit_lr = require_float(edit_lr, "edit_lr", gt=0)
        self.token = require_choice(token, "token", TOKENS)
        self.capture_batch_size = require_int(capture_batch_size, "capture_batch_size", ge=1)
        self.net_batch_size = require_int(net_batch_size, "net_batch_size", ge=1)
        self.nets = nn.ModuleDict()
        self._route: dict[str, tuple[str, int]] = {}
        self._transposed: dict[str, bool] = {}

    # ---------------------------------------------------------------- setup
    def default_edit_params(self, model: nn.Module) -> list[str]:
        """The MLP output weights of the last six blocks (the reference's ``edit_modules``)."""
        try:
            spec = arch_for(model)
        except UnknownArchitecture as err:
            raise EditError(f"MALMEN: {err}") from err
        total = spec.num_layers(model)
        layers = range(max(0, total - 6), total)
        return [spec.module_path(model, "mlp_out", layer) + ".weight" for layer in layers]

    def build(self, model: nn.Module, params: dict[str, nn.Parameter]) -> None:
        shapes: dict[str, tuple[int, int]] = {}
        for name, param in params.items():
            path, _, leaf = name.rpartition(".")
            module = get_module(model, path)
            if not isinstance(module, (nn.Linear, Conv1D)) or leaf != "weight" or param.dim() != 2:
                raise EditError(f"MALMEN edits 2-D weights of linear layers (nn.Linear, Conv1D); {name!r} "
                                f"is not one ({type(module).__name__}, shape {tuple(param.shape)})")
            self._transposed[name] = isinstance(module, Conv1D)  # Conv1D stores (in, out)
            rows, cols = param.shape
            shapes[name] = (rows, cols) if self._transposed[name] else (cols, rows)  # (key, value) sizes
        groups: dict[str, list[str]] = {}
        for name, (key_size, value_size) in shapes.items():
            groups.setdefault(f"{key_size}x{value_size}", []).append(name)
        for group, names in groups.items():
            key_size, value_size = shapes[names[0]]
            self.nets[group] = _HyperNet(key_size, value_size, self.rank, self.n_blocks, len(names),
                                         self.edit_lr)
            for layer, name in enumerate(names):
                self._route[name] = (group, layer)
        self.to(next(iter(params.values())).device)

    # ---------------------------------------------------------------- the three steps
    def gradient_factors(self, model: nn.Module, batch: PairBatch
                         ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per edited weight, the keys ``U [T, in]`` and value gradients ``D [T, out]`` of all edits
        of ``batch`` (each edit's rows the factors of its own NLL's gradient; float32, detached),
        ``capture_batch_size`` edits per forward and backward."""
        self._check_bound()
        positions = "answer" if self.token == "ans" else "all"
        keys: dict[str, list[torch.Tensor]] = {n: [] for n in self.edit_params}
        grads: dict[str, list[torch.Tensor]] = {n: [] for n in self.edit_params}
        for lo in range(0, len(batch), self.capture_batch_size):
            sub = batch.select(range(lo, min(lo + self.capture_batch_size, len(batch))))
            found = edit_gradient_factors(model, self.edit_params, sub, owner="MALMEN", positions=positions)
            for name, (x, delta, _) in found.items():
                keys[name].append(x)
                grads[name].append(delta * len(sub))  # target_nll averages over the sub-batch's edits
        return {n: (torch.cat(keys[n]), torch.cat(grads[n])) for n in self.edit_params}

    def update_statistics(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Add the rows ``[u; d]`` to the running statistics of their hypernetworks."""
        for name, (keys, grads) in factors.items():
            self.nets[self._route[name][0]].normaliser.update(torch.cat([keys, grads], dim=-1))

    def value_shifts(self, name: str, keys: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """The value shifts ``V [T, out]`` of weight ``name``'s factors, ``net_batch_size`` rows per
        hypernetwork call (differentiable w.r.t. the editor when grad mode is on)."""
        group, layer = self._route[name]
        net = self.nets[group]
        if keys.shape[0] == 0:
            return keys.new_zeros(0, net.value_size)
        step = self.net_batch_size
        return torch.cat([net(keys[lo:lo + step], grads[lo:lo + step], layer)
                          for lo in range(0, keys.shape[0], step)])

    def solve(self, name: str, keys: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
        """``ΔW = (UᵀU + e^λ I)⁻¹ UᵀV`` for weight ``name``, in the parameter's layout (float32)."""
        group, layer = self._route[name]
        net = self.nets[group]
        eye = torch.eye(keys.shape[1], device=keys.device, dtype=keys.dtype)
        gram = keys.t() @ keys + net.lamda[layer].exp() * eye
        delta = torch.linalg.solve(gram, keys.t() @ shifts)  # (in, out)
        return delta if self._transposed[name] else delta.t()

    def parameter_shifts(self, model: nn.Module, batch: PairBatch) -> dict[str, torch.Tensor]:
        """``ΔW`` of every edited weight for all edits of ``batch`` (parameter layout, float32;
        differentiable w.r.t. the editor when grad mode is on).  In training mode the
        normalisation statistics are updated with the batch's factors first."""
        factors = self.gradient_factors(model, batch)
        if self.training:
            self.update_statistics(factors)
        return {n: self.solve(n, keys, self.value_shifts(n, keys, grads))
                for n, (keys, grads) in factors.items()}

    # ---------------------------------------------------------------- editing
    def edited_parameters(self, model: nn.Module, batch: PairBatch,
                          cond: PairBatch | None = None) -> dict[str, torch.Tensor]:
        """``W + ΔW`` in one differentiable computation (no split: the graph holds every edit)."""
        shifts = self.parameter_shifts(model, batch)
        named = dict(model.named_parameters())
        return {n: named[n].detach() + d.to(named[n].dtype) for n, d in shifts.items()}

    def compute_deltas(self, model: nn.Module, tokenizer, records: Sequence[EditRecord]) -> Deltas:
        """``ΔW`` for all ``records`` at once (one batch edit), without any graph of the editor."""
        if not records:
            raise EditError("no records to edit")
        self.bind(model)
        device = next(model.parameters()).device
        batch = self.encode(tokenizer, model, records).to(device)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():  # the factor capture enables grad for its own backward
                shifts = self.parameter_shifts(model, batch)
        finally:
            self.train(was_training)
        named = dict(model.named_parameters())
        deltas = {n: d.to(named[n].dtype) for n, d in shifts.items()}
        for n, d in deltas.items():
            if not torch.isfinite(d).all():
                raise EditError(f"MALMEN: non-finite update for {n!r}")
        return deltas

    # ---------------------------------------------------------------- training
    def _chunks(self, batch: PairBatch) -> list[PairBatch]:
        step = self.capture_batch_size
        return [batch.select(range(lo, min(lo + step, len(batch)))) for lo in range(0, len(batch), step)]

    def _kl_positions(self, batch: PairBatch) -> torch.Tensor:
        """How many positions of ``batch`` the locality KL averages over (``loc_positions``)."""
        if self.loc_positions == "answer":
            return batch.target_mask.sum()
        mask = batch.decoder_attention_mask if batch.decoder_input_ids is not None else batch.attention_mask
        return mask.sum()

    def training_losses(self, model: nn.Module, batch: EditBatch) -> dict[str, torch.Tensor]:
        """The objective of the module docstring by the three-step split.  ``loss`` has the value of
        the meta loss and, when back-propagated, gives the editor's parameters the gradient the
        unsplit computation (:meth:`edited_parameters` + the objective) would give them."""
        self._check_bound()
        # (1) factors, value shifts and ΔW: no graph
        factors = self.gradient_factors(model, batch.edit)
        if self.training:
            self.update_statistics(factors)
        with torch.no_grad():
            leaves = {n: self.solve(n, keys, self.value_shifts(n, keys, grads)).requires_grad_(True)
                      for n, (keys, grads) in factors.items()}
        # (2) the meta loss on the edited model, sub-batch by sub-batch, differentiated w.r.t. ΔW only
        named = dict(model.named_parameters())
        weight_grads = {n: torch.zeros_like(leaf) for n, leaf in leaves.items()}

        def edited() -> dict[str, torch.Tensor]:
            return {n: named[n].detach() + leaf.to(named[n].dtype) for n, leaf in leaves.items()}

        def backward(loss: torch.Tensor) -> None:
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            for name, grad in zip(leaves, grads):
                if grad is not None:
                    weight_grads[name] += grad

        zero = torch.zeros((), device=next(iter(leaves.values())).device)
        out: dict[str, torch.Tensor] = {}
        with torch.enable_grad():
            outer = self.outer_batches(batch)
            nll, acc = zero.clone(), zero.clone()
            for part in outer:
                tokens = part.target_mask.sum()
                for sub in self._chunks(part):
                    sub_nll, sub_acc = target_nll(edited_forward(model, edited(), sub), sub)
                    weight = len(sub) / len(part) / len(outer)
                    backward(self.c_edit * weight * sub_nll)
                    nll += weight * sub_nll.detach()
                    acc += sub_acc * sub.target_mask.sum() / tokens / len(outer)
            out.update(loss_edit=nll, edit_acc=acc)
            loss = self.c_edit * nll
            if batch.locality is not None:
                loc = batch.locality
                positions, answers = self._kl_positions(loc), loc.target_mask.sum()
                kl, agree = zero.clone(), zero.clone()
                for sub in self._chunks(loc):
                    sub_kl, sub_agree = locality_terms(model, edited(), sub, self.loc_positions)
                    weight = self._kl_positions(sub) / positions
                    backward(self.c_loc * weight * sub_kl)
                    kl += weight * sub_kl.detach()
                    agree += sub_agree * sub.target_mask.sum() / answers
                out.update(loss_loc=kl, loc_acc=agree)
                loss = loss + self.c_loc * kl
        # (3) through the solve and the hypernetwork: in the backward of the returned loss
        out["loss"] = loss + _ThroughSolve.apply(self, factors, weight_grads, *self.parameters())
        return out

    def meta_gradients(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                       weight_grads: dict[str, torch.Tensor], scale: torch.Tensor) -> list[torch.Tensor]:
        """Step (3): the gradient, for each of ``self.parameters()``, of the meta loss whose
        gradient w.r.t. each ``ΔW`` is ``scale · weight_grads``: through the solve to the value
        shifts and ``λ``, then through the hypernetwork ``net_batch_size`` rows at a time (the
        network recomputed, never more than one chunk's graph alive)."""
        params = list(self.parameters())
        total = [torch.zeros_like(p) for p in params]

        def add(grads) -> None:
            for acc, grad in zip(total, grads):
                if grad is not None:
                    acc += grad

        with torch.enable_grad():
            for name, (keys, grads) in factors.items():
                with torch.no_grad():
                    shifts = self.value_shifts(name, keys, grads)
                shifts.requires_grad_(True)
                delta = self.solve(name, keys, shifts)
                shift_grad, *param_grads = torch.autograd.grad(
                    delta, [shifts, *params], weight_grads[name] * scale, allow_unused=True)
                add(param_grads)  # λ
                group, layer = self._route[name]
                step = self.net_batch_size
                for lo in range(0, keys.shape[0], step):
                    part = self.nets[group](keys[lo:lo + step], grads[lo:lo + step], layer)
                    add(torch.autograd.grad(part, params, shift_grad[lo:lo + step], allow_unused=True))
        return total
