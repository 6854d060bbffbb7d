"""SERAC: semi-parametric editing with a retrieval-augmented counterfactual model.

Mitchell, Lin, Bosselut, Finn, Manning 2022, "Memory-Based Model Editing at Scale" (ICML 2022);
reference repository eric-mitchell/serac (``algs/rep.py``, ``trainer.py`` ``SupervisedTrainer``,
``losses.py``; defaults in ``config/alg/rep.yaml`` and ``config/config.yaml``), ported to EasyEdit
(``easyeditor/trainer/algs/SERAC.py``, ``hparams/TRAINING/SERAC/*.yaml``, the settings of the
reference table of Yao et al. 2023).

SERAC never changes the base model.  Edits go into a memory; every query is routed:

1. a **scope classifier** scores the query against every edit in the memory.  Embedding variant
   (``cross_attend=False``, the reference's default and its zsRE/QA setting): a sentence encoder
   embeds the edit and the query and ``log p(in scope) = −scale · d``, with ``d`` the squared
   Euclidean distance of the embeddings (``square``; ``cos``: ``1 − cosine``) and ``scale`` a fixed
   buffer (1.0, as the reference registers it).  Cross-encoder variant (``cross_attend=True``, the
   reference's FEVER setting): one encoder reads ``edit [SEP] query`` and a linear head gives the
   in-scope logit.
2. if the best edit's probability exceeds ``threshold`` (0.5), a **counterfactual model** answers
   the query with that edit's text before it; otherwise the base model answers, untouched.

Both parts are trained (:meth:`SERAC.training_losses`, through
:class:`~editlab.lit.editor_train.EditorTrainModule`) with the reference's supervised objective
``c_edit · NLL_cf(target_new | edit, rephrase) + c_loc · balanced_BCE(classifier)``: the
counterfactual model learns to answer in-scope inputs (each record's rephrase, with its own edit as
context — the gold edit, as ``pos_pairs`` in the reference); the classifier sees each rephrase with
its own edit as positive and each locality input with its own record's edit as negative
(``use_all_negatives``: with every edit of the batch; ``rephrase_negatives``: also other records'
rephrases against an edit, an editlab option).  Balanced BCE averages the positive and the
negative terms separately and adds them.

Inference is :class:`~editlab.methods.conditioned.ConditionedLM` with ``models = [base,
counterfactual]`` and a router over the memory (:class:`ScopeRouter`); the memory accumulates over
a sequential stream (the session keeps it; :meth:`SERAC.compute_edit` returns the batch's records
and the same ``wrap`` every time).

**Why SERAC is a** :class:`~editlab.methods.hyper.LearnedEditor` **and not a**
:class:`~editlab.methods.hyper.TrainableEditor`: the latter turns an edit into weight updates
(MEND, KE: ``edited_parameters``, ``compute_deltas``, edit parameters of the base model).  SERAC
produces no updates; what the training module needs of it — ``bind``, ``optimizer_groups``,
``training_losses``, checkpointable parameters, ``base_model`` — is exactly
:class:`LearnedEditor`, which both kinds derive from.

The counterfactual model (``counterfactual``; the reference's ``small_name``: t5-small for T5,
distilgpt2-class models for GPT) must share the base model's tokenizer, since rows are run as token
sequences; default None: a trainable copy of the base model (SmolLM2-135M is already small).  A
counterfactual model with a smaller vocabulary than the base's (GPT-J pads its vocabulary to 50400)
has its embeddings resized to the base's size.  ``freeze_cntr=True`` (reference option) uses the
base model itself, untrained, as the counterfactual model.

Deviations from the reference, each deliberate:

* the classifier reads an edit as ``edit_template`` (``"{prompt} {target}"``) for every model; the
  reference does so for T5 and, for GPT models, cuts the last word off the prompt+label text it
  stores (an artefact of keeping the label inside the input ids).  Queries are read as the scorer
  runs them: the row's tokens decoded (prompt and, teacher-forced, the target but its last token) —
  the same text in training and in the edit loop.
* the counterfactual model's context is ``prefix_template`` (``"{prompt} {target}\\n"``) followed
  by the row's own tokens (a token concatenation, :class:`ConditionedLM`), so the scored tokens are
  exactly the base model's; the reference joins ``edit + " " + query`` as text and re-tokenises.
* encoder: the packaged offline all-MiniLM-L6-v2 (mean-pooled, L2-normalised embeddings,
  :class:`~editlab.models.encoder.SentenceEncoder`) by default; the reference's
  ``distilbert-base-cased`` ([CLS] state) is ``encoder="distilbert-base-cased"`` (then mean-pooled).
* a record without a rephrase uses its edit prompt as its in-scope input, so every batch trains
  both parts (and DDP sees a gradient for every parameter).
* the cross-encoder is the encoder's embedding and a linear head (one logit, ``logsigmoid``); the
  reference uses ``AutoModelForSequenceClassification`` with two classes.

Encoder-decoder models (T5, the reference's T5 setting: a T5 base with t5-small as the
counterfactual model): the edit's prefix goes before the query's *encoder* tokens, the decoder
input is the target's, unchanged (:class:`ConditionedLM` for seq2seq models; training builds the
same inputs with :func:`prefixed_batch`), and the classifier reads the encoder text (the prompt).
The counterfactual model must be of the same kind as the base model.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from editlab.data.collate import EditBatch, PairBatch, encode_pairs
from editlab.data.records import EditRecord
from editlab.errors import SettingError, require, require_bool, require_float, require_str
from editlab.methods.base import Edit, EditError
from editlab.methods.conditioned import ConditionedLM, default_bos
from editlab.methods.hyper import LearnedEditor
from editlab.models.arch import is_encoder_decoder
from editlab.models.encoder import SentenceEncoder
from editlab.models.loading import ModelBundle, from_pretrained
from editlab.scoring import head_logits, lm_head_input

__all__ = [
    "SERAC", "EmbeddingScope", "CrossScope", "ScopeRouter", "balanced_bce", "prefixed_batch", "prefix_ids",
    "row_texts", "target_nll_at_targets",
]

log = logging.getLogger(__name__)

_DROPOUT_RATES = ("dropout", "attention_dropout", "attn_dropout", "activation_dropout")
"""Float dropout-rate attributes of Hugging Face modules that apply dropout functionally."""

EncoderSource = str | SentenceEncoder | Callable[[], SentenceEncoder] | None
ModelSource = str | ModelBundle | nn.Module | Callable[[], ModelBundle | nn.Module] | None


# --------------------------------------------------------------------------------------------
# Scope classifiers
# --------------------------------------------------------------------------------------------


_EMBED_MEMO_SIZE = 100_000
"""Edit embeddings an :class:`EmbeddingScope` keeps for routing (about 1.5 kB each at d = 384)."""


class EmbeddingScope(nn.Module):
    """``log p(in scope | edit, query) = −scale · d(e(edit), e(query))`` (the reference's
    ``embedding_logsim_matrix``): ``d`` is the squared (``square``) or plain Euclidean distance of
    the embeddings, or ``1 − cosine`` (``cos``); ``scale`` is a fixed buffer."""

    def __init__(self, encoder: SentenceEncoder, cos: bool = False, square: bool = True, scale: float = 1.0) -> None:
        super().__init__()
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.encoder = encoder
        self.cos = cos
        self.square = square
        self.register_buffer("scale", torch.tensor(float(scale)))
        self._memo: dict[str, torch.Tensor] = {}  # edit text -> its embedding (prepare, eval mode)
        self._memo_version: tuple = ()  # (storage, version) of every parameter and buffer when filled

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        return self.encoder(**self.encoder.tokenize(list(texts))).float()

    def prepare(self, edits: Sequence[str]) -> torch.Tensor:
        """What :meth:`score` compares queries with: the edits' embeddings.

        In eval mode without gradients (routing) each edit is embedded alone, once, and kept until
        the classifier's weights change: a memory that grows by one edit per step embeds only the
        new one (the whole memory at every step made a stream's routing quadratic in its length,
        and the ever-larger encoder batches grew the process by tens of MB per edit), and an
        edit's embedding does not depend on which edits it is embedded with, so a resumed stream
        routes exactly as an uninterrupted one.  Training embeds the batch as given."""
        if self.training or torch.is_grad_enabled():
            return self.embed(edits)
        version = tuple((t.data_ptr(), t._version) for t in (*self.parameters(), *self.buffers()))
        if version != self._memo_version or len(self._memo) > _EMBED_MEMO_SIZE:
            self._memo, self._memo_version = {}, version
        for text in dict.fromkeys(edits):
            if text not in self._memo:
                self._memo[text] = self.embed([text])[0]
        return torch.stack([self._memo[text] for text in edits]) if edits else self.embed(edits)

    def score(self, prepared: torch.Tensor, queries: Sequence[str],
              pairs: torch.Tensor | None = None) -> torch.Tensor:
        """``log p`` ``[n_queries, n_edits]``, or ``[K]`` at ``pairs`` ``[K, 2]`` = (query, edit)."""
        q = self.embed(queries)
        if self.cos:
            dist = 1.0 - F.normalize(q, dim=-1) @ F.normalize(prepared, dim=-1).T
        else:
            sq = (q * q).sum(-1, keepdim=True) + (prepared * prepared).sum(-1).unsqueeze(0) - 2.0 * q @ prepared.T
            dist = sq if self.square else sq.clamp(min=1e-12).sqrt()
        logp = -dist.clamp(min=0.0) * self.scale
        return logp if pairs is None else logp[pairs[:, 0], pairs[:, 1]]


class CrossScope(nn.Module):
    """One encoder reads ``edit <sep> query``; a linear head on its embedding gives the in-scope
    logit, ``log p = logsigmoid(logit)`` (the reference's ``crossattend_logsim_matrix``)."""

    def __init__(self, encoder: SentenceEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.dim, 1)
        tok = encoder.tokenizer
        self.sep = tok.sep_token or tok.eos_token or " "

    def prepare(self, edits: Sequence[str]) -> list[str]:
        return list(edits)

    def score(self, prepared: list[str], queries: Sequence[str],
              pairs: torch.Tensor | None = None) -> torch.Tensor:
        queries = list(queries)
        if pairs is None:
            index = [(i, j) for i in range(len(queries)) for j in range(len(prepared))]
        else:
            index = [tuple(p) for p in pairs.tolist()]
        if not index:
            return torch.zeros((len(queries), len(prepared)) if pairs is None else (0,), device=self.head.weight.device)
        texts = [f"{prepared[j]}{self.sep}{queries[i]}" for i, j in index]
        logits = self.head(self.encoder(**self.encoder.tokenize(texts)).float()).squeeze(-1)
        logp = F.logsigmoid(logits)
        return logp.view(len(queries), len(prepared)) if pairs is None else logp


def balanced_bce(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The reference's balanced BCE from log-probabilities: mean(−log p) over positives plus
    mean(−log(1 − p)) over negatives (a missing class contributes 0)."""
    labels = labels.bool()
    zero = log_probs.sum() * 0.0
    pos = -log_probs[labels]
    neg = -(-torch.expm1(log_probs[~labels])).clamp(min=torch.finfo(torch.float32).eps).log()
    return (pos.mean() if pos.numel() else zero) + (neg.mean() if neg.numel() else zero)


# --------------------------------------------------------------------------------------------
# Counterfactual inputs: the edit's tokens before the row's, as ConditionedLM runs them
# --------------------------------------------------------------------------------------------


def prefix_ids(tokenizer, prefix: str) -> tuple[int, ...]:
    """A prefix as :class:`ConditionedLM` tokenises it: BOS (when the tokenizer adds one) + its tokens."""
    if not prefix:
        return ()
    bos = default_bos(tokenizer)
    return tuple(([bos] if bos is not None else []) + list(tokenizer(prefix, add_special_tokens=False)["input_ids"]))


def prefixed_batch(tokenizer, batch: PairBatch, prefixes: Sequence[str]) -> PairBatch:
    """``batch`` (right-padded) with ``prefixes[i]`` put before row ``i`` exactly as
    :class:`ConditionedLM` runs a routed row: prefix tokens, then the row's real tokens (its
    leading BOS dropped after a non-empty prefix); causal: target positions shifted accordingly;
    seq2seq: the prefix goes before the encoder input, the decoder input and positions are kept."""
    seq2seq = batch.decoder_input_ids is not None
    if len(prefixes) != len(batch):
        raise ValueError(f"{len(prefixes)} prefixes for {len(batch)} rows")
    bos = default_bos(tokenizer)
    rows, shifts = [], []
    for i, prefix in enumerate(prefixes):
        real = batch.input_ids[i][batch.attention_mask[i].bool()].tolist()
        p = list(prefix_ids(tokenizer, prefix))
        dropped = bool(p) and bos is not None and bool(real) and real[0] == bos
        rows.append(p + (real[1:] if dropped else real))
        shifts.append(len(p) - int(dropped))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    shift = torch.tensor(shifts, dtype=torch.long, device=batch.positions.device).unsqueeze(1)
    positions = (batch.positions if seq2seq
                 else torch.where(batch.target_mask, batch.positions + shift, torch.zeros_like(batch.positions)))
    device = batch.input_ids.device
    return PairBatch(input_ids=ids.to(device), attention_mask=mask.to(device), target_ids=batch.target_ids,
                     target_mask=batch.target_mask, positions=positions,
                     prompt_lengths=batch.prompt_lengths + shift.squeeze(1).to(batch.prompt_lengths.device),
                     decoder_input_ids=batch.decoder_input_ids, decoder_attention_mask=batch.decoder_attention_mask)


def target_nll_at_targets(model: nn.Module, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~editlab.methods.hyper.target_nll` of ``batch`` under ``model`` with the LM head
    applied at the target positions only (differentiable; the head of SmolLM2-135M at every
    position would cost as much as its 30 blocks)."""
    hidden = lm_head_input(model, batch)
    rows, pos = batch.gather_index()
    logp = torch.log_softmax(head_logits(model, hidden[rows, pos]).float(), dim=-1)
    targets = batch.target_ids[batch.target_mask]
    nll_tok = -logp.gather(1, targets.unsqueeze(1)).squeeze(1)
    n = len(batch)
    per_seq = torch.zeros(n, device=nll_tok.device, dtype=nll_tok.dtype).index_add(0, rows, nll_tok)
    counts = torch.zeros(n, device=nll_tok.device, dtype=nll_tok.dtype).index_add(0, rows, torch.ones_like(nll_tok))
    return (per_seq / counts.clamp(min=1)).mean(), (logp.argmax(-1) == targets).float().mean()


def row_texts(tokenizer, batch: PairBatch) -> list[str]:
    """The rows of ``batch`` as :class:`ConditionedLM`'s router sees them (real tokens, decoded)."""
    tokens = [batch.input_ids[i][batch.attention_mask[i].bool()].tolist() for i in range(len(batch))]
    return tokenizer.batch_decode(tokens, skip_special_tokens=True)


# --------------------------------------------------------------------------------------------
# Routing
# --------------------------------------------------------------------------------------------


class ScopeRouter:
    """``texts → [(model_index, prefix)]`` for a fixed memory: the counterfactual model
    (``cf_index``) with the best-scoring edit's prefix when its in-scope probability exceeds
    ``threshold``, else the base model (0) with no prefix.  The edits are prepared (embedded) once.

    ``last`` holds, after each call, the best edit index and probability per row (diagnostics).
    """

    def __init__(self, classifier: nn.Module, edit_texts: Sequence[str], prefixes: Sequence[str],
                 threshold: float = 0.5, cf_index: int = 1) -> None:
        if len(edit_texts) != len(prefixes) or not edit_texts:
            raise ValueError("the router needs one prefix per edit and at least one edit")
        self.classifier = classifier
        self.prefixes = list(prefixes)
        self.threshold = float(threshold)
        self.cf_index = cf_index
        with self._eval():
            self.prepared = classifier.prepare(list(edit_texts))
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None

    @contextlib.contextmanager
    def _eval(self) -> Iterator[None]:
        """No gradients and no dropout while routing; the classifier's mode is restored after."""
        training = self.classifier.training
        self.classifier.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.classifier.train(training)

    def __call__(self, texts: list[str]) -> list[tuple[int, str]]:
        if not texts:
            return []
        with self._eval():
            logp = self.classifier.score(self.prepared, texts)
        best, index = logp.max(dim=-1)
        prob = best.exp()
        self.last = (index.cpu(), prob.cpu())
        return [(self.cf_index, self.prefixes[j]) if p > self.threshold else (0, "")
                for j, p in zip(index.tolist(), prob.tolist())]


class _Wrap:
    """SERAC's ``Edit.wrap``: one object per editor, so a session accepts every batch's memory."""

    def __init__(self, editor: SERAC) -> None:
        self.editor = editor

    def __call__(self, model: nn.Module, memory: Sequence[EditRecord]) -> ConditionedLM:
        return self.editor.conditioned(model, memory)


# --------------------------------------------------------------------------------------------
# SERAC
# --------------------------------------------------------------------------------------------


class SERAC(LearnedEditor):
    """Scope classifier + counterfactual model over an edit memory (see the module docstring).

    Args:
        encoder: the classifier's sentence encoder (reference ``cls_name``): None = the packaged
            all-MiniLM-L6-v2, a hub id / folder, a :class:`SentenceEncoder`, or a callable that
            returns one.  Loaded by :meth:`bind`; SERAC trains it.
        cross_attend: cross-encoder classifier instead of embedding similarity (reference
            ``cross_attend: false``).
        cos, square, scale: the embedding classifier's distance (reference ``cos: false``,
            ``square: true``, ``scale`` buffer 1.0).
        counterfactual: the counterfactual model (reference ``small_name``): None = a copy of the
            base model; a hub id / folder; a ModelBundle or model; or a callable returning one
            (e.g. a ``_partial_`` packaged-model loader).  Must share the base model's tokenizer.
        freeze_cntr: use the base model itself, untrained, as the counterfactual model (reference
            ``freeze_cntr: false``).
        c_edit, c_loc: weights of the counterfactual NLL and of the classifier's balanced BCE
            (reference ``cedit: 0.1``, ``cloc: 1.0``).
        use_all_negatives: every locality input of a batch is a negative for every edit of the
            batch, not only its own record's (reference ``use_all_negatives: false``).
        rephrase_negatives: other records' in-scope inputs are negatives for an edit too (editlab;
            pairs whose edit texts are equal are skipped).
        threshold: route to the counterfactual model when the best in-scope probability exceeds it
            (reference: 0.5).
        edit_template: the classifier's text of an edit (``{prompt}``, ``{target}``).
        prefix_template: the counterfactual model's context for an edit (``{prompt}``, ``{target}``).
        dropout: dropout probability set in the encoder and the counterfactual model: every
            ``nn.Dropout`` and every float attention-dropout rate (T5's attention ``dropout``)
            (reference ``dropout: 0.0``).
        base_model: the name of the base model the editor is trained for (kept in checkpoints).
    """

    def __init__(
        self,
        encoder: EncoderSource = None,
        cross_attend: bool = False,
        cos: bool = False,
        square: bool = True,
        scale: float = 1.0,
        counterfactual: ModelSource = None,
        freeze_cntr: bool = False,
        c_edit: float = 0.1,
        c_loc: float = 1.0,
        use_all_negatives: bool = False,
        rephrase_negatives: bool = False,
        threshold: float = 0.5,
        edit_template: str = "{prompt} {target}",
        prefix_template: str = "{prompt} {target}\n",
        dropout: float = 0.0,
        base_model: str | None = None,
    ) -> None:
        super().__init__(base_model=base_model)
        require(encoder is None or (isinstance(encoder, str) and encoder != "") or callable(encoder), "encoder",
                "must be a model name or folder, a SentenceEncoder, a callable returning one, or null",
                encoder)
        self.cross_attend = require_bool(cross_attend, "cross_attend")
        self.cos = require_bool(cos, "cos")
        require(not (self.cos and self.cross_attend), "cos",
                "applies to the embedding classifier only: needs cross_attend=false", cos)
        self.square = require_bool(square, "square")
        self.scale_init = require_float(scale, "scale", gt=0)
        require(counterfactual is None or (isinstance(counterfactual, str) and counterfactual != "")
                or isinstance(counterfactual, ModelBundle) or callable(counterfactual), "counterfactual",
                "must be a model name or folder, a ModelBundle, a model, a callable returning one, or null",
                counterfactual)
        self.freeze_cntr = require_bool(freeze_cntr, "freeze_cntr")
        require(not (self.freeze_cntr and counterfactual is not None), "freeze_cntr",
                "uses the base model as the counterfactual model: leave counterfactual null", freeze_cntr)
        self.c_edit = require_float(c_edit, "c_edit", ge=0)
        self.c_loc = require_float(c_loc, "c_loc", ge=0)
        self.use_all_negatives = require_bool(use_all_negatives, "use_all_negatives")
        self.rephrase_negatives = require_bool(rephrase_negatives, "rephrase_negatives")
        self.threshold = require_float(threshold, "threshold", gt=0, lt=1)
        for name, template in (("edit_template", edit_template), ("prefix_template", prefix_template)):
            require_str(template, name)
            try:
                template.format(prompt="p", target="t")
            except (KeyError, IndexError, ValueError) as err:
                raise SettingError(name, "may only use {prompt} and {target}", template) from err
        self.edit_template = edit_template
        self.prefix_template = prefix_template
        self.dropout = require_float(dropout, "dropout", ge=0, lt=1)
        # kept in a dict, not as attributes: a module given here must not register as a submodule
        self._sources: dict[str, Any] = {"encoder": encoder, "counterfactual": counterfactual}
        self.classifier: nn.Module | None = None
        self.counterfactual: nn.Module | None = None
        self._tokenizer = None
        self._bound = False
        self._wrap = _Wrap(self)

    # ------------------------------------------------------------------ setup
    def bind(self, model: nn.Module, tokenizer=None) -> None:
        """Load the encoder and the counterfactual model (a copy of ``model`` by default) onto
        ``model``'s device.  ``tokenizer`` (the base model's) is kept for training; idempotent."""
        if tokenizer is not None:
            self._tokenizer = tokenizer
        if self._bound:
            return
        device = next(model.parameters()).device
        encoder = self._load_encoder()
        encoder.requires_grad_(True)
        pooler = getattr(encoder.model, "pooler", None)
        if isinstance(pooler, nn.Module):  # mean pooling never reads it (the reference drops it)
            pooler.requires_grad_(False)
        if self.cross_attend:
            classifier: nn.Module = CrossScope(encoder)
        else:
            classifier = EmbeddingScope(encoder, cos=self.cos, square=self.square, scale=self.scale_init)
        self.classifier = classifier
        if not self.freeze_cntr:
            cf = self._load_counterfactual(model)
            cf.requires_grad_(True)
            self.counterfactual = cf
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = self.dropout
            for name in _DROPOUT_RATES:  # attention dropout kept as a float (T5's `dropout`, Llama's)
                if isinstance(getattr(module, name, None), float):
                    setattr(module, name, float(self.dropout))
        self.to(device)
        self.train(self.training)
        self._sources = {}
        self._bound = True

    def _load_encoder(self) -> SentenceEncoder:
        source = self._sources.get("encoder")
        if source is None or isinstance(source, str):
            return SentenceEncoder.from_pretrained(source)
        if isinstance(source, SentenceEncoder):
            return source
        if callable(source):
            encoder = source()
            if not isinstance(encoder, SentenceEncoder):
                raise TypeError(f"encoder callable returned a {type(encoder).__name__}, not a SentenceEncoder")
            return encoder
        raise TypeError(f"encoder must be None, a name, a SentenceEncoder or a callable, got {type(source).__name__}")

    def _load_counterfactual(self, model: nn.Module) -> nn.Module:
        source = self._sources.get("counterfactual")
        tokenizer = None
        if source is None:
            cf = copy.deepcopy(model)
        else:
            if isinstance(source, str):
                source = from_pretrained(source, device=str(next(model.parameters()).device))
            elif callable(source) and not isinstance(source, (ModelBundle, nn.Module)):
                source = source()
            if isinstance(source, ModelBundle):
                cf, tokenizer = source.model, source.tokenizer
            elif isinstance(source, nn.Module):
                cf = source
            else:
                raise TypeError(f"counterfactual must give a ModelBundle or a model, got {type(source).__name__}")
        if is_encoder_decoder(cf) != is_encoder_decoder(model):
            kind = "an encoder-decoder" if is_encoder_decoder(model) else "a decoder-only"
            raise TypeError(f"the counterfactual model ({type(cf).__name__}) must be {kind} model, "
                            f"as the base model ({type(model).__name__})")
        if tokenizer is not None and self._tokenizer is not None:
            base_vocab = self._tokenizer.get_vocab()
            clash = [t for t, i in tokenizer.get_vocab().items() if base_vocab.get(t) != i]
            if clash:
                raise ValueError(f"the counterfactual model's tokenizer differs from the base model's "
                                 f"({len(clash)} tokens, e.g. {clash[:3]}): SERAC needs a shared tokenizer")
        size = model.get_output_embeddings().weight.shape[0]
        if cf.get_output_embeddings().weight.shape[0] < size:
            log.info("resizing the counterfactual model's vocabulary from %d to the base model's %d",
                     cf.get_output_embeddings().weight.shape[0], size)
            cf.resize_token_embeddings(size)
        elif cf.get_output_embeddings().weight.shape[0] > size:
            raise ValueError("the counterfactual model has a larger vocabulary than the base model")
        return cf

    def _check_bound(self) -> None:
        if not self._bound:
            raise EditError("SERAC is not bound to a model: call bind(model, tokenizer) first")

    # ------------------------------------------------------------------ texts
    def edit_text(self, record: EditRecord) -> str:
        return self.edit_template.format(prompt=record.prompt, target=record.target_new)

    def prefix(self, record: EditRecord) -> str:
        return self.prefix_template.format(prompt=record.prompt, target=record.target_new)

    # ------------------------------------------------------------------ editing
    def compute_edit(self, model: nn.Module, tokenizer, records: Sequence[EditRecord]) -> Edit:
        """The records go into the memory; the edited model is :meth:`conditioned`."""
        if not records:
            raise EditError("no records to edit")
        self.bind(model, tokenizer)
        self._tokenizer = tokenizer
        for i, record in enumerate(records):
            if not isinstance(record, EditRecord):
                raise EditError(f"record {i} is a {type(record).__name__}, not an EditRecord")
        return Edit(memory=tuple(records), wrap=self._wrap)

    def conditioned(self, model: nn.Module, memory: Sequence[EditRecord]) -> ConditionedLM:
        """The base ``model`` as SERAC shows it with ``memory``: a :class:`ConditionedLM` whose
        router sends in-scope rows to the counterfactual model with their edit as prefix."""
        self._check_bound()
        if self._tokenizer is None:
            raise EditError("SERAC has no tokenizer: bind(model, tokenizer) or compute_edit first")
        router = ScopeRouter(self.classifier, [self.edit_text(r) for r in memory],
                             [self.prefix(r) for r in memory], threshold=self.threshold,
                             cf_index=0 if self.freeze_cntr else 1)
        models = [model] if self.freeze_cntr else [model, self.counterfactual]
        return ConditionedLM(model, self._tokenizer, router, models=models)

    # ------------------------------------------------------------------ training
    def _cf_model(self, model: nn.Module) -> nn.Module:
        return model if self.freeze_cntr else self.counterfactual

    def training_losses(self, model: nn.Module, batch: EditBatch) -> dict[str, torch.Tensor]:
        """The reference's supervised objective on one batch (see the module docstring).

        Returns ``loss`` = ``c_edit · loss_edit + c_loc · loss_loc`` with ``loss_edit`` the
        counterfactual NLL of ``target_new`` on in-scope inputs given their own edit, ``loss_loc``
        the classifier's balanced BCE; ``edit_acc`` (counterfactual teacher-forced token accuracy),
        ``loc_acc`` (share of out-of-scope pairs classified out of scope: their rows go to the
        base model, unchanged), ``cls_acc`` (mean of the positive and negative accuracies),
        ``cls_pos_acc``.
        """
        self._check_bound()
        tok = self._tokenizer
        if tok is None:
            raise EditError("SERAC has no tokenizer: bind(model, tokenizer) first")
        records = list(batch.records)
        device = next(self.classifier.parameters()).device
        seq2seq = is_encoder_decoder(model)
        pairs_kw = {"seq2seq": seq2seq,
                    "decoder_start_token_id": getattr(model.config, "decoder_start_token_id", None) if seq2seq else None}
        # in-scope inputs (one per record) and out-of-scope locality inputs, as the scorer runs them
        inscope = encode_pairs(tok, [r.rephrase_prompts[0] if r.rephrase_prompts else r.prompt for r in records],
                               [r.target_new for r in records], **pairs_kw).to(device)
        loc_owner = [i for i, r in enumerate(records) if r.locality]
        locality = (encode_pairs(tok, [records[i].locality[0].prompt for i in loc_owner],
                                 [records[i].locality[0].target for i in loc_owner], **pairs_kw).to(device)
                    if loc_owner else None)

        # counterfactual model: NLL of the new target on the in-scope inputs, given their own edit
        cf_batch = prefixed_batch(tok, inscope, [self.prefix(r) for r in records])
        cf = self._cf_model(model)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_cntr):
            nll, acc = target_nll_at_targets(cf, cf_batch)

        # classifier: balanced BCE over (input, edit) pairs
        n = len(records)
        edits = [self.edit_text(r) for r in records]
        queries = row_texts(tok, inscope) + (row_texts(tok, locality) if locality is not None else [])
        pairs, labels = [], []
        for i in range(n):
            pairs.append((i, i))
            labels.append(1)
            if self.rephrase_negatives:
                for j in range(n):
                    if j != i and edits[j] != edits[i]:
                        pairs.append((i, j))
                        labels.append(0)
        for k, owner in enumerate(loc_owner):
            for j in (range(n) if self.use_all_negatives else (owner,)):
                pairs.append((n + k, j))
                labels.append(0)
        prepared = self.classifier.prepare(edits)
        pair_t = torch.tensor(pairs, dtype=torch.long, device=device)
        label_t = torch.tensor(labels, dtype=torch.bool, device=device)
        logp = self.classifier.score(prepared, queries, pair_t)
        bce = balanced_bce(logp, label_t)
        predicted = logp.exp() > self.threshold
        pos_acc = (predicted[label_t]).float().mean()
        neg = ~label_t
        neg_acc = (~predicted[neg]).float().mean() if neg.any() else torch.ones((), device=device)

        out = {
            "loss_edit": nll,
            "loss_loc": bce,
            "edit_acc": acc.detach(),
            "loc_acc": neg_acc.detach(),
            "cls_pos_acc": pos_acc.detach(),
            "cls_acc": ((pos_acc + neg_acc) / 2).detach(),
        }
        loss = self.c_loc * bce
        if not self.freeze_cntr:
            loss = loss + self.c_edit * nll
        out["loss"] = loss
        return out

    # ------------------------------------------------------------------ misc
    def extra_repr(self) -> str:
        kind = "cross-encoder" if self.cross_attend else ("cosine" if self.cos else "squared-L2" if self.square else "L2")
        return f"classifier={kind}, threshold={self.threshold}, freeze_cntr={self.freeze_cntr}"
