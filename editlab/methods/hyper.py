"""What trained (hypernetwork) editors share: the interface, the edited forward and the losses.

A :class:`TrainableEditor` is an ``nn.Module`` whose parameters are the *editor's* (MEND's gradient
transforms, KE's conditioner, ...).  Given a batch of edits it returns new values for some of the
base model's parameters, differentiably with respect to its own parameters; the base model itself
is never written to during training: the edited model is run with
:func:`torch.func.functional_call`, which substitutes the new values for the duration of one
forward.  (MEND's and KE's reference code use the ``higher`` library for this; ``higher`` is
unmaintained and patches whole modules, ``functional_call`` is part of PyTorch and substitutes only
the edited tensors.)

Training (``editlab/lit/editor_train.py``) calls :meth:`TrainableEditor.training_losses` on an
:class:`~editlab.data.collate.EditBatch`; evaluation goes through the same edit loop as every
other editor, because a trainable editor is also an :class:`~editlab.methods.base.Editor`:
:meth:`TrainableEditor.compute_deltas` returns ``new − old`` for the edited parameters.

What the training module needs of *any* editor with trained parameters — bind to the base model,
optimizer groups, training losses on an ``EditBatch``, the name of the base model — is
:class:`LearnedEditor`; :class:`TrainableEditor` is the learned editor that edits by weight
updates.  Editors that are trained but do not produce weight updates (SERAC's scope classifier and
counterfactual model, :mod:`editlab.methods.serac`) derive from :class:`LearnedEditor` directly
and return their :class:`~editlab.methods.base.Edit` from ``compute_edit``.

The default objective is MEND's (Mitchell et al. 2022, eric-mitchell/mend ``editable_model`` /
``algs/mend.py``)::

    loss = c_edit · NLL(target_new | rephrase; θ̃) + c_loc · KL(p_θ(·|loc) ‖ p_θ̃(·|loc))

with the KL taken at every position of the locality input, as MEND does (``loc_positions="all"``), or
only at the positions that predict the locality answer (``loc_positions="answer"``: the positions
EasyEdit's locality metric reads; editlab's option, not in MEND).  Which inputs the edit NLL
is taken on is ``edit_outer``: ``rephrase`` (MEND's ``data.rephrase: true``, the default),
``prompt`` (the edit input itself: MEND's ``data.rephrase: false``) or ``both`` (the mean of the
two NLLs; editlab's option, not in MEND).  Editors with another
objective (KE's constrained one) override :meth:`training_losses`.

How the records of one training batch are edited is ``batch_edits``:

* ``joint`` (MEND's training): the batch is one batch edit, the gradient of the edit loss summed
  over its records, and every record's rephrase and locality input is scored on that one edited
  model.  With one record per batch (EasyEdit's ``batch_size: 1``, accumulated) it is a single edit.
* ``independent``: every record is edited on its own, as with one record per batch, but all of
  them in one pass: the editor returns one update per record (:meth:`TrainableEditor.row_deltas`,
  a :class:`RowEdits`) and each row of the rephrase / locality inputs is run with its own record's
  update (:class:`~editlab.tracing.RowDeltas`), the KL averaged per record and then over records.
  The loss is then the mean of the single-edit losses, so a batch of ``n`` records trains as
  ``n`` accumulated single edits do, at the cost of one batched forward and backward
  (editlab's option; the normalisation statistics of MEND see the whole batch at once).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call
from transformers.pytorch_utils import Conv1D

from editlab.data.collate import EditBatch, PairBatch, encode_pairs
from editlab.data.records import EditRecord
from editlab.errors import require_choice, require_float, require_str, require_strs
from editlab.methods.base import Deltas, EditError, Editor
from editlab.models.arch import arch_for, get_module, is_encoder_decoder
from editlab.tracing import GradientFactors, RowDeltas

__all__ = [
    "locality_terms",
    "LearnedEditor",
    "TrainableEditor",
    "edited_forward",
    "edit_gradients",
    "edit_gradient_factors",
    "row_gradients",
    "target_nll",
    "locality_kl",
    "last_mlp_weights",
    "EDIT_OUTER",
    "LOC_POSITIONS",
    "BATCH_EDITS",
    "FACTOR_POSITIONS",
    "RowEdits",
]

EDIT_OUTER = ("rephrase", "prompt", "both")
LOC_POSITIONS = ("all", "answer")
BATCH_EDITS = ("joint", "independent")
FACTOR_POSITIONS = ("all", "answer")


@dataclass
class RowEdits:
    """One update per edit, applied row by row (``batch_edits="independent"``).

    ``deltas`` maps each edited weight's name to a stack ``[E, *shape]`` of ``new − old`` (float32,
    parameter layout), differentiable w.r.t. the editor; edit ``e`` is the ``e``-th record of the
    training batch.  :func:`edited_forward` runs a batch whose row ``n`` belongs to edit ``rows[n]``
    with that edit alone (:class:`~editlab.tracing.RowDeltas`)."""

    deltas: dict[str, torch.Tensor]


def edited_forward(model: nn.Module, params: dict[str, torch.Tensor] | RowEdits | None, batch: PairBatch,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of ``model`` on ``batch`` with ``params`` (name → tensor) substituted for the model's
    own parameters of those names (``None``: the model as it is).  Gradients flow into ``params``.

    ``params`` may instead be a :class:`RowEdits`: row ``n`` of ``batch`` is then run with edit
    ``rows[n]`` (``rows=None``: edit ``n``)."""
    inputs = dict(batch.model_inputs(), use_cache=False)
    if isinstance(params, RowEdits):
        with RowDeltas(model, params.deltas, rows):
            return model(**inputs).logits
    if not params:
        return model(**inputs).logits
    return functional_call(model, params, args=(), kwargs=inputs, strict=False).logits


def edit_gradients(model: nn.Module, names: Sequence[str], batch: PairBatch) -> dict[str, torch.Tensor]:
    """Gradient of the edit loss (:func:`target_nll` of ``batch`` on the unedited model) with
    respect to the parameters ``names``, without touching the model: the parameters are replaced,
    for one forward, by detached aliases that require grad (no ``requires_grad`` flag of the model
    changes, nothing is written to ``.grad``).  The result is detached."""
    named = dict(model.named_parameters())
    leaves = {n: named[n].detach().requires_grad_(True) for n in names}
    with torch.enable_grad():
        nll, _ = target_nll(edited_forward(model, leaves, batch), batch)
        grads = torch.autograd.grad(nll, list(leaves.values()), allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(leaves[n])).detach() for n, g in zip(leaves, grads)}


def edit_gradient_factors(model: nn.Module, names: Sequence[str], batch: PairBatch, owner: str = "editor",
                          params: dict[str, torch.Tensor] | None = None, positions: str = "all"
                          ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per weight in ``names`` (of linear-like modules), the rank-one factors ``(x [n, in],
    δ [n, out])`` of the gradient of the edit loss (:func:`target_nll` of ``batch`` on the
    unedited model) and, third, the batch row each factor comes from, over every position where
    ``x`` and ``δ`` are both non-zero (detached, float32).  ``Σ_t δ_t x_tᵀ`` is the exact gradient.
    ``owner`` names the caller in errors.

    ``params`` (name → tensor): values substituted for the model's own parameters of those names
    (detached), so the factors are those of the model so edited (an edit stream's accumulated
    updates) without writing it.  ``positions="answer"`` keeps only the positions whose logits
    predict a target token (MALMEN's and RLEdit's ``token: ans``; decoder-only models), and the
    sum is then the gradient restricted to them."""
    if positions not in FACTOR_POSITIONS:
        raise ValueError(f"positions must be one of {FACTOR_POSITIONS}, got {positions!r}")
    if positions == "answer" and is_encoder_decoder(model):
        raise EditError(f"{owner}: factors at answer positions need a decoder-only model")
    named = dict(model.named_parameters())
    given = {n: v.detach() for n, v in (params or {}).items()}
    leaves = {n: given.get(n, named[n]).detach().requires_grad_(True) for n in names}
    paths = {n: n.rpartition(".")[0] for n in names}
    with torch.enable_grad(), GradientFactors(model, paths.values()) as capture:
        nll, _ = target_nll(edited_forward(model, {**given, **leaves}, batch), batch)
        targets = capture.grad_targets()
        if not targets:
            raise EditError(f"{owner}: none of the modules {sorted(set(paths.values()))} ran in the forward")
        torch.autograd.grad(nll, targets, allow_unused=True)
    factors = {}
    for name, path in paths.items():
        try:
            x, delta = capture.factors(path)
        except KeyError as err:
            raise EditError(f"{owner}: {err.args[0]} (parameter {name!r})") from err
        rows = capture.factor_rows(path)
        x, delta = x.float(), delta.float()
        keep = (x != 0).any(-1) & (delta != 0).any(-1)
        if positions == "answer":
            keep &= _answer_rows(capture.inputs[path], batch, f"{owner}: parameter {name!r}")
        factors[name] = (x[keep], delta[keep], rows[keep])
    return factors


def _answer_rows(inputs: Sequence[torch.Tensor], batch: PairBatch, where: str) -> torch.Tensor:
    """For the factor rows of a module called with ``inputs`` (one ``[N, L, in]`` tensor per call),
    whether each row sits at a position whose logit predicts a target token of ``batch``."""
    answer = torch.zeros(batch.input_ids.shape, dtype=torch.bool, device=batch.input_ids.device)
    answer[batch.gather_index()] = True
    masks = []
    for x in inputs:
        if tuple(x.shape[:-1]) != tuple(answer.shape):
            raise EditError(f"{where}: the module input {tuple(x.shape)} is not laid out as the batch "
                            f"{tuple(answer.shape)}, so its answer positions are unknown")
        masks.append(answer.reshape(-1).to(x.device))
    return torch.cat(masks)


def row_gradients(model: nn.Module, names: Sequence[str], batch: PairBatch,
                  owner: str = "editor") -> dict[str, torch.Tensor]:
    """Each row's own gradient of the edit loss with respect to the weights ``names`` (of
    ``nn.Linear`` or GPT-2 ``Conv1D`` modules): ``[len(batch), *shape]``, float32, detached; row
    ``b`` holds the gradient a batch of row ``b`` alone gives (:func:`edit_gradients` of it), from
    one forward and backward of the whole batch."""
    n = len(batch)
    out = {}
    for name, (x, delta, rows) in edit_gradient_factors(model, names, batch, owner).items():
        which = torch.nn.functional.one_hot(rows, n).to(x.dtype) * n  # the loss averages over the rows
        if isinstance(get_module(model, name.rpartition(".")[0]), Conv1D):
            out[name] = torch.einsum("tb,ti,to->bio", which, x, delta)
        else:
            out[name] = torch.einsum("tb,to,ti->boi", which, delta, x)
    return out


def last_mlp_weights(model: nn.Module, n_blocks: int = 3) -> list[str]:
    """Names of the MLP input (``mlp_in``) and output (``mlp_out``) weights of the last
    ``n_blocks`` blocks (fewer when the model has fewer), from the architecture table: MEND's
    GPT-J / GPT-2 setting (``fc_in``/``fc_out``, ``c_fc``/``c_proj`` of the last three layers)."""
    spec = arch_for(model)
    total = spec.num_layers(model)
    names = []
    for layer in range(max(0, total - n_blocks), total):
        for role in ("mlp_in", "mlp_out"):
            names.append(spec.module_path(model, role, layer) + ".weight")
    return names


def target_nll(logits: torch.Tensor, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean per-token NLL of the targets of ``batch`` (averaged per sequence, then over sequences)
    and the teacher-forced token accuracy, from full logits ``[N, L, V]``."""
    rows, pos = batch.gather_index()
    logp = torch.log_softmax(logits[rows, pos].float(), dim=-1)
    targets = batch.target_ids[batch.target_mask]
    nll_tok = -logp.gather(1, targets.unsqueeze(1)).squeeze(1)
    n = len(batch)
    per_seq = torch.zeros(n, device=logits.device, dtype=nll_tok.dtype).index_add(0, rows, nll_tok)
    counts = torch.zeros(n, device=logits.device, dtype=nll_tok.dtype).index_add(0, rows, torch.ones_like(nll_tok))
    nll = (per_seq / counts.clamp(min=1)).mean()
    acc = (logp.argmax(-1) == targets).float().mean()
    return nll, acc


def locality_kl(pre_logits: torch.Tensor, post_logits: torch.Tensor, batch: PairBatch,
                positions: str = "all", per_row: bool = False) -> torch.Tensor:
    """KL(pre ‖ post), summed over the vocabulary and averaged over the positions of the locality
    input (decoder input for seq2seq models) that ``positions`` names: ``all`` real positions, as
    MEND's ``kl_loc_loss``, or the ``answer`` positions (those that predict the locality answer's
    tokens, where locality is measured).  ``per_row``: average per row first, then over rows
    (every row weighs the same, as when each row is a batch of its own)."""
    if positions == "all":
        mask = batch.decoder_attention_mask if batch.decoder_input_ids is not None else batch.attention_mask
        rows, pos = mask.bool().nonzero(as_tuple=True)
    elif positions == "answer":
        rows, pos = batch.gather_index()
    else:
        raise ValueError(f"positions must be one of {LOC_POSITIONS}, got {positions!r}")
    pre = torch.log_softmax(pre_logits[rows, pos].float(), dim=-1)
    post = torch.log_softmax(post_logits[rows, pos].float(), dim=-1)
    kl = (pre.exp() * (pre - post)).sum(-1)
    if not per_row:
        return kl.mean()
    n = len(batch)
    sums = torch.zeros(n, device=kl.device, dtype=kl.dtype).index_add(0, rows, kl)
    counts = torch.zeros(n, device=kl.device, dtype=kl.dtype).index_add(0, rows, torch.ones_like(kl))
    return (sums / counts.clamp(min=1)).mean()


def locality_terms(model: nn.Module, new: dict[str, torch.Tensor] | RowEdits, batch: PairBatch,
                   positions: str = "all", rows: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``KL(pre ‖ post)`` on the locality batch at ``positions`` (:func:`locality_kl`;
    differentiable w.r.t. ``new``) and the share of its answer positions whose argmax the edit
    leaves unchanged (detached).  With :class:`RowEdits`, row ``n`` is edited by edit ``rows[n]``
    and the KL is averaged per row, then over rows."""
    with torch.no_grad():
        pre = edited_forward(model, None, batch)
    post = edited_forward(model, new, batch, rows)
    kl = locality_kl(pre, post, batch, positions, per_row=isinstance(new, RowEdits))
    rows, pos = batch.gather_index()
    agree = (post[rows, pos].argmax(-1) == pre[rows, pos].argmax(-1)).float().mean()
    return kl, agree.detach()


class LearnedEditor(nn.Module, Editor):
    """An editor with trained parameters: what :class:`~editlab.lit.editor_train.EditorTrainModule`
    trains, checkpoints and :func:`~editlab.lit.checkpoint.load_editor` rebuilds.

    Subclasses implement :meth:`bind` (create the networks for a base model; idempotent) and
    :meth:`training_losses`, and ``compute_deltas`` or ``compute_edit`` as any
    :class:`~editlab.methods.base.Editor`.  The module's parameters and buffers are the trained
    state (all of it goes into checkpoints; the base model never does).

    Args:
        base_model: the name of the base model the editor is trained for (kept in checkpoints).
    """

    def __init__(self, base_model: str | None = None) -> None:
        nn.Module.__init__(self)
        self.base_model = require_str(base_model, "base_model", none=True)

    def apply(self, *args, **kwargs):  # type: ignore[override]
        """``nn.Module.apply(fn)`` when given one function; otherwise :meth:`Editor.apply`
        (``with editor.apply(model, tokenizer, records):`` edits the model inside the block)."""
        if len(args) == 1 and not kwargs and callable(args[0]) and not isinstance(args[0], nn.Module):
            return nn.Module.apply(self, args[0])
        return Editor.apply(self, *args, **kwargs)

    @abstractmethod
    def bind(self, model: nn.Module, tokenizer=None) -> None:
        """Build the editor's networks for ``model`` (``tokenizer``: the model's, for editors that
        tokenise text themselves).  Idempotent; called before training, before loading a state
        dict and before editing."""

    def optimizer_groups(self, lr: float) -> list[dict]:
        """Parameter groups for the training optimizer (``lr``: the base learning rate).  Editors
        with separately-tuned parameters (MEND's learned edit learning rates) override this."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr}]

    @abstractmethod
    def training_losses(self, model: nn.Module, batch: EditBatch) -> dict[str, torch.Tensor]:
        """The training objective on one batch: ``loss`` (to minimise) and any scalar parts to
        log (``loss_edit``, ``loss_loc``, ``edit_acc``, ``loc_acc`` are logged and validated by
        name; other keys are logged as ``train/<key>``)."""


class TrainableEditor(LearnedEditor):
    """A trained editor that edits by weight updates.  Subclasses define the networks and
    :meth:`edited_parameters`.

    Args:
        edit_params: names (as in ``model.named_parameters()``) of the base-model parameters the
            editor rewrites; None: :meth:`default_edit_params` of the model, resolved by
            :meth:`bind`.
        c_edit, c_loc: weights of the edit and locality losses in the default (MEND) objective.
        edit_outer: the inputs the edit loss is taken on after the edit: ``rephrase`` (MEND),
            ``prompt`` (the edit input) or ``both`` (mean of the two); a batch without rephrases
            falls back to the prompt.
        loc_positions: where the locality KL is taken: ``all`` positions of the locality input
            (MEND) or its ``answer`` positions (:func:`locality_kl`).
        batch_edits: how the records of a training batch are edited: ``joint`` (one batch edit,
            MEND) or ``independent`` (each on its own, in one batched pass; see the module
            docstring).
        base_model: the name of the base model the editor is trained for (kept in checkpoints).
    """

    def __init__(self, edit_params: Sequence[str] | None = None, c_edit: float = 0.1, c_loc: float = 1.0,
                 edit_outer: str = "rephrase", base_model: str | None = None,
                 loc_positions: str = "all", batch_edits: str = "joint") -> None:
        LearnedEditor.__init__(self, base_model=base_model)
        if edit_params is not None:
            edit_params = require_strs(edit_params, "edit_params", unique=True)
        self.edit_params: list[str] | None = edit_params
        self.c_edit = require_float(c_edit, "c_edit", ge=0)
        self.c_loc = require_float(c_loc, "c_loc", ge=0)
        self.edit_outer = require_choice(edit_outer, "edit_outer", EDIT_OUTER)
        self.loc_positions = require_choice(loc_positions, "loc_positions", LOC_POSITIONS)
        self.batch_edits = require_choice(batch_edits, "batch_edits", BATCH_EDITS)
        self._bound = False

    # ---------------------------------------------------------------- setup
    def bind(self, model: nn.Module, tokenizer=None) -> None:
        """Build the editor's networks for ``model``'s parameter shapes (``tokenizer`` is not
        needed).  Idempotent; must be called before training, before loading a state dict and
        before editing."""
        if self._bound:
            return
        names = self.edit_params if self.edit_params is not None else self.default_edit_params(model)
        named = dict(model.named_parameters())
        missing = [n for n in names if n not in named]
        if missing:
            raise EditError(f"{type(self).__name__}: the model has no parameters {missing}")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise EditError(f"{type(self).__name__}: edit_params names {duplicates} more than once")
        self.build(model, {n: named[n] for n in names})
        self.edit_params = list(names)
        self._bound = True

    def default_edit_params(self, model: nn.Module) -> list[str]:
        """The parameters edited when ``edit_params`` is None: the MLP input and output weights
        of the last three blocks (:func:`last_mlp_weights`)."""
        return last_mlp_weights(model, 3)

    def _check_bound(self) -> None:
        if not self._bound:
            raise EditError(f"{type(self).__name__} is not bound to a model: call bind(model) first")

    @abstractmethod
    def build(self, model: nn.Module, params: dict[str, nn.Parameter]) -> None:
        """Create the editor's sub-modules for the edited parameters ``params``."""

    # ---------------------------------------------------------------- editing
    @abstractmethod
    def edited_parameters(self, model: nn.Module, batch: PairBatch,
                          cond: PairBatch | None = None) -> dict[str, torch.Tensor]:
        """New values of :attr:`edit_params` that install the edits of ``batch`` (prompt →
        ``target_new``, teacher-forced), differentiable w.r.t. the editor's parameters.
        ``cond`` is the conditioning text where the editor reads one (KE)."""

    def encode(self, tokenizer, model: nn.Module, records: Sequence[EditRecord]) -> PairBatch:
        seq2seq = is_encoder_decoder(model)
        start = getattr(model.config, "decoder_start_token_id", None) if seq2seq else None
        return encode_pairs(tokenizer, [r.prompt for r in records], [r.target_new for r in records],
                            seq2seq=seq2seq, decoder_start_token_id=start)

    def compute_deltas(self, model: nn.Module, tokenizer, records: Sequence[EditRecord]) -> Deltas:
        if not records:
            raise EditError("no records to edit")
        self.bind(model)
        device = next(model.parameters()).device
        batch = self.encode(tokenizer, model, records).to(device)
        was_training = self.training
        self.eval()
        try:
            with torch.enable_grad():  # editors read the base model's gradient on the edit
                new = self.edited_parameters(model, batch)
        finally:
            self.train(was_training)
        named = dict(model.named_parameters())
        deltas = {n: (v.detach() - named[n].detach()).to(named[n].dtype) for n, v in new.items()}
        for n, d in deltas.items():
            if not torch.isfinite(d).all():
                raise EditError(f"{type(self).__name__}: non-finite update for {n!r}")
        return deltas

    def row_deltas(self, model: nn.Module, batch: PairBatch) -> dict[str, torch.Tensor]:
        """One update per row of ``batch``, each installing that row's edit alone: name →
        ``[len(batch), *shape]`` of ``new − old`` (float32), differentiable w.r.t. the editor.
        This default edits the rows one at a time with :meth:`edited_parameters`; editors that
        can compute all of them in one pass (MEND, KE) override it."""
        named = dict(model.named_parameters())
        per_row = []
        for i in range(len(batch)):
            new = self.edited_parameters(model, batch.select([i]))
            per_row.append({n: v.float() - named[n].detach().float() for n, v in new.items()})
        return {n: torch.stack([d[n] for d in per_row]) for n in per_row[0]}

    # ---------------------------------------------------------------- training
    def training_edit(self, model: nn.Module, batch: EditBatch) -> dict[str, torch.Tensor] | RowEdits:
        """The edit of a training batch, by ``batch_edits``: the new parameter values of one batch
        edit (``joint``) or a :class:`RowEdits` of one update per record (``independent``)."""
        if self.batch_edits == "independent":
            return RowEdits(self.row_deltas(model, batch.edit))
        return self.edited_parameters(model, batch.edit)

    def training_losses(self, model: nn.Module, batch: EditBatch) -> dict[str, torch.Tensor]:
        """MEND's objective on one training batch; returns ``loss`` (to minimise) and the parts
        (``loss_edit``, ``loss_loc``, ``edit_acc``, ``loc_acc``: accuracies are teacher-forced)."""
        new = self.training_edit(model, batch)
        nll, acc = self.outer_nll(model, new, batch)
        out = {"loss_edit": nll, "edit_acc": acc.detach()}
        loss = self.c_edit * nll
        if batch.locality is not None:
            kl, agree = locality_terms(model, new, batch.locality, self.loc_positions,
                                       batch.rows_of(batch.locality))
            out.update(loss_loc=kl, loc_acc=agree)
            loss = loss + self.c_loc * kl
        out["loss"] = loss
        return out

    def outer_batches(self, batch: EditBatch) -> list[PairBatch]:
        """The batches the edit loss is taken on (``edit_outer``): the rephrases, the edit prompts,
        or both; the prompts when the batch has no rephrases."""
        outer = []
        if self.edit_outer in ("rephrase", "both") and batch.rephrase is not None:
            outer.append(batch.rephrase)
        if self.edit_outer in ("prompt", "both") or not outer:
            outer.append(batch.edit)
        return outer

    def outer_nll(self, model: nn.Module, new: dict[str, torch.Tensor] | RowEdits,
                  batch: EditBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Post-edit NLL of ``target_new`` and its teacher-forced accuracy, each the mean over
        :meth:`outer_batches`."""
        parts = [target_nll(edited_forward(model, new, b, batch.rows_of(b)), b)
                 for b in self.outer_batches(batch)]
        nll = torch.stack([p[0] for p in parts]).mean()
        acc = torch.stack([p[1] for p in parts]).mean()
        return nll, acc
