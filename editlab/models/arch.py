"""Architecture facts, in one place, keyed by the Hugging Face ``config.model_type``.

Every method that touches a model's internals asks this table where things are: the list of
transformer blocks, the whole MLP and its input/output projections and the attention output inside
a block, the embeddings, the final norm and the LM head, which config field names the MLP's
activation function, and whether weight matrices are stored transposed (GPT-2's ``Conv1D`` keeps
``(in_features, out_features)``).  Nothing else in editlab names a
module path of a particular architecture.  (Compare peft's per-architecture constants.)

Paths inside a block are relative to the block.  A role may list several candidate paths when
variants of one ``model_type`` differ (T5 v1.0 ``wi`` vs T5 v1.1 gated ``wi_0``/``wi_1``); the
first one present in the model wins.

Every entry is exercised by a tiny random model of that type in the tests (``editlab.models.tiny``);
add a tiny config with each new entry.  Multimodal wrappers (e.g. Gemma-3 4B+, whose text model sits
in ``model.language_model``) need their own entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ArchSpec", "ARCHITECTURES", "arch_for", "get_module", "get_parameter", "is_encoder_decoder",
           "UnknownArchitecture"]


class UnknownArchitecture(KeyError):
    pass


Paths = tuple[str, ...]


@dataclass(frozen=True)
class ArchSpec:
    """Where things live in one architecture.

    Attributes:
        layers: dotted path of the ``ModuleList`` of blocks whose MLPs are edited (the decoder for
            decoder-only models and for T5).
        mlp: the whole MLP (feed-forward) module, relative to a block: called with the normed
            residual stream (``[..., d_model]``), returns its contribution to it (``[..., d_model]``).
            Parameter-adding editors (T-Patcher, CaliNet) attach their modules beside it.
        mlp_in: the MLP's input (up) projection(s), relative to a block.
        mlp_out: the MLP's output (down) projection, relative to a block: the "value" matrix that
            ROME/MEMIT/FT-L edit.  Its input is the MLP key space.
        attn_out: the attention output projection, relative to a block.
        embeddings: the input token embedding.
        final_norm: the norm applied to the last block's output before the LM head.
        lm_head: the output projection to the vocabulary.
        mlp_gate: the gate projection of gated MLPs (SwiGLU / GeGLU), when there is one.
        mlp_act: config attribute(s) naming the MLP's activation function (a key of
            ``transformers.activations.ACT2FN``); the first one set wins.
        transposed: weights stored as ``(in, out)`` (GPT-2 ``Conv1D``) instead of ``(out, in)``.
        encoder_layers / encoder_mlp / encoder_mlp_in / encoder_mlp_out: the encoder stack of
            encoder-decoder models (T5), for methods that edit both stacks.  Whether a model *is*
            encoder-decoder is not a table fact: :func:`is_encoder_decoder` reads its config.
        residual: the module whose output is the residual stream after a block, relative to a
            block ("" = the block itself).
        positions: the config attribute holding the longest input, in tokens, the model takes
            (its position table or trained context); None for relative positions with no fixed
            limit (T5).
    """

    layers: str
    mlp: Paths
    mlp_in: Paths
    mlp_out: Paths
    attn_out: Paths
    embeddings: str
    final_norm: str
    lm_head: str = "lm_head"
    mlp_gate: Paths = ()
    mlp_act: Paths = ("hidden_act",)
    transposed: bool = False
    encoder_layers: str | None = None
    encoder_mlp: Paths = ()
    encoder_mlp_in: Paths = ()
    encoder_mlp_out: Paths = ()
    residual: str = ""
    positions: str | None = "max_position_embeddings"

    def max_positions(self, model: nn.Module) -> int | None:
        """The longest input (prompt + answer, in tokens) ``model`` takes, from its config
        (:attr:`positions`); None when the architecture has no fixed limit or the config says none."""
        if self.positions is None:
            return None
        value = getattr(model.config, self.positions, None)
        return int(value) if isinstance(value, int) and value > 0 else None

    # ----------------------------------------------------------------- paths
    def layer_path(self, layer: int, encoder: bool = False) -> str:
        stack = self.encoder_layers if encoder else self.layers
        if stack is None:
            raise ValueError("this architecture has no encoder stack")
        return f"{stack}.{layer}"

    def _candidates(self, role: str, encoder: bool) -> Paths:
        name = f"encoder_{role}" if encoder else role
        if not hasattr(self, name):
            raise ValueError(f"unknown module role {role!r}")
        paths = getattr(self, name)
        return (paths,) if isinstance(paths, str) else paths

    def has_role(self, model: nn.Module, role: str, layer: int = 0, encoder: bool = False) -> bool:
        """Whether block ``layer`` has a module for ``role`` (e.g. ``mlp_gate`` in gated MLPs only)."""
        try:
            self.module_path(model, role, layer, encoder)
        except UnknownArchitecture:
            return False
        return True

    def module_path(self, model: nn.Module, role: str, layer: int, encoder: bool = False) -> str:
        """Full dotted path of ``role`` (``mlp``, ``mlp_in``, ``mlp_out``, ``attn_out``, ``mlp_gate``,
        ``residual``) in block ``layer`` of ``model``; :class:`UnknownArchitecture` when absent."""
        base = self.layer_path(layer, encoder)
        if role == "residual":
            return base if not self.residual else f"{base}.{self.residual}"
        candidates = self._candidates(role, encoder)
        for rel in candidates:
            path = f"{base}.{rel}"
            if _has_module(model, path):
                return path
        raise UnknownArchitecture(
            f"none of {[f'{base}.{c}' for c in candidates]} exists in {type(model).__name__} "
            f"(role {role!r}); fix the entry for model_type {model.config.model_type!r} in editlab/models/arch.py"
        )

    def mlp_activation(self, model: nn.Module) -> str:
        """Name of the MLP's activation function (``gelu_new``, ``silu``, ``relu``, ...), read
        from the config attribute listed in ``mlp_act``; a key of ``transformers.activations.ACT2FN``."""
        config = model.config
        for name in self.mlp_act:
            value = getattr(config, name, None)
            if isinstance(value, str) and value:
                return value
        raise UnknownArchitecture(
            f"none of the config attributes {list(self.mlp_act)} names the MLP activation of "
            f"{type(model).__name__}; fix the entry for model_type {config.model_type!r} in editlab/models/arch.py"
        )

    def num_layers(self, model: nn.Module, encoder: bool = False) -> int:
        stack = self.encoder_layers if encoder else self.layers
        return len(get_module(model, stack))

    # --------------------------------------------------------------- weights
    def weight_out_in(self, module: nn.Module) -> torch.Tensor:
        """The module's weight viewed as ``(out_features, in_features)`` (a view, not a copy)."""
        w = module.weight
        return w.t() if self.transposed else w

    def delta_to_param(self, delta_out_in: torch.Tensor) -> torch.Tensor:
        """Turn an ``(out, in)`` update into the parameter's own layout."""
        return delta_out_in.t() if self.transposed else delta_out_in


_LLAMA_LIKE = ArchSpec(
    layers="model.layers",
    mlp=("mlp",),
    mlp_in=("mlp.up_proj",),
    mlp_gate=("mlp.gate_proj",),
    # Gemma-2/3 name the MLP activation `hidden_activation`; Llama, Mistral, Qwen2, Gemma `hidden_act`
    mlp_act=("hidden_activation", "hidden_act"),
    mlp_out=("mlp.down_proj",),
    attn_out=("self_attn.o_proj",),
    embeddings="model.embed_tokens",
    final_norm="model.norm",
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(
        layers="transformer.h",
        mlp=("mlp",),
        mlp_in=("mlp.c_fc",),
        mlp_out=("mlp.c_proj",),
        mlp_act=("activation_function",),
        attn_out=("attn.c_proj",),
        embeddings="transformer.wte",
        final_norm="transformer.ln_f",
        transposed=True,
        positions="n_positions",
    ),
    "gptj": ArchSpec(
        layers="transformer.h",
        mlp=("mlp",),
        mlp_in=("mlp.fc_in",),
        mlp_out=("mlp.fc_out",),
        mlp_act=("activation_function",),
        attn_out=("attn.out_proj",),
        embeddings="transformer.wte",
        final_norm="transformer.ln_f",
        positions="n_positions",
    ),
    "gpt_neox": ArchSpec(
        layers="gpt_neox.layers",
        mlp=("mlp",),
        mlp_in=("mlp.dense_h_to_4h",),
        mlp_out=("mlp.dense_4h_to_h",),
        attn_out=("attention.dense",),
        embeddings="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
        lm_head="lm_head",
    ),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    # Gemma-3 text-only checkpoints (270M, 1B) load as Gemma3ForCausalLM with model_type gemma3_text.
    "gemma3_text": _LLAMA_LIKE,
    "t5": ArchSpec(
        layers="decoder.block",
        # decoder block: layer.0 self-attention, layer.1 cross-attention, layer.2 feed-forward
        # (layer.2 is norm + MLP + residual add; DenseReluDense, also the gated variant, is the MLP)
        mlp=("layer.2.DenseReluDense",),
        mlp_in=("layer.2.DenseReluDense.wi", "layer.2.DenseReluDense.wi_1"),
        mlp_gate=("layer.2.DenseReluDense.wi_0",),
        mlp_out=("layer.2.DenseReluDense.wo",),
        mlp_act=("dense_act_fn",),  # relu (T5 v1.0), gelu_new (v1.1 "gated-gelu")
        attn_out=("layer.0.SelfAttention.o",),
        embeddings="shared",
        final_norm="decoder.final_layer_norm",
        encoder_layers="encoder.block",
        # encoder block: layer.0 self-attention, layer.1 feed-forward
        encoder_mlp=("layer.1.DenseReluDense",),
        encoder_mlp_in=("layer.1.DenseReluDense.wi", "layer.1.DenseReluDense.wi_1"),
        encoder_mlp_out=("layer.1.DenseReluDense.wo",),
        positions=None,  # relative position buckets: no fixed input length
    ),
}


def arch_for(model_or_type: nn.Module | str) -> ArchSpec:
    """The :class:`ArchSpec` of a model (or of a ``model_type`` string)."""
    if isinstance(model_or_type, str):
        model_type = model_or_type
    else:
        model_type = getattr(getattr(model_or_type, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnknownArchitecture(
            f"model_type {model_type!r} is not in editlab's architecture table; known: "
            f"{sorted(ARCHITECTURES)}. Add an entry to editlab/models/arch.py."
        )
    return ARCHITECTURES[model_type]


def is_encoder_decoder(model_or_config) -> bool:
    """Whether a model (or its Hugging Face config, or a model bundle) is an encoder-decoder model.

    The one place editlab asks this question.  The answer is the config's ``is_encoder_decoder``
    flag, which Hugging Face sets for every seq2seq model; wrappers that hold a model (a bundle, an
    editor's wrapper exposing ``config``) answer for the model they hold.
    """
    config = getattr(model_or_config, "config", model_or_config)
    if hasattr(config, "model") and not hasattr(config, "is_encoder_decoder"):  # a bundle
        config = getattr(config.model, "config", None)
    return bool(getattr(config, "is_encoder_decoder", False))


def _has_module(model: nn.Module, path: str) -> bool:
    try:
        get_module(model, path)
    except AttributeError:
        return False
    return True


def get_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at a dotted path ("" is the model itself); AttributeError names the path."""
    if not path:
        return model
    try:
        return model.get_submodule(path)
    except AttributeError as err:
        raise AttributeError(f"{type(model).__name__} has no module {path!r}") from err


def get_parameter(model: nn.Module, name: str) -> nn.Parameter:
    """The parameter at a dotted name; AttributeError names it."""
    try:
        return model.get_parameter(name)
    except AttributeError as err:
        raise AttributeError(f"{type(model).__name__} has no parameter {name!r}") from err
