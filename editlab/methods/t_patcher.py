"""T-Patcher: one trained neuron per mistake, added beside the last FFN.

Huang et al. 2023, "Transformer-Patcher: One Mistake Worth One Neuron" (ICLR 2023); reference
repository ZeroYuHuang/Transformer-Patcher (``src/models/patch.py``, ``src/utils.py``
``patch_related_args``, ``scripts/main.py``, ``scripts/T-patch.py``), whose defaults are followed.

One mistake, one neuron: a key ``k``, a bias ``b`` and a value ``v`` beside the host MLP of block
``layer`` (the last block, the paper's choice); on an input ``q`` of that MLP it adds
``act(q·k + b) v`` to the MLP's output (:class:`~editlab.methods.patches.FFNPatch`).  For generation
a mistake is a target token the model predicts wrongly under teacher forcing (the paper's
multiple-neuron patching; repository ``count_error_nums``): a record gets one neuron per wrong target token, the
first ``max_neurons_per_edit`` = 5 of them (``max_add_neuron_num``), each at its own position — a
one-token target (most of CounterFact) gets exactly one neuron, and a record the model already
answers gets none.  A single neuron could not serve a multi-token target anyway: its value is one
direction, added at every position where it fires.  The neurons are trained on the frozen model with

    L = L_edit + activation_coef · L_act + memory_coef · L_mem

* ``L_edit``: NLL of ``target_new`` after the prompt (teacher-forced, mean over target tokens).
* ``L_act``: each neuron must fire at its position: ``exp(activation_margin − a)`` of its
  pre-activation ``a = q·k + b`` there (the repository's ``top5_exp``, margin 0; the top-5 runs over
  the copies of the example in its batch, which here is one).
* ``L_mem``: the neuron must stay silent elsewhere: over a memory set of host inputs ``q_m`` of
  unrelated text, ``exp(a_m − memory_margin_silent)`` (``a_m < −3``) plus
  ``exp(a_m − a + memory_margin_edit)`` over every (memory, edit position) pair (the edit fires at
  least 3 above any memory input), each the mean of its ``memory_top_k`` largest terms (the
  repository's ``top1000_exp+top1000_exp``).  Coefficients: 1 and 10 (the repository uses 10 for
  zsRE question answering, 5 for FEVER classification).

Initialisation (repository ``use_init_weight``, ``amplify_v``): ``k = q/‖q‖²`` with ``q`` the host
input at the neuron's position (so it starts at ``q·k = 1``), ``b = 0``; the value is ``v ⊙ a``
with ``v ~ N(0, 1)`` and an elementwise amplifier ``a`` initialised to ``value_amplify`` = 10, both
trained.  Optimisation: Adam, lr 1e-2, weight decay 0.01, gradient norm clipped at 5, at most
``max_steps`` = 2000 steps; every ``check_every`` = 25 steps the edit is checked (every target
token the argmax), the learning rate is halved when the edit loss stops falling by 5%
(ReduceLROnPlateau, patience 1), and once the edit holds the memory loss is watched: training
stops at the first check where it did not improve on the best by more than ``early_stop_threshold``
(patience 1), and the neuron of the best successful check is returned.  (The repository repeats
the example 8 times per batch, which only matters with dropout; the model here is frozen in eval.)

Memory set.  The repository's memory holds the host inputs of the task's training split (40,000
vectors; the top-1000 terms enter the loss) plus the inputs of every earlier edit
(``update_memory``).  Here it holds the host inputs at every position of ``memory_tokens`` tokens of
``memory_corpus`` (by default a fixed sample of the offline Wikipedia text,
:class:`editlab.data.corpora.WikipediaSample`, packed into rows of ``memory_seq_len``; or any
:class:`~editlab.data.corpora.Corpus`; or a list of prompts), plus the ``anchors`` of the T-Patcher patches
already installed on the host: the host inputs at every target position of their edits, so that
in a sequential stream each new neuron learns to stay silent on the earlier edits' inputs
(``update_memory``).  Not the records' locality prompts: those are what the locality metric
scores, and training on them would leak the evaluation into the edit (the paper's memory is
disjoint from its test data too); Wikipedia text is general, offline and the same for every
record.  It is computed once per model and host and cached on the editor (T-Patcher's own neurons
sit at the host and do not change its inputs; a model edited in place below the host between
calls needs ``cache_memory=False``).

Gated MLPs (SwiGLU in Llama/SmolLM2/Mistral/Qwen2, GeGLU in Gemma, T5 v1.1).  A host neuron there
is ``act(g·q) (u·q)``; a T-Patcher neuron keeps the paper's single key, ``act(q·k + b)``, because
its activation and memory losses are margins on one pre-activation.  With ``activation=None`` it
uses ReLU on gated hosts — silent exactly where the memory loss pushes the pre-activation
(``< −3 < 0``), whereas SiLU would leak ``silu(−3) ≈ −0.14`` times the value on every unrelated
input — and the host's own activation on ungated ones (GELU for GPT-2/GPT-J, ReLU for T5 v1.0),
as the paper (BERT/BART's GELU, ≈ 0 below −3).

Batches and streams.  Several records in one call: the neurons of all of them in one patch, each
with its own activation and memory losses, all trained together on the joint edit loss (mean over
records of the mean target-token NLL).  Sequential editing: every call returns a new patch; the
session keeps all of them attached, and mistakes are counted on the model with the earlier
patches in place.

Speed: the host inputs and the calls of the blocks from the host's block up are recorded once;
each step replays only those blocks (one block for the last layer) and projects to the vocabulary
only at the target positions (encoder-decoder models run the full forward each step).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn
from transformers.activations import ACT2FN

from editlab.data.corpora import Corpus, WikipediaSample, batch_rows, pack_rows
from editlab.data.records import EditRecord
from editlab.errors import require, require_bool, require_float, require_int, require_texts
from editlab.methods.base import Edit, EditError, Editor
from editlab.methods.patches import FFNPatch, HostReplay, check_records, host_patches, resolve_layer
from editlab.models.arch import is_encoder_decoder
from editlab.stats import effective_seq_len, model_identity
from editlab.tracing import Trace

log = logging.getLogger(__name__)

__all__ = ["TPatcher"]

_EXP_LINEAR_FROM = 60.0  # exp(x) is continued linearly above this (a float32 overflow guard)


def _exp(x: torch.Tensor) -> torch.Tensor:
    """``exp(x)``, continued by its tangent above 60 so that no term overflows float32."""
    c = _EXP_LINEAR_FROM
    return torch.where(x < c, torch.exp(x.clamp(max=c)), torch.exp(torch.tensor(c, device=x.device)) * (1 + x - c))


def _top_mean(x: torch.Tensor, k: int) -> torch.Tensor:
    flat = x.reshape(-1)
    return flat.topk(min(k, flat.numel())).values.mean()


class TPatcher(Editor):
    """Transformer-Patcher (see the module docstring).

    Args:
        layer: block whose MLP gets the neurons (-1: the last, the paper's choice).
        max_neurons_per_edit: neurons per record at most, one per target token the model gets
            wrong, the first ones first (repository ``max_add_neuron_num`` 5).
        lr, weight_decay: Adam settings (repository: 1e-2, 0.01).
        max_steps: optimisation steps at most (repository ``max_edit_step`` 2000).
        check_every: steps between checks of the edit (repository ``check_val_every_n_epoch`` 25).
        early_stop_threshold: once the edit holds, stop when the memory loss improved by less than
            this since the best check (repository ``early_stop_editing`` thd 0.001, patience 1).
        lr_decay_factor, lr_decay_patience, lr_decay_threshold: ReduceLROnPlateau on the edit loss
            at each check (repository 0.5, 1, 0.05).
        grad_clip: gradient norm clip (repository ``gradient_clip_val`` 5.0; None: off).
        activation_coef, activation_margin, activation_top_k: ``L_act`` (1.0, 0.0, 5).
        memory_coef, memory_margin_edit, memory_margin_silent, memory_top_k: ``L_mem`` (10.0 —
            the repository's zsRE value —, 3.0, −3.0, 1000).
        value_amplify: the value is ``v ⊙ a``, ``a`` initialised to this (repository 10); None
            trains ``v`` alone.
        activation: the neuron's activation (an ``ACT2FN`` key); None: ReLU on gated hosts, the
            host's activation on ungated ones.
        memory_corpus: unrelated text for the memory set: a :class:`~editlab.data.corpora.Corpus`
            (packed rows), a list of prompts (one row each), or None for
            :class:`~editlab.data.corpora.WikipediaSample`.
        memory_tokens: memory positions at most.
        memory_seq_len: row length when packing a corpus.
        cache_memory: keep the memory set between calls (per model identity and host).
        seed: seed of the value initialisation.
    """

    def __init__(
        self,
        layer: int = -1,
        max_neurons_per_edit: int = 5,
        lr: float = 1e-2,
        weight_decay: float = 0.01,
        max_steps: int = 2000,
        check_every: int = 25,
        early_stop_threshold: float = 1e-3,
        lr_decay_factor: float = 0.5,
        lr_decay_patience: int = 1,
        lr_decay_threshold: float = 0.05,
        grad_clip: float | None = 5.0,
        activation_coef: float = 1.0,
        activation_margin: float = 0.0,
        activation_top_k: int = 5,
        memory_coef: float = 10.0,
        memory_margin_edit: float = 3.0,
        memory_margin_silent: float = -3.0,
        memory_top_k: int = 1000,
        value_amplify: float | None = 10.0,
        activation: str | None = None,
        memory_corpus: Corpus | Sequence[str] | None = None,
        memory_tokens: int = 4096,
        memory_seq_len: int = 64,
        cache_memory: bool = True,
        seed: int = 0,
    ) -> None:
        self.layer = require_int(layer, "layer")
        self.max_neurons_per_edit = require_int(max_neurons_per_edit, "max_neurons_per_edit", ge=1)
        self.lr = require_float(lr, "lr", gt=0)
        self.weight_decay = require_float(weight_decay, "weight_decay", ge=0)
        self.max_steps = require_int(max_steps, "max_steps", ge=1)
        self.check_every = require_int(check_every, "check_every", ge=1)
        self.early_stop_threshold = require_float(early_stop_threshold, "early_stop_threshold", ge=0)
        self.lr_decay_factor = require_float(lr_decay_factor, "lr_decay_factor", gt=0, lt=1)
        self.lr_decay_patience = require_int(lr_decay_patience, "lr_decay_patience", ge=0)
        self.lr_decay_threshold = require_float(lr_decay_threshold, "lr_decay_threshold", ge=0)
        self.grad_clip = require_float(grad_clip, "grad_clip", gt=0, none=True)
        self.activation_coef = require_float(activation_coef, "activation_coef", ge=0)
        self.activation_margin = require_float(activation_margin, "activation_margin")
        self.activation_top_k = require_int(activation_top_k, "activation_top_k", ge=1)
        self.memory_coef = require_float(memory_coef, "memory_coef", ge=0)
        self.memory_margin_edit = require_float(memory_margin_edit, "memory_margin_edit")
        self.memory_margin_silent = require_float(memory_margin_silent, "memory_margin_silent")
        self.memory_top_k = require_int(memory_top_k, "memory_top_k", ge=1)
        self.value_amplify = require_float(value_amplify, "value_amplify", gt=0, none=True)
        require(activation is None or (isinstance(activation, str) and activation in ACT2FN), "activation",
                "must be a key of transformers.activations.ACT2FN (relu, gelu_new, silu, ...) or null",
                activation)
        self.activation = activation
        if memory_corpus is not None and not isinstance(memory_corpus, Corpus):
            require_texts(memory_corpus, "memory_corpus")
        self.memory_corpus = memory_corpus if memory_corpus is not None else WikipediaSample()
        self.memory_tokens = require_int(memory_tokens, "memory_tokens", ge=1)
        self.memory_seq_len = require_int(memory_seq_len, "memory_seq_len", ge=1)
        self.cache_memory = require_bool(cache_memory, "cache_memory")
        self.seed = require_int(seed, "seed")
        self._memory_cache: tuple[tuple, torch.Tensor] | None = None
        self.last_steps = 0
        self.last_losses: list[float] = []

    # ------------------------------------------------------------------ memory
    def _memory_key(self, model: nn.Module, host_path: str) -> tuple:
        corpus = self.memory_corpus
        corpus_key = corpus.key if isinstance(corpus, Corpus) else tuple(corpus)
        # patches elsewhere in the model (below the host) change the host's inputs; its own do not
        others = tuple(id(m) for name, m in model.named_modules()
                       if isinstance(m, FFNPatch) and not name.startswith(host_path + "."))
        return (id(model), model_identity(model), host_path, corpus_key, self.memory_tokens,
                self.memory_seq_len, others)

    def _rows(self, model: nn.Module, tokenizer) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of (ids ``[B, L]``, real-token mask ``[B, L]``) covering the memory text."""
        corpus = self.memory_corpus
        seq_len = effective_seq_len(model, self.memory_seq_len)
        if isinstance(corpus, Corpus):
            rows = pack_rows(tokenizer, corpus.texts(), seq_len, n_tokens=self.memory_tokens)
            return [(ids, torch.ones_like(ids, dtype=torch.bool)) for ids in batch_rows(rows, 16)]
        prompts = [p for p in corpus if p and p.strip()]
        if not prompts:
            raise EditError("TPatcher: memory_corpus has no prompts")
        encoded = [ids[:seq_len] for ids in tokenizer(prompts, add_special_tokens=True)["input_ids"]]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        out, budget = [], self.memory_tokens
        for start in range(0, len(encoded), 16):
            group = [ids for ids in encoded[start:start + 16] if ids][: budget]
            if not group or budget <= 0:
                break
            width = max(len(ids) for ids in group)
            ids = torch.full((len(group), width), pad, dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.bool)
            for i, row in enumerate(group):
                ids[i, : len(row)] = torch.tensor(row)
                mask[i, : len(row)] = True
            budget -= int(mask.sum())
            out.append((ids, mask))
        return out

    @torch.no_grad()
    def memory(self, model: nn.Module, tokenizer, host_path: str) -> torch.Tensor:
        """``[M, d]`` inputs of the host MLP at every memory position (float32, model's device)."""
        key = self._memory_key(model, host_path) if self.cache_memory else None
        if key is not None and self._memory_cache is not None and self._memory_cache[0] == key:
            return self._memory_cache[1]
        device = next(model.parameters()).device
        seq2seq = is_encoder_decoder(model)
        start = getattr(model.config, "decoder_start_token_id", None) or 0
        chunks, total = [], 0
        for ids, mask in self._rows(model, tokenizer):
            ids, mask = ids.to(device), mask.to(device)
            inputs = {"input_ids": ids, "attention_mask": mask.long()}
            if seq2seq:  # the decoder reads the same text, shifted right (the host is in the decoder)
                dec = torch.cat([torch.full_like(ids[:, :1], start), ids[:, :-1]], dim=1)
                inputs.update(decoder_input_ids=dec, decoder_attention_mask=mask.long())
            with Trace(model, [host_path], retain_input=True, stop=True) as trace:
                model(**inputs, use_cache=False)
            chunks.append(trace.inputs[host_path][mask].float())
            total += chunks[-1].shape[0]
            if total >= self.memory_tokens:
                break
        if not chunks:
            raise EditError("TPatcher: the memory corpus yielded no tokens")
        memory = torch.cat(chunks)[: self.memory_tokens]
        if key is not None:
            self._memory_cache = (key, memory)
        return memory

    # ----------------------------------------------------------------- losses
    def _neuron_losses(self, pre_edit: torch.Tensor, pre_memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Activation and memory loss of one neuron from its pre-activations at the edit
        positions ``[P]`` and at the memory ``[M]``."""
        act = _top_mean(_exp(self.activation_margin - pre_edit), self.activation_top_k)
        if pre_memory.numel() == 0:
            return act, pre_edit.new_zeros(())
        above = _exp(pre_memory.unsqueeze(1) - pre_edit.unsqueeze(0) + self.memory_margin_edit)
        silent = _exp(pre_memory - self.memory_margin_silent)
        return act, _top_mean(above, self.memory_top_k) + _top_mean(silent, self.memory_top_k)

    # ---------------------------------------------------------------- compute
    def compute_edit(self, model: nn.Module, tokenizer, records: Sequence[EditRecord]) -> Edit:
        check_records(records, "TPatcher")
        layer = resolve_layer(model, self.layer, "TPatcher")
        replay = HostReplay(model, tokenizer, records, layer, "TPatcher")
        arch = replay.arch
        activation = self.activation
        if activation is None:
            activation = "relu" if arch.has_role(model, "mlp_gate", layer) else arch.mlp_activation(model)
        q_edit = replay.inputs.float()
        ids = [r.record_id for r in records]
        with torch.no_grad():  # the mistakes of the model as it is (earlier patches included)
            wrong = replay.wrong(replay.hidden(None))
        sites = []  # (record, index into the target positions) of each new neuron
        for i in range(len(records)):
            where = (replay.record_mask(i) & wrong).nonzero().flatten().tolist()
            sites.extend((i, j) for j in where[: self.max_neurons_per_edit])
        if not sites:
            log.info("TPatcher: the model already predicts the targets of records %s; nothing to patch", ids)
            return Edit()
        memory = self.memory(model, tokenizer, replay.host_path)
        anchors = [p.anchors.to(memory.device) for p in host_patches(replay.host) if p.anchors.numel()]
        memory = torch.cat([memory, *anchors]) if anchors else memory
        at = torch.tensor([j for _, j in sites], device=q_edit.device)
        q_sites = q_edit[at]  # [n, d]: each neuron's own position
        n, d = q_sites.shape
        norms = q_sites.pow(2).sum(-1, keepdim=True)
        if not torch.isfinite(q_sites).all() or (norms == 0).any():
            raise EditError(f"TPatcher: degenerate host inputs for records {ids}")
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        keys = (q_sites / norms).clone().requires_grad_(True)
        bias = torch.zeros(n, device=q_edit.device, requires_grad=True)
        value = torch.randn(n, d, generator=generator).to(q_edit.device).requires_grad_(True)
        params = [keys, bias, value]
        amp = None
        if self.value_amplify:
            amp = torch.full_like(value, float(self.value_amplify)).requires_grad_(True)
            params.append(amp)

        def values() -> torch.Tensor:
            return value * amp if amp is not None else value

        def patch_fn(h: torch.Tensor) -> torch.Tensor:
            return FFNPatch.compute(h, keys, values(), bias, None, activation)

        def aux_losses() -> tuple[torch.Tensor, torch.Tensor]:
            pre_e = FFNPatch.slot_inputs(q_sites, keys, bias).diagonal()  # each neuron at its own site
            pre_m = FFNPatch.slot_inputs(memory, keys, bias)
            acts, mems = zip(*(self._neuron_losses(pre_e[i: i + 1], pre_m[:, i]) for i in range(n)))
            return torch.stack(acts).mean(), torch.stack(mems).mean()

        opt = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="min", factor=self.lr_decay_factor, patience=self.lr_decay_patience,
            threshold=self.lr_decay_threshold)
        best: tuple[float, list[torch.Tensor]] | None = None
        self.last_losses = []
        step = 0
        with torch.enable_grad():
            for step in range(1, self.max_steps + 1):
                edit_loss = replay.nll(replay.hidden(patch_fn))
                act_loss, mem_loss = aux_losses()
                loss = edit_loss + self.activation_coef * act_loss + self.memory_coef * mem_loss
                if not torch.isfinite(loss):
                    raise EditError(f"TPatcher: loss became {loss.item()} at step {step} for records {ids}")
                self.last_losses.append(loss.item())
                grads = torch.autograd.grad(loss, params)
                for p, g in zip(params, grads):
                    p.grad = g
                if self.grad_clip is not None:
                    nn.utils.clip_grad_norm_(params, self.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if step % self.check_every and step != self.max_steps:
                    continue
                with torch.no_grad():
                    hidden = replay.hidden(patch_fn)
                    sched.step(replay.nll(hidden).item())
                    if not bool(replay.correct(hidden).all()):
                        continue
                    mem_now = aux_losses()[1].item()
                if best is not None and mem_now >= best[0] - self.early_stop_threshold:
                    break
                if best is None or mem_now < best[0]:
                    best = (mem_now, [p.detach().clone() for p in params])
        self.last_steps = step
        if best is None:
            log.warning("TPatcher: records %s not edited after %d steps; returning the last neuron", ids, step)
        else:
            with torch.no_grad():
                for p, kept in zip(params, best[1]):
                    p.copy_(kept)
        with torch.no_grad():
            patch = FFNPatch(keys=keys, values=values(), bias=bias, activation=activation, anchors=q_edit)
        if not all(torch.isfinite(t).all() for t in patch.parameters()):
            raise EditError(f"TPatcher: non-finite neuron for records {ids}")
        return Edit(patches={replay.host_path: patch})
