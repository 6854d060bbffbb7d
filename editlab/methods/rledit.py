"""RLEdit: a hypernetwork editor trained over sequences of edits.

Li, Jiang, Chen, Bi, Zhou, Sun, Fang, Wang 2025, "Reinforced Lifelong Editing for Language Models"
(ICML 2025, arXiv 2502.05759); reference repository zhrli324/RLEdit (``editor/rledit.py``,
``nets.py``, ``editor/base.py``, ``util.py``; defaults in ``config/editor/rledit.yaml``,
``config/dataset/*.yaml``, ``config/model/*.yaml``), itself built on MALMEN (ChenmienTan/malmen).

Lifelong editing applies a stream of edit batches to one model: every batch is edited on the model
the earlier batches left.  A hypernetwork trained on the unedited model (MEND, MALMEN) produces
updates that fit the weights it was trained on and degrades as they drift.  RLEdit trains the
hypernetwork as a policy over whole edit sequences: the state is the current (edited) model, the
action the parameter shift of one batch, the reward minus that step's loss, and the hypernetwork is
optimised on the total over the sequence.

What one edit (one step) computes, for every edited weight ``W`` (input ``k``, output gradient
``δ``):

1. the gradient factors ``(k_t, δ_t)`` of the edit loss (teacher-forced NLL of the new targets) on
   the *current* model, at the positions that predict answer tokens (``factor_positions="answer"``:
   the reference's ``token: ans``, ``util.py`` ``TracerDict``);
2. ``[k̃; δ̃] = net([k; δ])``: running mean/std normalisation of ``[k; δ]`` and ``n_blocks`` blocks
   ``h + relu(h A B + b) · scale[m] + shift[m]`` (``B = 0`` at init: the identity), one network per
   weight shape with a per-weight scale/shift ``m`` (``nets.py`` ``RLEditNet``, ``RLEditBlock``);
   editlab builds it from MEND's pieces (:class:`~editlab.methods.mend._GradientTransform`, with
   the scale/shift after the activation as here);
3. a value change per position, ``d_t = −α_l (k_t · k̃_t) δ̃_t``, with a learned step ``α_l`` per
   weight (initialised to ``edit_lr``), and the shift that maps the keys to those value changes by
   ridge least squares, ``S = (KᵀK + e^{λ_l} I)⁻¹ Kᵀ D`` with a learned ``λ_l`` per weight
   (initialised to 0) (``editor/rledit.py`` ``predict_param_shifts``; MALMEN's aggregation);
4. ``W ← W + S`` (``Sᵀ`` for ``nn.Linear``, whose weight is stored ``(out, in)``).

Training (:meth:`RLEdit.training_losses`) runs episodes: a training batch is cut into steps of
``edits_per_step`` records and the steps into episodes of ``episode_steps`` steps.  Within an
episode the edited weights accumulate the shifts of the earlier steps (``torch.func.functional_call``:
the base model is never written), and step ``t``'s loss is::

    L_t = Σ_{k=0}^{memory_depth−1} μ^k [ c_edit · NLL(rephrases of step t−k; W_t + S_t)
                                        + c_loc · KL(p_{W_t}(·|loc_{t−k}) ‖ p_{W_t+S_t}(·|loc_{t−k})) ]
          + c_reg · Σ_l ‖S_t,l‖²

with ``W_t`` the weights before step ``t`` (the earlier shifts included) and ``μ = memory_decay``:
the ``k = 0`` term is the current edit, the ``k ≥ 1`` terms the memory of the earlier edits of the
episode ("memory backtracking"), which the current shift must not undo.  The episode's loss is
``Σ_t L_t``: the reference accumulates the gradients of every step of the sequence and takes one
optimizer step per sequence (``editor/rledit.py`` ``train``: ``update_hypernet(..., False)`` per
step, ``opt.step()`` after the loop).  As in the reference, the gradient of ``L_t`` flows into the
hypernetwork through ``S_t`` only: the earlier shifts are part of the state (the reference writes
them into the model).  A batch of several episodes averages their losses.

The gradient is computed step by step, as the reference does (its ``update_hypernet`` back-propagates
the weight gradient through the least-squares solve and the network): ``g_t = ∂L_t/∂S_t`` from the
language-model passes, then ``∂⟨g_t, S_t⟩/∂θ`` through the hypernetwork, added up over the episode.
Only one step's graph is alive at a time, so episodes of hundreds of steps fit in memory.  The
returned ``loss`` has the episode loss as its value and that gradient as its gradient (a linear
term in the editor's parameters), so the training module, gradient clipping, accumulation and DDP's
all-reduce treat it as any other loss.

In the edit loop RLEdit edits a stream (``edit.sequential=true``, ``stream.*``):
:meth:`compute_deltas` on the model the earlier batches left returns one batch's shift.

Defaults: ``config/editor/rledit.yaml`` (rank 1024, n_blocks 4, lr 1e-6 → ``edit_lr``, meta_lr
1e-5 → the training module's lr, loc_coef 0.6 → ``c_loc``, max_grad_norm 1 → gradient clipping,
reg_coef 1e-4 → ``c_reg``, time_decay 0.95 → ``memory_decay``, back_depth 10 → ``memory_depth``,
token ans → ``factor_positions``), ``config/dataset/*.yaml`` (n_edits 20 → ``edits_per_step``) and
``config/config.yaml`` (num_seq 400 → ``episode_steps``).

Deviations from the reference, each deliberate:

* the edit NLL averages token NLLs per edit, then over edits (editlab's ``target_nll``); the
  reference averages over all answer tokens of a micro-batch of 4 records and sums the micro-batch
  means.  The locality KL is averaged over the answer positions of the locality inputs, as the
  reference's ``kl_div`` (``loc_positions="answer"``), but over the whole step rather than summed
  over micro-batches.  Both change the scale of the edit and locality terms against ``c_reg``.
* the running normalisation statistics are updated in training mode only (MEND's rule in
  editlab); the reference also updates them while it edits the test stream.
* the statistics use Welford's exact update (the reference's accumulates ``n · var`` with the
  unbiased variance, a factor ``n/(n−1)`` off per batch); before any training the statistics are
  empty and an edit raises :class:`~editlab.methods.base.EditError`.
* gradients are clipped once per optimizer step (``gradient_clip_val``); the reference clips the
  accumulated gradient after every step of the sequence.
* the hypernetwork processes all rows of a step at once; the reference feeds them in zero-padded
  chunks of 128 (memory only: the padding rows have zero keys and no effect).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from editlab.data.collate import EditBatch, PairBatch
from editlab.errors import require_choice, require_float, require_int
from editlab.methods.base import EditError
from editlab.methods.hyper import (
    FACTOR_POSITIONS,
    TrainableEditor,
    edit_gradient_factors,
    edited_forward,
    locality_kl,
)
from editlab.methods.mend import _GradientTransform, weight_layout
from editlab.models.arch import UnknownArchitecture, arch_for

__all__ = ["RLEdit"]


class RLEdit(TrainableEditor):
    """RLEdit's lifelong hypernetwork editor (see the module docstring).

    Args:
        edit_params: base-model weights to edit (2-D weights of ``nn.Linear`` or GPT-2 ``Conv1D``);
            None: the MLP input and output weights of the last three blocks.  The reference names
            them per model (Llama-3-8B: ``gate_proj`` and ``up_proj`` of layers 22-30): see the
            presets ``method/rledit/<model>.yaml``.
        rank: rank of each hypernetwork block (``min(rank, width)``); reference 1024.
        n_blocks: blocks of the hypernetwork; reference 4.
        edit_lr: initial learned step ``α_l`` of every edited weight; reference ``lr`` 1e-6.
        factor_positions: positions whose gradient factors feed the network: ``answer`` (those
            predicting answer tokens; reference ``token: ans``) or ``all`` non-padding positions.
        edits_per_step: records per step of a training episode (one edit batch); reference
            ``n_edits`` 20.
        episode_steps: steps per training episode; a training batch of ``episode_steps ×
            edits_per_step`` records is one episode; reference ``num_seq`` 400.
        memory_depth: batches whose losses each step takes, the current one included (``1``: no
            memory term); reference ``back_depth`` 10.
        memory_decay: weight ``μ^k`` of the batch ``k`` steps back; reference ``time_decay`` 0.95.
        c_edit: weight of the edit NLL; reference 1 (no coefficient).
        c_loc: weight of the locality KL; reference ``loc_coef`` 0.6.
        c_reg: weight of the squared Frobenius norm of each step's shifts; reference ``reg_coef``
            1e-4.
        edit_outer: inputs of the edit NLL after the edit: ``rephrase`` (the reference's
            ``equiv_tuples``), ``prompt`` or ``both``; a batch without rephrases uses the prompts.
        loc_positions: positions of the locality inputs the KL is averaged over: ``answer``
            (reference) or ``all``.
        base_model: name of the base model the editor is trained for (kept in checkpoints).
    """

    def __init__(
        self,
        edit_params: Sequence[str] | None = None,
        rank: int = 1024,
        n_blocks: int = 4,
        edit_lr: float = 1e-6,
        factor_positions: str = "answer",
        edits_per_step: int = 20,
        episode_steps: int = 400,
        memory_depth: int = 10,
        memory_decay: float = 0.95,
        c_edit: float = 1.0,
        c_loc: float = 0.6,
        c_reg: float = 1e-4,
        edit_outer: str = "rephrase",
        loc_positions: str = "answer",
        base_model: str | None = None,
    ) -> None:
        super().__init__(edit_params, c_edit=c_edit, c_loc=c_loc, edit_outer=edit_outer,
                         base_model=base_model, loc_positions=loc_positions, batch_edits="joint")
        self.rank = require_int(rank, "rank", ge=1)
        self.n_blocks = require_int(n_blocks, "n_blocks", ge=1)
        self.edit_lr = require_float(edit_lr, "edit_lr", gt=0)
        self.factor_positions = require_choice(factor_positions, "factor_positions", FACTOR_POSITIONS)
        self.edits_per_step = require_int(edits_per_step, "edits_per_step", ge=1)
        self.episode_steps = require_int(episode_steps, "episode_steps", ge=1)
        self.memory_depth = require_int(memory_depth, "memory_depth", ge=1)
        self.memory_decay = require_float(memory_decay, "memory_decay", ge=0, le=1)
        self.c_reg = require_float(c_reg, "c_reg", ge=0)
        self.transforms = nn.ModuleDict()
        self._route: dict[str, tuple[str, int]] = {}
        self._transposed: dict[str, bool] = {}

    # ---------------------------------------------------------------- setup
    def build(self, model: nn.Module, params: dict[str, nn.Parameter]) -> None:
        try:
            spec = arch_for(model)
        except UnknownArchitecture as err:
            raise EditError(f"RLEdit: {err}") from err
        shapes: dict[str, tuple[int, int]] = {}
        for name, param in params.items():
            self._transposed[name], shapes[name] = weight_layout(model, spec, name, param, "RLEdit")
        groups: dict[str, list[str]] = {}
        for name, (x_dim, delta_dim) in shapes.items():
            groups.setdefault(f"{x_dim}x{delta_dim}", []).append(name)
        for key, names in groups.items():
            x_dim, delta_dim = shapes[names[0]]
            self.transforms[key] = _GradientTransform(
                x_dim, delta_dim, rank=self.rank, n_hidden=self.n_blocks - 1, init="id", act="relu",
                norm=True, combine=True, one_sided=False, x_only=False, delta_only=False,
                n_modes=len(names), mode_after_act=True, owner="RLEdit",
            )
            for mode, name in enumerate(names):
                self._route[name] = (key, mode)
        self.edit_lrs = nn.Parameter(torch.full((len(params),), float(self.edit_lr)))
        self.log_lambdas = nn.Parameter(torch.zeros(len(params)))
        self.to(next(iter(params.values())).device)

    # ---------------------------------------------------------------- editing
    def shifts(self, model: nn.Module, batch: PairBatch,
               params: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The parameter shift ``S`` of every edited weight that installs the edits of ``batch``
        on the model with ``params`` substituted for its own (None: the model as it is), in the
        weight's layout, float32, differentiable w.r.t. the editor.  In training mode this updates
        the normalisation statistics."""
        self._check_bound()
        factors = edit_gradient_factors(model, self.edit_params, batch, owner="RLEdit", params=params,
                                        positions=self.factor_positions)
        out = {}
        for i, name in enumerate(self.edit_params):
            key, mode = self._route[name]
            keys, grads, _ = factors[name]
            keys_t, grads_t = self.transforms[key](keys, grads, mode)
            values = -self.edit_lrs[i] * (keys * keys_t).sum(-1, keepdim=True) * grads_t  # [n, out]
            ridge = torch.exp(self.log_lambdas[i]) * torch.eye(keys.shape[1], device=keys.device)
            shift = torch.linalg.solve(keys.t() @ keys + ridge, keys.t() @ values)  # [in, out]
            out[name] = shift if self._transposed[name] else shift.t()
        return out

    def edited_parameters(self, model: nn.Module, batch: PairBatch,
                          cond: PairBatch | None = None) -> dict[str, torch.Tensor]:
        named = dict(model.named_parameters())
        return {name: named[name].detach() + shift.to(named[name].dtype)
                for name, shift in self.shifts(model, batch).items()}

    # ---------------------------------------------------------------- training
    def episodes(self, batch: EditBatch) -> list[list[EditBatch]]:
        """``batch`` cut into steps of ``edits_per_step`` consecutive records and the steps into
        episodes of ``episode_steps`` (the last step and episode may be shorter)."""
        n, size = len(batch.records), self.edits_per_step
        steps = [batch.select(range(lo, min(lo + size, n))) for lo in range(0, n, size)]
        return [steps[lo: lo + self.episode_steps] for lo in range(0, len(steps), self.episode_steps)]

    def _step_terms(self, model: nn.Module, before: dict[str, torch.Tensor], after: dict[str, torch.Tensor],
                    step: EditBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``c_edit · NLL + c_loc · KL`` of one (current or earlier) step's records with the weights
        ``after`` (KL against ``before``), and its parts."""
        nll, acc = self.outer_nll(model, after, step)
        parts = {"loss_edit": nll.detach(), "edit_acc": acc.detach()}
        term = self.c_edit * nll
        if step.locality is not None:
            loc = step.locality
            with torch.no_grad():
                pre = edited_forward(model, before, loc)
            post = edited_forward(model, after, loc)
            kl = locality_kl(pre, post, loc, self.loc_positions)
            rows, pos = loc.gather_index()
            agree = (post[rows, pos].argmax(-1) == pre[rows, pos].argmax(-1)).float().mean()
            parts.update(loss_loc=kl.detach(), loc_acc=agree.detach())
            term = term + self.c_loc * kl
        return term, parts

    def training_losses(self, model: nn.Module, batch: EditBatch) -> dict[str, torch.Tensor]:
        """RLEdit's episode objective on ``batch`` (see the module docstring).  Returns ``loss``
        (the mean over the batch's episodes of ``Σ_t L_t``, with that gradient), and, averaged over
        all steps, the current edit's ``loss_edit`` / ``edit_acc`` / ``loss_loc`` / ``loc_acc``,
        the weighted earlier-edit terms ``loss_memory`` and the shift penalty ``loss_reg``."""
        self._check_bound()
        episodes = self.episodes(batch)
        params = [p for p in self.parameters() if p.requires_grad]
        grads = [torch.zeros_like(p) for p in params]
        named = dict(model.named_parameters())
        device = next(iter(named.values())).device
        total = torch.zeros((), device=device)
        logs: dict[str, list[torch.Tensor]] = {}
        for episode in episodes:
            weights = {n: named[n].detach() for n in self.edit_params}  # W_t: the earlier shifts included
            for t, step in enumerate(episode):
                shifts = self.shifts(model, step.edit, params=weights)
                leaves = {n: s.detach().requires_grad_(True) for n, s in shifts.items()}
                after = {n: weights[n] + leaves[n].to(weights[n].dtype) for n in self.edit_params}
                loss, memory = torch.zeros((), device=device), torch.zeros((), device=device)
                for k in range(min(self.memory_depth, t + 1)):
                    term, parts = self._step_terms(model, weights, after, episode[t - k])
                    loss = loss + self.memory_decay**k * term
                    if k == 0:
                        for key, value in parts.items():
                            logs.setdefault(key, []).append(value)
                    else:
                        memory = memory + self.memory_decay**k * term.detach()
                by_shift = torch.autograd.grad(loss, list(leaves.values())) if loss.requires_grad else None
                reg = self.c_reg * sum(s.pow(2).sum() for s in shifts.values())
                surrogate = reg
                if by_shift is not None:
                    surrogate = surrogate + sum((g * shifts[n]).sum() for n, g in zip(leaves, by_shift))
                if params and surrogate.requires_grad:
                    step_grads = torch.autograd.grad(surrogate, params, allow_unused=True)
                    for acc, g in zip(grads, step_grads):
                        if g is not None:
                            acc.add_(g)
                total = total + loss.detach() + reg.detach()
                logs.setdefault("loss_memory", []).append(memory)
                logs.setdefault("loss_reg", []).append(reg.detach())
                weights = {n: weights[n] + shifts[n].detach().to(weights[n].dtype) for n in self.edit_params}
        n_episodes = len(episodes)
        out = {key: torch.stack(values).mean() for key, values in logs.items()}
        total = total / n_episodes
        if params:
            # value: the episode loss; gradient: the one accumulated above (one step's graph at a time)
            link = sum((g.div_(n_episodes) * p).sum() for g, p in zip(grads, params))
            total = total + (link - link.detach())
        out["loss"] = total
        return out
