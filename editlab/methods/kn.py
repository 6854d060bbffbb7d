"""KN: Knowledge Neurons (attribute the old fact to FFN neurons, then rewrite their value vectors).

Dai et al. 2022, "Knowledge Neurons in Pretrained Transformers" (ACL), as run by EasyEdit
(zjunlp/EasyEdit ``easyeditor/models/kn``, which wraps EleutherAI/knowledge-neurons).  Defaults follow
EasyEdit's ``hparams/KN`` files for GPT-2 XL / GPT-J / Llama: ``steps`` 20 and ``batch_size`` 20
(GPT-2 XL, GPT-J), ``adaptive_threshold`` 0.2 (GPT-2 XL, Llama; GPT-J 0.1), ``refine`` false,
``p`` 0.4.  (EasyEdit's Llama files set ``steps: 1``, i.e. one IG point at α = 0; we keep 20 for every
model, which the batched attribution below makes affordable.  ``lr_scale`` and ``n_toks`` appear in
those files but EasyEdit's KN never reads them, so they are not hyperparameters here.)

Procedure, per record:

1. **Attribution** (integrated gradients, zero baseline): for every layer l and FFN neuron i, the
   attribution of the *old* answer (``target_true``) is ``a_i · Σ_k w_k ∂P(y | α_k a)/∂a_i``, where
   ``a`` is layer l's clean intermediate activation (the input of the ``mlp_out`` projection: GPT-2
   ``c_proj``, Llama ``down_proj``, ...) at the position that predicts the answer, only that layer's
   activation at that position is scaled, and ``P`` is the softmax probability of the answer token.
   The reference's points: ``α_k = linspace(0, 1, steps)``, ``w_k = 1/steps`` (``riemann="linspace"``);
   ``riemann="midpoint"`` uses ``α_k = (k + ½)/steps`` (a better quadrature).
2. **Selection**: coarse neurons are those whose attribution exceeds ``adaptive_threshold`` × the
   largest attribution of that prompt over all layers and neurons (strictly, as the reference).
   With ``refine``, the record's prompt and its ``rephrase_prompts`` are attributed and only neurons
   that are coarse for more than ``p`` × (number of prompts) of them are kept; without it (the
   default, like EasyEdit, which passes the edit prompt alone) the edit prompt's coarse neurons are
   used.
3. **Edit**: for each selected neuron (l, i), column i of layer l's ``mlp_out`` weight (its value
   vector, in (out, in) layout) gets ``new_scale · E[new] − old_scale · E[old]``, where ``E`` is the
   input-embedding matrix.  Scales 2 and 2 are knowledge-neurons' (``modify_weights``,
   ``mode="edit"``, single-token path).  (EasyEdit's copy indexes the embedding with the answer's
   token *list*, so in practice it adds each token of the un-spaced new answer once — for Llama
   BOS included — and subtracts the greedy prediction twice, or each greedy token once when it
   generates several.)
   ``new`` is the first token of ``target_text(target_new)`` and ``old`` the first token of
   ``target_text(target_true)`` — both as they follow the prompt (:func:`encode_pairs`; for byte-level
   BPE that is the target tokenised alone without special tokens).  ``old_token="argmax"`` uses the
   model's top-1 prediction at the prompt instead, which is what the reference subtracts.
   Deltas of several records are summed.

Deviations from the reference, on purpose:

* **Which activation.**  knowledge-neurons patches the *output* of the first FFN projection (GPT-2
  ``c_fc``, i.e. before GELU; Llama ``gate_proj``, before SiLU and without the ``up_proj`` factor).
  We attribute the input of ``mlp_out`` — the activation that actually weights value vector i, the
  paper's "intermediate neuron" — which is the same quantity for BERT, the paper's model.
* **Multi-token answers.**  knowledge-neurons attributes every answer token at the *last* position of
  a prompt it extends with the model's own greedy tokens (for GPT-2 it does not even re-tokenise, so
  every token is read at the last prompt position) and averages; it also tokenises the answer without
  its leading space (and, for Llama, with BOS).  We attribute each token of ``target_text(target_true)``
  at its own position with the *gold* earlier tokens in the input (teacher forcing, as the metrics
  score it) and average the per-token attributions.  The edit uses the first token of each answer
  only, with the single-token scales (see 3.).
* **Non-positive maximum.**  When every attribution of a prompt is ≤ 0 no neuron is coarse (the
  reference's ``max × threshold`` would then select almost every neuron).
* Decoder-only models only; encoder-decoder models (T5) raise :class:`EditError`.

Speed: changing layer l's activation at the last position changes only that position, and only in
layers ≥ l (causal attention).  So the prompt prefix runs once into a KV cache, one single-token pass
records every block's call arguments and clean activations, and then all (layer, α) pairs are
evaluated together as single-token rows attending to the prefix cache: the rows for layer l join the
batch at block l (entering with the clean block input, their layer-l activation replaced by the leaf
tensor ``α·a``), so the blocks below l never run for them; α = 1 is the clean forward for every layer
and is one shared row (a zero perturbation per layer carries its gradients).  The vocabulary
projection is applied to the answer-predicting rows only, its gradient is formed directly, and one
backward pass yields the gradients of every layer.  ``batch_size`` IG points are evaluated per pass,
which bounds memory.  For SmolLM2-135M (30 blocks, 20 steps) that is about 8.9k row-blocks and 581
head rows per answer token — roughly 190 GFLOP forward + backward, about half of what one full
single-token forward per (layer, α) row would cost, and a small fraction of the reference's one
full-sequence forward per (layer, α).
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections import Counter
from collections.abc import Sequence

import torch
from torch import nn
from transformers import Cache, DynamicCache

from editlab.data.collate import encode_pairs
from editlab.data.records import EditRecord
from editlab.errors import require_bool, require_choice, require_float, require_int
from editlab.methods.base import Deltas, EditError, Editor
from editlab.models.arch import ArchSpec, arch_for, get_module, get_parameter, is_encoder_decoder
from editlab.scoring import head_logits
from editlab.tracing import CallRecorder, LayerCall, Trace, first_tensor

log = logging.getLogger(__name__)

__all__ = ["KN"]

RIEMANN = ("linspace", "midpoint")
OLD_TOKENS = ("target_true", "argmax")

Neuron = tuple[int, int]


class KN(Editor):
    """Knowledge Neurons: integrated-gradient attribution of the old fact, then value-vector rewrite.

    Args:
        steps: integrated-gradient points per layer (``m`` in the paper).
        batch_size: IG points evaluated per forward/backward pass (bounds memory; the reference's
            ``batch_size`` has the same role).
        adaptive_threshold: coarse neurons have attribution > this × the prompt's maximum.
        refine: keep only neurons shared by more than ``p`` of the prompts (edit prompt +
            ``rephrase_prompts``); False uses the edit prompt alone.
        p: sharing fraction for ``refine``.
        old_scale / new_scale: multiples of the old / new answer's input embedding subtracted from /
            added to each selected value vector.
        old_token: ``target_true`` (first token of the old answer) or ``argmax`` (the model's top-1
            prediction at the prompt, the reference's choice).
        riemann: IG points: ``linspace`` (reference) or ``midpoint``.
    """

    def __init__(
        self,
        steps: int = 20,
        batch_size: int = 20,
        adaptive_threshold: float = 0.2,
        refine: bool = False,
        p: float = 0.4,
        old_scale: float = 2.0,
        new_scale: float = 2.0,
        old_token: str = "target_true",
        riemann: str = "linspace",
    ) -> None:
        self.steps = require_int(steps, "steps", ge=1)
        self.batch_size = require_int(batch_size, "batch_size", ge=1)
        self.adaptive_threshold = require_float(adaptive_threshold, "adaptive_threshold", ge=0, lt=1)
        self.refine = require_bool(refine, "refine")
        self.p = require_float(p, "p", ge=0, lt=1)
        self.old_scale = require_float(old_scale, "old_scale", ge=0)
        self.new_scale = require_float(new_scale, "new_scale", ge=0)
        self.old_token = require_choice(old_token, "old_token", OLD_TOKENS)
        self.riemann = require_choice(riemann, "riemann", RIEMANN)
        self.last_neurons: dict[int | str, list[Neuron]] = {}

    # ------------------------------------------------------------ attribution
    def points(self) -> tuple[torch.Tensor, torch.Tensor]:
        """IG scales ``α_k`` and their weights ``w_k`` (float64)."""
        m = self.steps
        if self.riemann == "linspace":
            alphas = torch.linspace(0.0, 1.0, m, dtype=torch.float64)
        else:
            alphas = (torch.arange(m, dtype=torch.float64) + 0.5) / m
        return alphas, torch.full((m,), 1.0 / m, dtype=torch.float64)

    def attribute(self, model: nn.Module, tokenizer, prompt: str, target: str) -> list[torch.Tensor]:
        """Per-layer attributions ``[d_ff]`` (float32, CPU) of ``target`` after ``prompt``, averaged
        over the target's tokens (each at its own position, gold earlier tokens in the input)."""
        arch = _decoder_arch(model)
        batch = encode_pairs(tokenizer, [prompt], [target])
        n_prompt = int(batch.prompt_lengths[0])
        targets = batch.target_ids[0][batch.target_mask[0]].tolist()
        ids = batch.input_ids[0]
        total: list[torch.Tensor] | None = None
        for j, token in enumerate(targets):
            scores = self._attribute_position(model, arch, ids[: n_prompt + j], token)
            total = scores if total is None else [t + s for t, s in zip(total, scores)]
        assert total is not None
        return [t / len(targets) for t in total]

    def _attribute_position(
        self, model: nn.Module, arch: ArchSpec, ids: torch.Tensor, target: int
    ) -> list[torch.Tensor]:
        """IG attributions of P(``target``) at the last position of ``ids`` for every layer."""
        device = next(model.parameters()).device
        ids = ids.to(device).unsqueeze(0)
        n_layers = arch.num_layers(model)
        blocks = [arch.layer_path(layer) for layer in range(n_layers)]
        outs = [arch.module_path(model, "mlp_out", layer) for layer in range(n_layers)]
        cache_kw = _cache_kwarg(model)

        # 1. the prefix once, into a KV cache (the LM head is never applied)
        prefix = DynamicCache(config=model.config)
        with torch.no_grad():
            if ids.shape[1] > 1:
                with CallRecorder(model, [], stop_at=arch.lm_head):
                    model(input_ids=ids[:, :-1], use_cache=True, **{cache_kw: prefix})
            # 2. the last token alone: every block's call arguments and clean FFN activations
            with CallRecorder(model, blocks, stop_at=arch.lm_head) as rec, \
                    Trace(model, outs, retain_input=True) as tr:
                model(input_ids=ids[:, -1:], use_cache=True, **{cache_kw: copy.deepcopy(prefix)})
        if len(rec.calls) != n_layers or len(tr.inputs) != n_layers:
            raise EditError("KN could not record every block's call; is this a decoder-only model?")
        calls = [rec.calls[b] for b in blocks]
        acts = [tr.inputs[o][0, -1] for o in outs]
        prefix_kv = [_layer_kv(prefix, layer) for layer in range(n_layers)]

        # 3. all (layer, α) rows, batch_size α values per pass
        alphas, weights = self.points()
        grads = [torch.zeros_like(a, dtype=torch.float64) for a in acts]
        for lo in range(0, self.steps, self.batch_size):
            chunk = slice(lo, min(self.steps, lo + self.batch_size))
            a_chunk, w_chunk = alphas[chunk], weights[chunk]
            chunk_grads = self._rows(model, arch, blocks, outs, calls, acts, prefix_kv, a_chunk, target)
            for layer, g in enumerate(chunk_grads):
                grads[layer] += (w_chunk.to(g.device).unsqueeze(1) * g.double()).sum(0)
        return [(g * a.double()).float().cpu() for g, a in zip(grads, acts)]

    def _rows(
        self,
        model: nn.Module,
        arch: ArchSpec,
        blocks: list[str],
        outs: list[str],
        calls: list[LayerCall],
        acts: list[torch.Tensor],
        prefix_kv: list[tuple[torch.Tensor, torch.Tensor] | None],
        alphas: torch.Tensor,
        target: int,
    ) -> list[torch.Tensor]:
        """``∂P/∂(α a_l)`` for every layer l and α in ``alphas``: ``[len(alphas), d_ff]`` per layer.

        Rows for (l, α) join the batch at block l.  α = 1 is the clean forward for every layer, so it
        is one shared row that runs from block 0.
        """
        is_one = alphas == 1.0
        shared = bool(is_one.any())
        scaled = alphas[~is_one]
        k = len(scaled)
        leaves = [
            (scaled.to(device=a.device, dtype=a.dtype).unsqueeze(1) * a.unsqueeze(0)).requires_grad_(True)
            for a in acts
        ]
        # the shared row gets a zero perturbation at each layer: its gradient is ∂P/∂a_l, with the
        # dependence of the layers above on a_l intact
        clean = [torch.zeros_like(a).unsqueeze(0).requires_grad_(True) for a in acts] if shared else []
        current = {"layer": -1}
        layer_of = {path: layer for layer, path in enumerate(outs)}

        def substitute(path: str, x: torch.Tensor) -> torch.Tensor:
            layer = layer_of[path]
            if layer != current["layer"]:
                return x
            shape = (-1, *([1] * (x.dim() - 2)), x.shape[-1])
            parts = []
            if shared:  # row 0: the clean row
                parts.append(x[:1] + clean[layer].to(x.dtype).reshape(shape))
            parts.append(x[int(shared): x.shape[0] - k])
            if k:  # the rows that joined at this block are the last k: their activation is the leaf
                parts.append(leaves[layer].to(x.dtype).reshape(shape))
            return torch.cat(parts, dim=0)

        hidden: torch.Tensor | None = None
        with torch.enable_grad(), Trace(model, outs, edit_input=substitute):
            for layer, (path, call) in enumerate(zip(blocks, calls)):
                joining = call.hidden.expand(k + (shared and layer == 0), *call.hidden.shape[1:])
                hidden = joining if hidden is None else torch.cat([hidden, joining], dim=0)
                args, kwargs = call.with_hidden(hidden)
                args, kwargs = _with_cache(args, kwargs, prefix_kv[layer], layer, hidden.shape[0])
                current["layer"] = layer
                hidden = first_tensor(get_module(model, path)(*args, **kwargs))
            assert hidden is not None
            final = get_module(model, arch.final_norm)(hidden[:, -1])
            # ∂P/∂(LM-head input) of every row, computed directly, then one backward from there
            head_grad = _prob_grad(model, arch, final.detach(), target)
            grads = torch.autograd.grad(final, (leaves if k else []) + clean, grad_outputs=head_grad)
        scaled_grads, clean_grads = (grads[: len(acts)], grads[len(acts):]) if k else ([], grads)
        out = []
        for layer, act in enumerate(acts):
            g = torch.empty(len(alphas), act.shape[0], dtype=act.dtype, device=act.device)
            if k:
                g[~is_one.to(g.device)] = scaled_grads[layer]
            if shared:
                g[is_one.to(g.device)] = clean_grads[layer]
            out.append(g)
        return out

    # -------------------------------------------------------------- selection
    def coarse(self, scores: Sequence[torch.Tensor]) -> set[Neuron]:
        """Neurons whose attribution exceeds ``adaptive_threshold`` × the maximum over all layers."""
        top = max(float(s.max()) for s in scores)
        if top <= 0:
            return set()
        threshold = top * self.adaptive_threshold
        return {
            (layer, int(i))
            for layer, s in enumerate(scores)
            for i in torch.nonzero(s > threshold).flatten().tolist()
        }

    def refined(self, coarse_sets: Sequence[set[Neuron]]) -> list[Neuron]:
        """Neurons coarse for more than ``p`` × len(coarse_sets) prompts (all of them without ``refine``)."""
        counts = Counter(n for s in coarse_sets for n in s)
        if not self.refine:
            return sorted(counts)
        bar = self.p * len(coarse_sets)
        return sorted(n for n, c in counts.items() if c > bar)

    def neurons(self, model: nn.Module, tokenizer, record: EditRecord) -> list[Neuron]:
        """The knowledge neurons of ``record``'s old fact."""
        _require_old_answer(record)
        prompts = [record.prompt] + (list(record.rephrase_prompts) if self.refine else [])
        sets = [self.coarse(self.attribute(model, tokenizer, q, record.target_true)) for q in prompts]
        chosen = self.refined(sets)
        log.debug("KN record %r: %s coarse -> %d neurons",
                  record.record_id, [len(s) for s in sets], len(chosen))
        return chosen

    # ------------------------------------------------------------------- edit
    def _first_token(self, tokenizer, prompt: str, target: str) -> int:
        batch = encode_pairs(tokenizer, [prompt], [target])
        return int(batch.target_ids[0, 0])

    @torch.no_grad()
    def _argmax_token(self, model: nn.Module, tokenizer, prompt: str) -> int:
        arch = arch_for(model)
        device = next(model.parameters()).device
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
        with CallRecorder(model, [], stop_at=arch.lm_head) as rec:
            model(input_ids=ids, use_cache=False)
        assert rec.stopped_input is not None
        return int(head_logits(model, rec.stopped_input[:, -1]).argmax(-1)[0])

    def compute_deltas(self, model: nn.Module, tokenizer, records: Sequence[EditRecord]) -> Deltas:
        if not records:
            raise EditError("KN got no records")
        arch = _decoder_arch(model)
        for record in records:  # fail before any work is done
            _require_old_answer(record)
        embeddings = get_module(model, arch.embeddings).weight.detach()
        params: dict[str, nn.Parameter] = {}
        columns: dict[str, torch.Tensor] = {}  # parameter name -> (out, in) delta
        self.last_neurons = {}
        for record in records:
            chosen = self.neurons(model, tokenizer, record)
            self.last_neurons[record.record_id] = chosen
            if not chosen:
                log.warning("KN found no knowledge neurons for record %r; nothing to edit", record.record_id)
                continue
            new_id = self._first_token(tokenizer, record.prompt, record.target_new)
            if self.old_token == "argmax":
                old_id = self._argmax_token(model, tokenizer, record.prompt)
            else:
                old_id = self._first_token(tokenizer, record.prompt, record.target_true)
            shift = self.new_scale * embeddings[new_id].float() - self.old_scale * embeddings[old_id].float()
            for layer, index in chosen:
                name = f"{arch.module_path(model, 'mlp_out', layer)}.weight"
                if name not in columns:
                    param = params[name] = get_parameter(model, name)
                    out_in = arch.weight_out_in(get_module(model, name.rsplit('.', 1)[0]))
                    if out_in.shape[0] != shift.shape[0]:
                        raise EditError(
                            f"{name} has {out_in.shape[0]} outputs but the embeddings have "
                            f"width {shift.shape[0]}"
                        )
                    columns[name] = torch.zeros(out_in.shape, dtype=torch.float32, device=param.device)
                columns[name][:, index] += shift.to(columns[name].device)
        return {
            name: arch.delta_to_param(delta).to(params[name].dtype).contiguous()
            for name, delta in columns.items()
        }


# ---------------------------------------------------------------- helpers
@torch.no_grad()
def _prob_grad(
    model: nn.Module, arch: ArchSpec, hidden: torch.Tensor, target: int, max_logits: int = 1 << 25
) -> torch.Tensor:
    """``∂P(target)/∂hidden`` per row of LM-head inputs ``hidden`` ``[M, d]`` (softmax probability,
    final logit soft-capping included), in row chunks of at most ``max_logits`` logits.

    ``dP/dz = P_y (onehot_y − p)`` is formed in place in the logits buffer and mapped back with one
    product by the head's weight — faster here than differentiating :func:`head_nll`, whose chunks
    reduce over a transposed layout.
    """
    head = get_module(model, arch.lm_head)
    if not isinstance(head, nn.Linear):
        with torch.enable_grad():
            h = hidden.detach().requires_grad_(True)
            prob = torch.softmax(head_logits(model, h), dim=-1)[:, target]
            (grad,) = torch.autograd.grad(prob.sum(), h)
        return grad
    cap = getattr(model.config, "final_logit_softcapping", None) or None
    weight = head.weight
    rows = max(1, max_logits // weight.shape[0])
    out = []
    for lo in range(0, hidden.shape[0], rows):
        h = hidden[lo: lo + rows].to(weight.dtype)
        z = (h @ weight.t()).float()
        if head.bias is not None:
            z += head.bias.float()
        slope = None
        if cap:
            z = torch.tanh(z / cap)
            slope = 1.0 - z * z  # d(cap · tanh(x / cap))/dx
            z *= cap
        z -= z.max(dim=1, keepdim=True).values
        e = z.exp_()
        total = e.sum(dim=1, keepdim=True)
        p_y = e[:, target: target + 1] / total
        dz = e.mul_(-p_y / total)
        dz[:, target] += p_y[:, 0]
        if slope is not None:
            dz *= slope
        out.append((dz.to(weight.dtype) @ weight).to(hidden.dtype))
    return torch.cat(out)


def _decoder_arch(model: nn.Module) -> ArchSpec:
    arch = arch_for(model)
    if is_encoder_decoder(model):
        raise EditError(
            f"KN supports decoder-only models; {type(model).__name__} is an encoder-decoder model"
        )
    return arch


def _require_old_answer(record: EditRecord) -> None:
    if not record.has_true_target:
        raise EditError(f"KN attributes the old fact: record {record.record_id!r} has no 'target_true'")


def _cache_kwarg(model: nn.Module) -> str:
    """The name under which the model's forward takes its KV cache (``cache`` in transformers ≥ 5.x)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _layer_kv(cache: DynamicCache, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The prefix keys/values a block attends to (None when the prefix is empty)."""
    if layer >= len(cache.layers):
        return None
    cached = cache.layers[layer]
    keys = getattr(cached, "keys", None)
    if not getattr(cached, "is_initialized", False) or keys is None or keys.numel() == 0:
        return None
    return keys, cached.values


def _with_cache(
    args: tuple, kwargs: dict, kv: tuple[torch.Tensor, torch.Tensor] | None, layer: int, batch: int
) -> tuple[tuple, dict]:
    """The recorded block kwargs with the KV cache replaced by a fresh one holding the prefix for
    ``batch`` rows (the recorded cache already contains the last token and must not be mutated)."""
    fresh = DynamicCache()
    if kv is not None:
        keys, values = kv
        fresh.update(keys.expand(batch, *keys.shape[1:]), values.expand(batch, *values.shape[1:]), layer)
    new_args = tuple(fresh if isinstance(v, Cache) else v for v in args)
    new_kwargs = {k: (fresh if isinstance(v, Cache) else v) for k, v in kwargs.items()}
    if not any(isinstance(v, Cache) for v in (*args, *kwargs.values())):
        raise EditError("KN could not find the KV cache among a block's arguments")
    return new_args, new_kwargs
