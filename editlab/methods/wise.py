"""WISE: a side memory beside one FFN value matrix, routed per input, trained edit by edit.

Wang et al. 2024, "WISE: Rethinking the Knowledge Memory for Lifelong Model Editing of Large
Language Models" (NeurIPS 2024); reference implementation zjunlp/EasyEdit
``easyeditor/models/wise`` (``WISE.py``, ``utils.py``, ``merge/gta.py``, ``wise_hparams.py``) and its
``hparams/WISE/*.yaml``, whose steps and defaults are followed (file and line references below
are to that folder).

Memories.  The *main memory* is the value (output / down) projection ``W`` of the FFN of block
``layer`` (the reference's ``inner_params``; editlab finds it with the ``mlp_out`` role of
:mod:`editlab.models.arch`).  It is never written.  The *side memory* starts as a copy of ``W`` and
is what edits train.  On an input ``x`` of that projection the *activation score* of a memory
``W'`` is (``WISE.py`` ``euc``)

    Δ(x, W') = mean over positions t of ‖ act(x_t W'ᵀ + b) − act(x_t Wᵀ + b) ‖₂

with ``act`` the model's MLP activation (``hidden_act``: SiLU for Llama / SmolLM2); for inputs
longer than 100 tokens the maximum over positions replaces the mean (``euc(..., infer=True)``).

Routing (``WISEAdapter.forward``).  Every memory ``W'`` comes with a threshold: ``act_ratio`` times
the smallest in-scope score any of its edits reached when it was trained (``EditingMeanAct.min_act``).
An input whose scores stay below the thresholds is answered by the main memory (the host's own
output, bit-exactly: the patch adds exact zeros); otherwise by the side memory with the largest
score.  ``retrieve=True`` (the default of every shipped hparams file, "WISE-Retrieve"): the
current shard is picked when its score reaches its threshold, and each earlier memory when its
score is both above its own threshold and above the best score so far.  ``retrieve=False``
("WISE-Merge"): one merged side memory plus the current shard, one threshold (the smallest
in-scope score of the whole stream); the main memory when both scores are below it, else the
memory with the larger score.

Training one edit (``WISE.edit``, ``_cal_ft_loss``, ``_cal_activation_loss``).  The edit rows are
the prompt in every context template (``"{}"`` and short generated prefixes, ``utils.py``
``get_context_templates``) followed by the target; one *irrelevant* row per record (the
reference's ``loc_prompt``: a zsRE training-set NQ question and answer, unrelated to the edit) is
appended.  All rows run through the side memory.  The loss is

    L = NLL(target | template + prompt)                                  (mean over edit rows)
      + mean₊(Δ_out − Δ_in + γ) + mean₊(Δ_out − α) + mean₊(β − Δ_in)     (act_margin = [α, β, γ])

with ``Δ_in`` the edit rows' scores, ``Δ_out`` the irrelevant row's and ``mean₊`` the mean of the
positive entries (0 when none): the edit must raise the side memory's score above ``β`` and keep
the irrelevant input below ``α``, ``γ`` apart.  Optimiser: SGD on the side weight alone,
``edit_lr`` = 1.0, weight decay 1e-5 (``WISE.py`` 160), ``n_iter`` steps with the reference's early
stop (loss ≤ 0.02 and changing by ≤ 1e-4, ``EarlyStopMeter``); each step's gradient is multiplied
by the shard's random mask (``mask_new_weight_gradient``) and after the step the side weight is
clamped to ``W ± norm_constraint`` (``_norm_constraint``).  The in-scope score of the last
iteration's forward updates the threshold (``save_editing_activation``).

Knowledge shards (``generate_activation_mask``, ``save_weight``, ``merge_weight``).  Every
``save_freq`` edits start a new shard: a fresh random mask keeping a ``mask_ratio`` fraction of the
side weight's entries trainable, and a side weight reset to ``W``; the finished shard is stored.
Every ``merge_freq`` edits the stored shards are merged as task vectors relative to ``W``
(``merge_alg``: TIES by default, ``merge/gta.py`` ``GTA('magnitude', 'sum', normalize=True)`` with
density ``densities`` = 0.53 and weights ``weights`` / n): with ``retrieve`` the last
``merge_freq / save_freq`` shards become one memory whose threshold is the smallest of theirs;
without, all stored shards are merged into the merged side memory (together with it, weight 0.6
against 0.4 for the shards, once it exists).

In editlab terms WISE is a stateful editor: its side memory is the stream state
(:attr:`Edit.state`: the current shard's weight or None while it equals ``W``, its threshold
statistic, the stored / merged memories with theirs, the edit counter), and each edit returns a
:class:`WiseAdapter` patch beside the value projection that *replaces* the previous one
(``Edit.replace``).  The adapter adds ``x W_chosenᵀ − x Wᵀ`` to the host's output for the inputs it
routes to a side memory and exact zeros for the others.

Differences from the reference, and why:

* Routing is decided per sequence (row) of a batch; the reference decides once per forward call
  of one input.  Padded positions do not enter a row's score: the session passes the adapter the
  attention mask the model was called with (``uses_attention_mask``), so a record is routed the
  same way alone or in a padded batch (teacher-forced scoring pads on the right, generation on
  the left; in cached generation each new token is scored alone, as in the reference).  The same
  holds in training (the reference averages over pads there).
* Masks are drawn from a generator seeded by ``seed`` and the shard's index (the reference:
  unseeded ``np.random``), so they are reproducible and need not be stored in the state.
* Evaluation never changes the stream: in WISE-Merge mode the reference merges pending shards into
  the side memory whenever the model is called outside an edit (``WISE.__call__``); here the
  adapter is *built* from that merge, and the stream state keeps the shards unmerged until the
  ``merge_freq``-th edit.
* Context templates come from :func:`editlab.methods.keyvalue.context_templates` (shared with
  ROME/MEMIT: seeded top-k sampling, ``"<text>. {}"``) with the reference's lengths ``[[5, 5],
  [10, 5]]`` and prompts ``I, You, Because, Yes, Q:`` (the reference decodes greedily, ``"<text> {}"``).
* Irrelevant rows come from ``irrelevant_corpus`` (default: the offline Wikipedia sample, first
  ``irrelevant_max_tokens`` tokens of each passage), taken in order edit by edit as the
  reference takes ``loc_data[i]``; never the records' own locality probes (that would train on
  what the locality metric scores).
* Edit rows end at the target's second-to-last token (the teacher-forced input
  :func:`editlab.data.collate.encode_pairs` builds); the reference's rows hold the whole target.
* The host's bias (GPT-2, GPT-J) is part of both outputs in the score; the reference leaves it out
  of the side memory's output except for GPT-2.
* With several records per edit each record's rows are scored against its own irrelevant row (the
  reference's slicing assumes one record).  ``replay`` (Appendix B.3), the ``slerp`` / ``linear``
  merges and ``objective_optimization`` other than ``only_label`` are not implemented; neither are
  encoder-decoder models (the reference edits decoder-only models).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers.activations import ACT2FN

from editlab.data.collate import encode_pairs
from editlab.data.corpora import Corpus, WikipediaSample
from editlab.data.records import EditRecord
from editlab.errors import (require, require_bool, require_choice, require_float, require_int, require_int_pairs,
                            require_list, require_strs, require_texts)
from editlab.methods.base import Edit, EditError, Editor
from editlab.methods.keyvalue import context_templates
from editlab.methods.patches import check_records, resolve_layer
from editlab.models.arch import arch_for, get_module, is_encoder_decoder
from editlab.scoring import head_nll
from editlab.tracing import CallRecorder, Trace, replay_layers

__all__ = ["WISE", "WiseAdapter", "MERGE_ALGS", "merge_task_vectors", "activation_score"]

NO_ACTIVATION = 1e9
"""Threshold statistic of a memory no edit has trained yet (``EditingMeanAct(min_a=1e9)``)."""

MERGE_ALGS: dict[str, tuple[str | None, str | None, bool]] = {
    # name: (sparsification, sign consensus, normalise) -- WISE.py merge_dict (GTA family)
    "ties": ("magnitude", "sum", True),
    "magnitude_norm": ("magnitude", None, True),
    "magnitude": ("magnitude", None, False),
    "sign": (None, "sum", True),
    "dare_ties": ("rescaled_random", "sum", False),
    "dare_linear": ("random", None, False),
}

LONG_INPUT = 100  # euc(..., infer=True): above this many positions the score is the maximum, not the mean


def activation_score(out: torch.Tensor, base: torch.Tensor, activation: str,
                     real: torch.Tensor | None = None, infer: bool = False) -> torch.Tensor:
    """Per-row activation score ``[B]`` of outputs ``out`` against the main memory's ``base``
    (both ``[B, T, d]``): the mean over positions (``real``: ``[B, T]`` bool, the positions that
    count; None: all) of ``‖act(out) − act(base)‖₂``; with ``infer``, the maximum over them for
    rows of more than 100 such positions (the reference's ``euc``)."""
    act = ACT2FN[activation]
    dist = torch.linalg.vector_norm(act(out) - act(base), dim=-1)
    real = torch.ones_like(dist, dtype=torch.bool) if real is None else real.bool()
    count = real.sum(-1)
    mean = (dist * real.to(dist.dtype)).sum(-1) / count.clamp(min=1).to(dist.dtype)
    if not infer:
        return mean
    return torch.where(count > LONG_INPUT, dist.masked_fill(~real, float("-inf")).max(dim=-1).values, mean)


def merge_task_vectors(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                       density: float, alg: str = "ties", generator: torch.Generator | None = None) -> torch.Tensor:
    """Merge ``tensors`` as task vectors ``t − base`` (``merge/gta.py`` ``GTA.execute``): sparsify
    each (magnitude: keep the ``density`` fraction of largest entries; DARE: a random ``density``
    fraction, rescaled for ``dare_ties``), weight them, keep per entry only the vectors that agree
    with the sign of the weighted sum (TIES consensus), sum, and divide by the agreeing weights
    (``normalize``)."""
    sparsify, consensus, normalize = MERGE_ALGS[alg]
    deltas = []
    for t in tensors:
        d = (t - base).float()
        if sparsify == "magnitude" and density < 1:
            k = int(density * d.numel())
            if k <= 0:
                raise ValueError(f"density {density} keeps no entry of a {d.numel()}-entry tensor")
            keep = torch.zeros(d.numel(), dtype=torch.bool, device=d.device)
            keep[torch.topk(d.abs().reshape(-1), k).indices] = True
            d = d * keep.view_as(d)
        elif sparsify in ("rescaled_random", "random") and density < 1:
            keep = torch.rand(d.shape, generator=generator, device="cpu").to(d.device) < density
            d = d * keep
            if sparsify == "rescaled_random":
                d = d / density
        deltas.append(d)
    stacked = torch.stack(deltas)
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device).view(-1, *[1] * base.dim())
    weighted = stacked * w
    if consensus == "sum":
        majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(weighted.dtype)
        agree = (weighted.sign() == majority).to(weighted.dtype)
        mixed = (weighted * agree).sum(0)
        divisor = (w * agree).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(0)
        divisor = w.sum(0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    return (base.float() + mixed).to(base.dtype)


class WiseAdapter(nn.Module):
    """The side memories beside the value projection ``host`` and the routing between them.

    Called with the host's input ``x`` (``[..., T, d_in]``), it returns, per row, ``x W'ᵀ − x Wᵀ``
    for the side memory ``W'`` the row is routed to and exact zeros for rows routed to the main
    memory, so the host's output plus this is the chosen memory's output.  ``W`` (and the bias) is
    read from the host at each call, never copied or written.

    Args:
        host: the value projection (``nn.Linear`` or GPT-2 ``Conv1D``), not registered as a child.
        transposed: the host stores its weight as ``(in, out)``.
        activation: the MLP activation used in the score (a key of ``ACT2FN``).
        retrieve: WISE-Retrieve routing (else WISE-Merge; see the module docstring).
        memories: ``(weight (out, in), threshold)`` pairs.  Retrieve: the current shard first, then
            the stored memories in order.  Merge: the merged memory first, then the current shard;
            both use the first threshold.
    """

    def __init__(self, host: nn.Module, transposed: bool, activation: str, retrieve: bool,
                 memories: Sequence[tuple[torch.Tensor | None, float]]) -> None:
        super().__init__()
        self._host = (host,)  # a plain tuple: the host is not a submodule of its own patch
        self.transposed = transposed
        self.activation = activation
        self.retrieve = retrieve
        self.thresholds: list[float] = []
        self.present: list[bool] = []
        for i, (weight, threshold) in enumerate(memories):
            present = weight is not None
            self.register_buffer(f"memory_{i}", weight.detach().to(torch.float32).clone() if present else None)
            self.thresholds.append(float(threshold))
            self.present.append(present)

    def weights(self) -> list[torch.Tensor | None]:
        return [getattr(self, f"memory_{i}") for i in range(len(self.thresholds))]

    def stream_args(self) -> dict[str, Any]:
        """The constructor's arguments but the host (a stream checkpoint rebuilds the adapter at its
        host's path: :mod:`editlab.lit.stream`)."""
        return {"transposed": self.transposed, "activation": self.activation, "retrieve": self.retrieve,
                "memories": [[None if w is None else w.detach(), t] for w, t in zip(self.weights(), self.thresholds)]}

    def _main(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        host = self._host[0]
        w = host.weight.t() if self.transposed else host.weight
        bias = getattr(host, "bias", None)
        return w, bias

    uses_attention_mask = True  # the session passes the model call's mask: pads do not vote

    def route(self, x: torch.Tensor, real: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """(choice ``[B]``: -1 = main memory, i = memory i; the memories' outputs; the main output)
        for inputs ``x`` ``[B, T, d_in]`` (float32); ``real`` ``[B, T]``: the positions that are not
        padding (None: all)."""
        w, bias = self._main()
        base = F.linear(x, w.float(), None if bias is None else bias.float())
        outs, scores = [], []
        for weight in self.weights():
            if weight is None:
                outs.append(None)
                scores.append(torch.zeros(x.shape[0], device=x.device))
                continue
            out = F.linear(x, weight, None if bias is None else bias.float())
            outs.append(out)
            scores.append(activation_score(out, base, self.activation, real=real, infer=True))
        main = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        if not scores:
            return main, outs, base
        if self.retrieve:  # WISEAdapter.forward, retrieve branch
            best = scores[0]
            choice = torch.where(best < self.thresholds[0], main, torch.zeros_like(main))
            for i in range(1, len(scores)):
                take = (scores[i] > best) & (scores[i] > self.thresholds[i])
                choice = torch.where(take, torch.full_like(main, i), choice)
                best = torch.where(take, scores[i], best)
        else:  # merge branch: [merged, current shard], one threshold
            d1, d2 = scores[0], scores[1]
            quiet = (d1 < self.thresholds[0]) & (d2 < self.thresholds[0])
            choice = torch.where(quiet, main, torch.where(d1 > d2, torch.zeros_like(main), torch.ones_like(main)))
        return choice, outs, base

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``attention_mask``: the model call's mask ``[B, past + T]`` (the session passes it); its
        last ``T`` columns mark this call's real positions, which alone are scored for routing."""
        w, _ = self._main()
        flat = x.dim() == 2
        h = (x.unsqueeze(0) if flat else x).float()
        lead = h.shape[:-2]
        h = h.reshape(-1, *h.shape[-2:])
        real = None
        if attention_mask is not None and attention_mask.shape[0] == h.shape[0] and attention_mask.shape[1] >= h.shape[1]:
            real = attention_mask[:, attention_mask.shape[1] - h.shape[1]:].to(h.device).bool()
        extra = self.combine(*self.route(h, real))
        extra = extra.reshape(*lead, *extra.shape[-2:]).to(w.dtype)
        return extra.squeeze(0) if flat else extra

    @staticmethod
    def combine(choice: torch.Tensor, outs: list[torch.Tensor | None], base: torch.Tensor) -> torch.Tensor:
        """What :meth:`forward` adds to the host's output, from :meth:`route`'s result: per row, the
        chosen memory's output minus the main one, exact zeros for rows left to the main memory."""
        extra = torch.zeros_like(base)
        for i, out in enumerate(outs):
            rows = choice == i
            if out is not None and bool(rows.any()):
                extra = torch.where(rows.view(-1, 1, 1), out - base, extra)
        return extra

    def extra_repr(self) -> str:
        kind = "retrieve" if self.retrieve else "merge"
        return f"{kind}, memories={sum(self.present)}, thresholds={[round(t, 4) for t in self.thresholds]}"


def _pos_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of the positive entries, 0 when there are none (the reference's margin losses)."""
    pos = t[t > 0]
    return pos.mean() if pos.numel() else t.new_zeros(())


_IRRELEVANT_MEMO: dict[tuple, list[str]] = {}


class WISE(Editor):
    """WISE (see the module docstring).  Constructor arguments are the reference's hyperparameters
    (``hparams/WISE/llama-7b.yaml`` defaults) plus editlab's choices of layer, templates,
    irrelevant text and seed.

    Args:
        layer: block whose FFN value projection holds the memories (negative: from the end).
        mask_ratio: fraction of the side weight's entries a shard trains.
        edit_lr: SGD learning rate on the side weight.
        n_iter: optimisation steps per edit (at most; early stop as the reference).
        norm_constraint: side weight clamped to ``W ± norm_constraint`` after each step (null: off).
        act_margin: ``[alpha, beta, gamma]`` of the activation margin losses.
        act_ratio: a memory's threshold is ``act_ratio`` × the smallest in-scope score of its edits.
        save_freq: edits per knowledge shard.
        merge_freq: edits between merges (a multiple of ``save_freq``).
        merge_alg: one of :data:`MERGE_ALGS` (``ties``).
        retrieve: WISE-Retrieve (true) or WISE-Merge (false).
        weights: total weight of the shards in a merge (``weights / n`` each).
        densities: fraction of each task vector a (TIES / DARE) merge keeps.
        weight_decay: the SGD weight decay (``WISE.py`` 160: 1e-5).
        context_template_length_params: ``[length, count]`` pairs of generated context templates.
        template_prompts: the words the templates are generated from.
        template_seed: seed of the template sample.
        irrelevant_corpus: unrelated text for the irrelevant rows (a Corpus or a list of prompts;
            default the offline Wikipedia sample).
        irrelevant_count: how many texts of the corpus are cycled through.
        irrelevant_max_tokens: each irrelevant text is cut to this many tokens.
        seed: seed of the shard masks (and of DARE merges).
    """

    stateful = True

    def __init__(
        self,
        layer: int = -5,
        mask_ratio: float = 0.2,
        edit_lr: float = 1.0,
        n_iter: int = 70,
        norm_constraint: float | None = 1.0,
        act_margin: Sequence[float] = (5.0, 20.0, 10.0),
        act_ratio: float = 0.88,
        save_freq: int = 500,
        merge_freq: int = 1000,
        merge_alg: str = "ties",
        retrieve: bool = True,
        weights: float = 1.0,
        densities: float = 0.53,
        weight_decay: float = 1e-5,
        context_template_length_params: Sequence[Sequence[int]] = ((5, 5), (10, 5)),
        template_prompts: Sequence[str] = ("I", "You", "Because", "Yes", "Q: "),
        template_seed: int = 0,
        irrelevant_corpus: Corpus | Sequence[str] | None = None,
        irrelevant_count: int = 1000,
        irrelevant_max_tokens: int = 32,
        seed: int = 0,
    ) -> None:
        self.layer = require_int(layer, "layer")
        self.mask_ratio = require_float(mask_ratio, "mask_ratio", gt=0, le=1)
        self.edit_lr = require_float(edit_lr, "edit_lr", gt=0)
        self.n_iter = require_int(n_iter, "n_iter", ge=1)
        self.norm_constraint = require_float(norm_constraint, "norm_constraint", gt=0, none=True)
        margins = require_list(act_margin, "act_margin")
        require(len(margins) == 3 and all(isinstance(m, (int, float)) and not isinstance(m, bool)
                                          and math.isfinite(m) for m in margins),
                "act_margin", "must be three finite numbers [alpha, beta, gamma]", act_margin)
        self.alpha, self.beta, self.gamma = (float(m) for m in margins)
        self.act_ratio = require_float(act_ratio, "act_ratio", gt=0)
        self.save_freq = require_int(save_freq, "save_freq", ge=1)
        self.merge_freq = require_int(merge_freq, "merge_freq", ge=1)
        require(self.merge_freq % self.save_freq == 0, "merge_freq", f"must be a multiple of save_freq "
                f"({self.save_freq}), as the reference asserts", merge_freq)
        self.merge_alg = require_choice(merge_alg, "merge_alg", MERGE_ALGS)
        self.retrieve = require_bool(retrieve, "retrieve")
        self.weights = require_float(weights, "weights", gt=0)
        self.densities = require_float(densities, "densities", gt=0, le=1)
        self.weight_decay = require_float(weight_decay, "weight_decay", ge=0)
        self.context_template_length_params = require_int_pairs(
            context_template_length_params, "context_template_length_params", ge=1)
        self.template_prompts = require_strs(template_prompts, "template_prompts")
        self.template_seed = require_int(template_seed, "template_seed")
        if irrelevant_corpus is not None and not isinstance(irrelevant_corpus, Corpus):
            require_texts(irrelevant_corpus, "irrelevant_corpus")
        self.irrelevant_corpus = irrelevant_corpus if irrelevant_corpus is not None else WikipediaSample()
        self.irrelevant_count = require_int(irrelevant_count, "irrelevant_count", ge=1)
        self.irrelevant_max_tokens = require_int(irrelevant_max_tokens, "irrelevant_max_tokens", ge=1)
        self.seed = require_int(seed, "seed")

    # ------------------------------------------------------------------ inputs
    def templates(self, model: nn.Module, tokenizer) -> list[str]:
        if not self.context_template_length_params:
            return ["{}"]
        return context_templates(model, tokenizer, self.context_template_length_params, self.template_prompts,
                                 seed=self.template_seed)

    def irrelevant_texts(self) -> list[str]:
        corpus = self.irrelevant_corpus
        if not isinstance(corpus, Corpus):
            return [t for t in corpus if t.strip()][: self.irrelevant_count]
        key = (corpus.key, self.irrelevant_count)
        if key not in _IRRELEVANT_MEMO:
            texts = []
            for text in corpus.texts():
                if text.strip():
                    texts.append(text)
                if len(texts) >= self.irrelevant_count:
                    break
            if not texts:
                raise EditError(f"WISE: irrelevant_corpus {corpus.key!r} has no text")
            _IRRELEVANT_MEMO[key] = texts
        return list(_IRRELEVANT_MEMO[key])

    def shard_mask(self, shape: torch.Size, shard: int, device: torch.device) -> torch.Tensor:
        """The trainable entries of shard ``shard`` (``mask_ratio`` of them, seeded)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + shard)
        return (torch.rand(shape, generator=gen) < self.mask_ratio).to(device)

    # ------------------------------------------------------------------- state
    def _check_state(self, state: Any, shape: tuple[int, ...]) -> dict:
        if state is None:
            return {"count": 0, "side": None, "act_min": NO_ACTIVATION, "shards": [], "merged": None, "merges": 0,
                    "retrieve": self.retrieve}
        if not isinstance(state, dict) or not {"count", "side", "act_min", "shards", "merged"} <= set(state):
            raise EditError("WISE: the stream state is not a WISE state")
        if state.get("retrieve", self.retrieve) != self.retrieve:
            raise EditError("WISE: the stream state was built with another `retrieve` setting")
        for t in [state["side"], state["merged"], *[s["weight"] for s in state["shards"]]]:
            if t is not None and tuple(t.shape) != shape:
                raise EditError(f"WISE: the stream state holds a {tuple(t.shape)} memory, the host weight is {shape}")
        return state

    def _merge_into(self, main: torch.Tensor, merged: torch.Tensor | None, tensors: list[torch.Tensor],
                    count: int) -> torch.Tensor:
        """WISE-Merge: the shards ``tensors`` merged into the merged side memory
        (``merge_weight``, not retrieve: weights / n each at first; 0.4 / n each and 0.6 for the
        merged memory once it exists)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * (count + 1))
        n = len(tensors)
        if merged is None:
            return merge_task_vectors(main, tensors, [self.weights / n] * n, self.densities, self.merge_alg, gen)
        return merge_task_vectors(main, [*tensors, merged], [0.4 / n] * n + [0.6], self.densities, self.merge_alg,
                                  gen)

    def adapter(self, model: nn.Module, state: dict) -> tuple[str, WiseAdapter]:
        """The patch (host path, :class:`WiseAdapter`) that serves ``state``: in WISE-Merge mode the
        pending shards merged in as the reference does when the model is called after editing."""
        arch = arch_for(model)
        layer = resolve_layer(model, self.layer, "WISE")
        path = arch.module_path(model, "mlp_out", layer)
        host = get_module(model, path)
        activation = arch.mlp_activation(model)
        threshold = state["act_min"] * self.act_ratio
        if self.retrieve:
            memories = [(state["side"], threshold)]
            memories += [(s["weight"], s["act_min"] * self.act_ratio) for s in state["shards"]]
        else:
            merged, side = state["merged"], state["side"]
            pending = [s["weight"] for s in state["shards"]] + ([side] if side is not None else [])
            if state["count"] >= self.save_freq and pending:  # WISE.__call__: merge before answering
                main = arch.weight_out_in(host).detach().float()
                merged, side = self._merge_into(main, merged, pending, state["count"]), None
            memories = [(merged, threshold), (side, threshold)]
        return path, WiseAdapter(host, arch.transposed, activation, self.retrieve, memories)

    # ---------------------------------------------------------------- training
    def _rows(self, tokenizer, records: Sequence[EditRecord], templates: list[str], count: int, device):
        prompts = [t.format(r.prompt) for r in records for t in templates]  # record-major
        targets = [r.target_new for r in records for _ in templates]
        try:
            batch = encode_pairs(tokenizer, prompts, targets)
        except ValueError as err:
            raise EditError(f"WISE: {err}") from err
        texts = self.irrelevant_texts()
        picked = [texts[(count * len(records) + j) % len(texts)] for j in range(len(records))]
        irr = [ids[: self.irrelevant_max_tokens] for ids in tokenizer(picked, add_special_tokens=True)["input_ids"]]
        if any(not ids for ids in irr):
            raise EditError("WISE: an irrelevant text tokenises to nothing")
        width = max(batch.input_ids.shape[1], max(len(i) for i in irr))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        n = len(prompts)
        ids = torch.full((n + len(irr), width), pad, dtype=torch.long)
        real = torch.zeros((n + len(irr), width), dtype=torch.bool)
        ids[:n, : batch.input_ids.shape[1]] = batch.input_ids
        real[:n, : batch.input_ids.shape[1]] = batch.attention_mask.bool()
        for i, row in enumerate(irr):
            ids[n + i, : len(row)] = torch.tensor(row)
            real[n + i, : len(row)] = True
        rows, positions = batch.gather_index()
        targets_ids = batch.target_ids[batch.target_mask]
        return (ids.to(device), real.to(device), rows.to(device), positions.to(device), targets_ids.to(device), n)

    def _train(self, model: nn.Module, tokenizer, records: Sequence[EditRecord], host_path: str, layer: int,
               main: torch.Tensor, bias: torch.Tensor | None, side: torch.Tensor, mask: torch.Tensor,
               count: int, activation: str) -> tuple[torch.Tensor, float, list[float]]:
        arch = arch_for(model)
        device = main.device
        templates = self.templates(model, tokenizer)
        ids, real, rows, positions, targets, n_edit = self._rows(tokenizer, records, templates, count, device)
        blocks = [arch.layer_path(i) for i in range(layer, arch.num_layers(model))]
        with torch.no_grad(), CallRecorder(model, blocks, stop_at=arch.lm_head) as rec, \
                Trace(model, [host_path], retain_input=True) as trace:
            model(input_ids=ids, attention_mask=real.long(), use_cache=False)
        if len(rec.calls) != len(blocks) or host_path not in trace.inputs:
            raise EditError(f"WISE: could not record blocks {blocks[0]}..{blocks[-1]}")
        x = trace.inputs[host_path].float()
        fbias = None if bias is None else bias.detach().float()
        base = F.linear(x, main, fbias)
        host = get_module(model, host_path)
        final_norm = get_module(model, arch.final_norm)
        n_rec, n_tpl = len(records), len(templates)
        per_row_tokens = torch.zeros(n_edit, device=device).index_add_(0, rows, torch.ones_like(rows, dtype=torch.float))

        w = side.detach().clone()
        losses: list[float] = []
        prev, last = NO_ACTIVATION, NO_ACTIVATION  # EarlyStopMeter: pre, val
        in_scope = NO_ACTIVATION
        for step in range(self.n_iter):
            w.requires_grad_(True)
            captured: dict[str, torch.Tensor] = {}

            def hook(module, args, output, _w=w):
                out = F.linear(args[0].float(), _w, fbias)
                captured["out"] = out
                return out.to(output.dtype)

            handle = host.register_forward_hook(hook)
            try:
                hidden = replay_layers(model, blocks, rec.calls, rec.calls[blocks[0]].hidden)
            finally:
                handle.remove()
            hidden = final_norm(hidden)[rows, positions]
            nll = head_nll(model, hidden, targets)
            ft = (torch.zeros(n_edit, device=device, dtype=nll.dtype).index_add(0, rows, nll) / per_row_tokens).mean()
            scores = activation_score(captured["out"], base, activation, real=real)
            act_loss = []
            for r in range(n_rec):
                d_in = scores[r * n_tpl:(r + 1) * n_tpl]
                d_out = scores[n_edit + r].view(1)
                act_loss.append(_pos_mean(d_out.view(-1, 1) - d_in + self.gamma) + _pos_mean(d_out - self.alpha)
                                + _pos_mean(self.beta - d_in))
            loss = ft + torch.stack(act_loss).mean()
            stop = abs(last - prev) <= 1e-4 and last <= 0.02
            if stop or step == self.n_iter - 1:  # save_editing_activation: this forward's in-scope score
                in_scope = float(scores[:n_edit].detach().mean())
            if stop:
                break
            (grad,) = torch.autograd.grad(loss, [w])
            with torch.no_grad():
                w = w.detach() - self.edit_lr * (grad * mask + self.weight_decay * w.detach())
                if self.norm_constraint is not None:
                    w = torch.clamp(w, min=main - self.norm_constraint, max=main + self.norm_constraint)
            prev, last = last, float(loss.detach())
            losses.append(last)
            if not math.isfinite(last):
                raise EditError("WISE: the loss became non-finite")
        return w.detach(), in_scope, losses

    # -------------------------------------------------------------------- edit
    def compute_edit(self, model: nn.Module, tokenizer, records: Sequence[EditRecord], state: Any = None) -> Edit:
        check_records(records, "WISE")
        if is_encoder_decoder(model):
            raise EditError("WISE edits decoder-only models (as the reference); this model is encoder-decoder")
        arch = arch_for(model)
        layer = resolve_layer(model, self.layer, "WISE")
        host_path = arch.module_path(model, "mlp_out", layer)
        host = get_module(model, host_path)
        main = arch.weight_out_in(host).detach().float()
        bias = getattr(host, "bias", None)
        state = self._check_state(state, tuple(main.shape))
        count = int(state["count"])
        side = state["side"].to(main.device) if state["side"] is not None else main.clone()
        mask = self.shard_mask(main.shape, count // self.save_freq, main.device)
        activation = arch.mlp_activation(model)
        with torch.enable_grad():  # the edit loop may run under no_grad
            side, in_scope, losses = self._train(model, tokenizer, records, host_path, layer, main, bias, side, mask,
                                                 count, activation)
        if not torch.isfinite(side).all():
            raise EditError("WISE: the side memory became non-finite")
        new = {
            "count": count + 1,
            "side": side.cpu(),
            "act_min": min(float(state["act_min"]), in_scope),
            "shards": list(state["shards"]),
            "merged": state["merged"],
            "merges": int(state.get("merges", 0)),
            "retrieve": self.retrieve,
            "losses": losses,
        }
        if new["count"] % self.save_freq == 0:  # save_weight: the shard is stored, a fresh one starts
            new["shards"].append({"weight": new["side"], "act_min": new["act_min"]})
            new["side"] = None
            if self.retrieve:
                new["act_min"] = NO_ACTIVATION
        if new["count"] % self.merge_freq == 0:  # merge_weight
            cpu_main = main.cpu()
            if self.retrieve:
                k = self.merge_freq // self.save_freq
                group, new["shards"] = new["shards"][-k:], new["shards"][:-k]
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * (new["count"] + 1))
                weight = merge_task_vectors(cpu_main, [s["weight"] for s in group], [self.weights / k] * k,
                                            self.densities, self.merge_alg, gen)
                new["shards"].append({"weight": weight, "act_min": min(s["act_min"] for s in group)})
            else:
                new["merged"] = self._merge_into(cpu_main, new["merged"], [s["weight"] for s in new["shards"]],
                                                 new["count"])
                new["shards"] = []
            new["merges"] += 1
        path, adapter = self.adapter(model, new)
        return Edit(patches={path: adapter.to(main.device)}, replace=True, state=new)
