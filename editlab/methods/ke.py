"""KE (KnowledgeEditor): a hypernetwork that predicts weight updates from the edit and its gradient.

De Cao, Aziz, Titov 2021, "Editing Factual Knowledge in Language Models" (EMNLP 2021); reference
repository nicola-decao/KnowledgeEditor (``src/models/one_shot_learner.py``: ``ConditionedParameter``,
``LSTMConditioner``, ``OneShotLearner``; ``src/models/bart_seq2seq_augmented_kilt.py``: the
constrained training objective and its defaults).  EasyEdit ports it as ``EFK``
(``easyeditor/trainer/algs/KE.py``).

The editor reads the edit — here the prompt followed by the new target tokens — embedded with the
base model's (frozen) input embeddings, runs a one-layer bidirectional LSTM over it and maps the
final states of both directions through ``Linear + tanh`` to a condition vector ``c``.  For every
edited parameter ``W`` (shape ``m × n``) a :class:`_ConditionedParameter` turns ``c`` into
``(α_col ∈ Rⁿ, α_row ∈ Rᵐ, β_col, β_row, η)`` with a weight-normalised ``Linear → tanh → Linear``
and predicts::

    ΔW = max_scale · σ(η) · (∇_W L ⊙ softmax(α_row) α_colᵀ + softmax(β_row) β_colᵀ)

where ``∇_W L`` is the gradient of the edit loss (teacher-forced NLL of the new target) on the
unedited model.  Edited weights are ``W + ΔW``.

Training solves the constrained problem of the paper (eq. 3)::

    min  L_edit(W + ΔW)   subject to   KL(p_W(·|loc) ‖ p_{W+ΔW}(·|loc)) ≤ margin

through its Lagrangian ``L_edit + λ · (KL − margin)`` with a multiplier ``λ ≥ 0`` that is
*maximised* while the editor is minimised.  As in the reference (which registers a ``−grad`` hook
on ``λ``) this is done with one optimiser: ``λ`` enters the loss through a gradient-reversal
function (identity forward, negated gradient backward), so the same descent step lowers the loss
in the editor's parameters and raises it in ``λ`` — ``λ`` grows while the constraint is violated
(``KL > margin``) and shrinks otherwise.  ``λ`` is projected back to ``λ ≥ 0`` at the start of
every :meth:`KE.training_losses` call (the reference clamps it after each optimiser step).
:meth:`KE.anneal_margin` implements the reference's margin schedule (×0.8 down to
``margin_min`` whenever more than 90% of validation edits succeed); the training loop calls it.

Deviations from the reference:

* the condition text is the edit prompt followed by the new target; the reference's BART/zsRE
  setting conditions on ``"<old prediction> >> <new target> || <input>"`` (an ``EditRecord`` has
  no model prediction, and ``target_true`` is often missing).  Pass ``cond`` to
  :meth:`KE.edited_parameters` to condition on another text.
* the conditioner embeds with the base model's input embeddings, frozen (the reference copies them
  into a trainable ``nn.Embedding``): no copy of the vocabulary matrix in the editor's checkpoint.
* batches of several edits: the row/column factors are summed over the edits and ``σ(η)`` is
  averaged (EasyEdit's generalisation; the reference edits one fact at a time), with ``∇_W L`` the
  gradient of the batch's edit loss.
* the edit term of the objective is the label-smoothed NLL (``label_smoothing``, reference 0.1)
  of the new target on the edit prompt and, when the batch has one, on its rephrasing (the
  reference's ``use_views``); KL is taken at every position of the locality input, as for MEND.
* default edited parameters: the MLP input and output weights of the last three blocks (EasyEdit's
  GPT-2 XL / GPT-J KE setting); the reference (BERT, BART) edits every weight matrix except
  embeddings.
* ``torch.func.functional_call`` instead of ``higher``; weight norm through
  ``torch.nn.utils.parametrizations.weight_norm``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm
from torch.nn.utils.rnn import pack_padded_sequence
from transformers.pytorch_utils import Conv1D

from editlab.data.collate import EditBatch, PairBatch
from editlab.errors import require_float, require_int
from editlab.methods.base import EditError
from editlab.methods.hyper import (
    TrainableEditor, edit_gradients, edited_forward, locality_terms, row_gradients, target_nll,
)
from editlab.models.arch import UnknownArchitecture, arch_for, get_module

__all__ = ["KE"]


class _ReverseGrad(torch.autograd.Function):
    """Identity forward, negated gradient backward: a descent step on the input ascends."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return -grad


class _LSTMConditioner(nn.Module):
    """Bidirectional one-layer LSTM over token embeddings; the last forward state and the last
    backward state (the first token's), concatenated, through ``Linear + tanh`` (the reference's
    ``LSTMConditioner`` with allennlp's ``PytorchSeq2VecWrapper`` and ``FeedForward``)."""

    def __init__(self, embedding_dim: int, hidden_dim: int, condition_dim: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(embedding_dim, hidden_dim, num_layers=1, bidirectional=True, batch_first=True)
        self.linear = nn.Linear(2 * hidden_dim, condition_dim)

    def forward(self, embedded: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(embedded, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, (h_n, _) = self.lstm(packed)
        return torch.tanh(self.linear(torch.cat([h_n[-2], h_n[-1]], dim=-1)))


class _ConditionedParameter(nn.Module):
    """Predict the update of one parameter from the condition and the parameter's gradient (the
    reference's ``ConditionedParameter``)."""

    def __init__(self, shape: torch.Size, condition_dim: int, hidden_dim: int, max_scale: float) -> None:
        super().__init__()
        self.shape = tuple(shape)
        if len(self.shape) == 2:
            out = 2 * (self.shape[0] + self.shape[1]) + 1
        elif len(self.shape) == 1:
            out = 2 * self.shape[0] + 1
        else:
            raise EditError(f"KE edits 1-D or 2-D parameters, not shape {self.shape}")
        self.net = nn.Sequential(
            weight_norm(nn.Linear(condition_dim, hidden_dim)),
            nn.Tanh(),
            weight_norm(nn.Linear(hidden_dim, out)),
        )
        self.max_scale = max_scale

    def forward(self, condition: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        h = self.net(condition)  # [B, out]
        if len(self.shape) == 2:
            rows, cols = self.shape
            col_a, row_a, col_b, row_b, norm = h.split([cols, rows, cols, rows, 1], dim=-1)
            a = row_a.softmax(-1).t() @ col_a  # [rows, cols], summed over the edits
            b = row_b.softmax(-1).t() @ col_b
        else:
            a, b, norm = h.split([self.shape[0], self.shape[0], 1], dim=-1)
            a, b = a.sum(0), b.sum(0)
        return self.max_scale * norm.sigmoid().mean() * (grad * a + b)

    def per_row(self, condition: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """One update per edit: ``condition`` ``[B, condition_dim]`` and each edit's own gradient
        ``grads`` ``[B, rows, cols]`` give ``[B, rows, cols]``, row ``e`` equal to
        :meth:`forward` of edit ``e`` alone.  2-D parameters only."""
        rows, cols = self.shape
        h = self.net(condition)
        col_a, row_a, col_b, row_b, norm = h.split([cols, rows, cols, rows, 1], dim=-1)
        a = row_a.softmax(-1).unsqueeze(2) * col_a.unsqueeze(1)
        b = row_b.softmax(-1).unsqueeze(2) * col_b.unsqueeze(1)
        return self.max_scale * norm.sigmoid().unsqueeze(2) * (grads * a + b)


def _smoothed_nll(logits: torch.Tensor, batch: PairBatch, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Label-smoothed target NLL (the reference's ``label_smoothed_nll_loss``:
    ``(1 − ε − ε/(V−1)) · nll + ε/(V−1) · Σ_v −log p_v``), per-token mean per edit then mean over
    edits, and the teacher-forced token accuracy."""
    if eps == 0:
        return target_nll(logits, batch)
    rows, pos = batch.gather_index()
    logp = torch.log_softmax(logits[rows, pos].float(), dim=-1)
    targets = batch.target_ids[batch.target_mask]
    nll = -logp.gather(1, targets.unsqueeze(1)).squeeze(1)
    eps_i = eps / (logp.shape[-1] - 1)
    tok = (1.0 - eps - eps_i) * nll + eps_i * (-logp.sum(-1))
    n = len(batch)
    per_seq = torch.zeros(n, device=logits.device, dtype=tok.dtype).index_add(0, rows, tok)
    counts = torch.zeros(n, device=logits.device, dtype=tok.dtype).index_add(0, rows, torch.ones_like(tok))
    acc = (logp.argmax(-1) == targets).float().mean()
    return (per_seq / counts.clamp(min=1)).mean(), acc


def _condition_tokens(batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``[B, T]`` (right-padded with 0) and lengths of "prompt + new target" per edit."""
    rows = []
    for i in range(len(batch)):
        prompt = batch.input_ids[i][batch.attention_mask[i].bool()]
        target = batch.target_ids[i][batch.target_mask[i]]
        if batch.decoder_input_ids is None:
            # causal input = prompt + target[:-1]; add the last target token
            rows.append(torch.cat([prompt, target[-1:]]))
        else:
            rows.append(torch.cat([prompt, target]))
    lengths = torch.tensor([len(r) for r in rows], device=batch.input_ids.device)
    ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long, device=batch.input_ids.device)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    return ids, lengths


class KE(TrainableEditor):
    """KnowledgeEditor (see the module docstring).

    Args:
        edit_params: base-model parameters to edit (1-D or 2-D); None: the MLP input and output
            weights of the last three blocks from the architecture table.
        hidden_dim: LSTM hidden size and hidden width of each conditioned parameter's network;
            reference 128.
        condition_dim: size of the condition vector; reference 1024.
        max_scale: bound on the update scale ``max_scale · σ(η)``; reference 1.
        margin: initial KL margin of the constraint; reference ``margin_kl_max`` 1e-3.
        margin_min: lowest margin :meth:`anneal_margin` goes to; reference ``margin_kl_min`` 1e-5.
        margin_decay: factor of :meth:`anneal_margin`; reference 0.8.
        anneal_threshold: success rate above which :meth:`anneal_margin` shrinks the margin;
            reference 0.9.
        lr_multiplier: learning rate of the Lagrange multiplier; reference ``lr_alpha`` 0.1.
        multiplier_init: initial multiplier; reference 1.
        label_smoothing: of the edit term of the objective; reference ``eps`` 0.1.
        loc_positions: positions of the locality input the KL is averaged over: ``all``
            (reference) or ``answer`` (those that predict its answer, where locality is measured).
        batch_edits: records of a training batch edited together (``joint``, the reference) or
            each on its own in one batched pass of the scoring forwards (``independent``).
        base_model: name of the base model the editor is trained for (kept in checkpoints).

    The editor networks' own learning rate is the training module's ``lr`` (reference 3e-4, with
    centered RMSprop and a linear warm-up; the multiplier shares that optimiser at ``lr_alpha``).
    """

    def __init__(
        self,
        edit_params: Sequence[str] | None = None,
        hidden_dim: int = 128,
        condition_dim: int = 1024,
        max_scale: float = 1.0,
        margin: float = 1e-3,
        margin_min: float = 1e-5,
        margin_decay: float = 0.8,
        anneal_threshold: float = 0.9,
        lr_multiplier: float = 0.1,
        multiplier_init: float = 1.0,
        label_smoothing: float = 0.1,
        loc_positions: str = "all",
        batch_edits: str = "joint",
        base_model: str | None = None,
    ) -> None:
        super().__init__(edit_params, base_model=base_model, loc_positions=loc_positions,
                         batch_edits=batch_edits)
        self.hidden_dim = require_int(hidden_dim, "hidden_dim", ge=1)
        self.condition_dim = require_int(condition_dim, "condition_dim", ge=1)
        self.max_scale = require_float(max_scale, "max_scale", gt=0)
        margin = require_float(margin, "margin", ge=0)
        self.margin_min = require_float(margin_min, "margin_min", ge=0)
        self.margin_decay = require_float(margin_decay, "margin_decay", gt=0, le=1)
        self.anneal_threshold = require_float(anneal_threshold, "anneal_threshold", ge=0, le=1)
        self.lr_multiplier = require_float(lr_multiplier, "lr_multiplier", gt=0)
        multiplier_init = require_float(multiplier_init, "multiplier_init", ge=0)
        self.label_smoothing = require_float(label_smoothing, "label_smoothing", ge=0, lt=1)
        self.multiplier = nn.Parameter(torch.tensor(float(multiplier_init)))
        self.register_buffer("margin", torch.tensor(float(margin)))
        self.conditioned = nn.ModuleDict()
        self._keys: dict[str, str] = {}
        self._embeddings = ""

    # ---------------------------------------------------------------- setup
    def build(self, model: nn.Module, params: dict[str, nn.Parameter]) -> None:
        try:
            self._embeddings = arch_for(model).embeddings
        except UnknownArchitecture as err:
            raise EditError(f"KE: {err}") from err
        embedding_dim = get_module(model, self._embeddings).weight.shape[-1]
        self.conditioner = _LSTMConditioner(embedding_dim, self.hidden_dim, self.condition_dim)
        for name, param in params.items():
            key = name.replace(".", "#")
            self.conditioned[key] = _ConditionedParameter(param.shape, self.condition_dim, self.hidden_dim,
                                                          self.max_scale)
            self._keys[name] = key
        self.to(next(iter(params.values())).device)

    # ---------------------------------------------------------------- editing
    def condition(self, model: nn.Module, cond: PairBatch) -> torch.Tensor:
        """The condition vectors ``[B, condition_dim]`` of the edits in ``cond``."""
        self._check_bound()
        ids, lengths = _condition_tokens(cond)
        with torch.no_grad():
            embedded = get_module(model, self._embeddings)(ids).float()
        return self.conditioner(embedded, lengths)

    def updates(self, model: nn.Module, batch: PairBatch, cond: PairBatch | None = None) -> dict[str, torch.Tensor]:
        """The predicted updates ``ΔW`` (float32, parameter layout), differentiable w.r.t. the editor."""
        self._check_bound()
        grads = edit_gradients(model, self.edit_params, batch)
        condition = self.condition(model, cond if cond is not None else batch)
        return {n: self.conditioned[self._keys[n]](condition, grads[n].float()) for n in self.edit_params}

    def row_deltas(self, model: nn.Module, batch: PairBatch) -> dict[str, torch.Tensor]:
        """Each row's own update ``ΔW`` (``[len(batch), *shape]``), conditioned on that row
        alone and computed from its own gradient, for all rows in one forward and backward
        (:func:`~editlab.methods.hyper.row_gradients`).  Editors of 1-D parameters, or of
        weights outside linear layers, edit the rows one at a time instead."""
        self._check_bound()
        named = dict(model.named_parameters())
        linear = all(
            n.endswith(".weight") and named[n].dim() == 2
            and isinstance(get_module(model, n.rpartition(".")[0]), (nn.Linear, Conv1D))
            for n in self.edit_params
        )
        if not linear:
            return super().row_deltas(model, batch)
        grads = row_gradients(model, self.edit_params, batch, owner="KE")
        condition = self.condition(model, batch)
        return {n: self.conditioned[self._keys[n]].per_row(condition, grads[n]) for n in self.edit_params}

    def edited_parameters(self, model: nn.Module, batch: PairBatch,
                          cond: PairBatch | None = None) -> dict[str, torch.Tensor]:
        named = dict(model.named_parameters())
        return {n: named[n].detach() + d.to(named[n].dtype) for n, d in self.updates(model, batch, cond).items()}

    # ---------------------------------------------------------------- training
    def clamp_multiplier(self) -> None:
        """Project the multiplier onto ``λ ≥ 0``."""
        with torch.no_grad():
            self.multiplier.clamp_(min=0.0)

    def anneal_margin(self, success_rate: float) -> float:
        """The reference's schedule (``on_validation_epoch_end``): when more than
        ``anneal_threshold`` of the validation edits succeed, ``margin ← max(decay · margin,
        margin_min)``.  Returns the margin."""
        if success_rate > self.anneal_threshold:
            self.margin.fill_(max(float(self.margin) * self.margin_decay, self.margin_min))
        return float(self.margin)

    def optimizer_groups(self, lr: float) -> list[dict]:
        """The editor networks at ``lr`` and the multiplier at ``lr_multiplier`` without weight
        decay.  The multiplier's gradient is already reversed: a plain descent step ascends it."""
        self._check_bound()
        nets = [p for n, p in self.named_parameters() if p.requires_grad and n != "multiplier"]
        return [
            {"params": nets, "lr": lr},
            {"params": [self.multiplier], "lr": self.lr_multiplier, "weight_decay": 0.0},
        ]

    def training_losses(self, model: nn.Module, batch: EditBatch) -> dict[str, torch.Tensor]:
        """The Lagrangian ``L_edit + λ · (KL − margin)`` as ``loss``, with ``loss_edit``
        (label-smoothed NLL on the edit and its rephrasing), ``loss_loc`` (KL), ``edit_acc``,
        ``loc_acc``, ``multiplier`` and ``margin``."""
        self.clamp_multiplier()
        new = self.training_edit(model, batch)
        eps = self.label_smoothing
        logits = edited_forward(model, new, batch.edit, batch.rows_of(batch.edit))
        loss_edit, acc = _smoothed_nll(logits, batch.edit, eps)
        if batch.rephrase is not None:
            logits = edited_forward(model, new, batch.rephrase, batch.rows_of(batch.rephrase))
            loss_reph, acc_reph = _smoothed_nll(logits, batch.rephrase, eps)
            loss_edit, acc = (loss_edit + loss_reph) / 2, (acc + acc_reph) / 2
        out = {"loss_edit": loss_edit, "edit_acc": acc.detach()}
        loss = loss_edit
        if batch.locality is not None:
            kl, agree = locality_terms(model, new, batch.locality, self.loc_positions,
                                       batch.rows_of(batch.locality))
            loss = loss + _ReverseGrad.apply(self.multiplier) * (kl - self.margin)
            out.update(loss_loc=kl, loc_acc=agree)
        out.update(loss=loss, multiplier=self.multiplier.detach().clone(), margin=self.margin.detach().clone())
        return out
