"""The architecture table resolves every role to a real module in each tiny model type."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.activations import ACT2FN

from editlab.models.arch import ARCHITECTURES, UnknownArchitecture, arch_for, get_module, is_encoder_decoder
from editlab.models.tiny import TINY_MODEL_TYPES, tiny_model

ROLES = ("mlp", "mlp_in", "mlp_out", "attn_out")


@pytest.fixture(scope="module", params=TINY_MODEL_TYPES)
def bundle(request: pytest.FixtureRequest):
    return tiny_model(request.param)


def _hidden(model: nn.Module) -> int:
    config = model.config
    return int(getattr(config, "n_embd", None) or getattr(config, "d_model", None) or config.hidden_size)


def _intermediate(model: nn.Module) -> int:
    config = model.config
    if config.model_type in ("gpt2", "gptj"):
        return int(config.n_inner or 4 * config.n_embd)
    return int(getattr(config, "d_ff", None) or config.intermediate_size)


def test_top_level_paths_resolve(bundle) -> None:
    model = bundle.model
    spec = arch_for(model)
    assert spec is ARCHITECTURES[bundle.model_type]
    layers = get_module(model, spec.layers)
    assert isinstance(layers, nn.ModuleList) and len(layers) == spec.num_layers(model) == 2
    embeddings = get_module(model, spec.embeddings)
    assert isinstance(embeddings, nn.Embedding)
    assert embeddings.num_embeddings >= len(bundle.tokenizer)
    assert isinstance(get_module(model, spec.final_norm), nn.Module)
    lm_head = get_module(model, spec.lm_head)
    assert lm_head is model.get_output_embeddings()
    # the table names an encoder stack exactly for the encoder-decoder models
    assert (spec.encoder_layers is not None) == is_encoder_decoder(model)


def test_block_roles_resolve_in_every_layer(bundle) -> None:
    model = bundle.model
    spec = arch_for(model)
    hidden, inter = _hidden(model), _intermediate(model)
    for layer in range(spec.num_layers(model)):
        paths = {role: spec.module_path(model, role, layer) for role in ROLES}
        assert all(path.startswith(f"{spec.layers}.{layer}.") for path in paths.values())
        mlp_in, mlp_out = (get_module(model, paths[r]) for r in ("mlp_in", "mlp_out"))
        assert tuple(spec.weight_out_in(mlp_out).shape) == (hidden, inter)
        assert tuple(spec.weight_out_in(mlp_in).shape) == (inter, hidden)
        attn_out = get_module(model, paths["attn_out"])
        assert spec.weight_out_in(attn_out).shape[0] == hidden
        assert spec.module_path(model, "residual", layer) == spec.layer_path(layer)
        gated = bundle.model_type in ("llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3_text") or getattr(
            model.config, "is_gated_act", False)
        assert spec.has_role(model, "mlp_gate", layer) == bool(gated)
        if gated:
            gate = get_module(model, spec.module_path(model, "mlp_gate", layer))
            assert tuple(spec.weight_out_in(gate).shape) == (inter, hidden)
        elif spec.mlp_gate:  # listed for a gated variant (T5 v1.1) that this model is not
            with pytest.raises(UnknownArchitecture):
                spec.module_path(model, "mlp_gate", layer)


@torch.no_grad()
def test_mlp_is_the_whole_feed_forward_with_d_model_in_and_out(bundle) -> None:
    """The ``mlp`` role is the module whose output the residual stream receives: called with
    ``[..., d_model]`` it returns ``[..., d_model]``, it owns the up/down projections, and its
    activation is the one the config names (what T-Patcher / CaliNet attach beside)."""
    model = bundle.model
    spec = arch_for(model)
    hidden = _hidden(model)
    for layer in range(spec.num_layers(model)):
        path = spec.module_path(model, "mlp", layer)
        mlp = get_module(model, path)
        assert path == f"{spec.layer_path(layer)}.{spec.mlp[0]}"
        for role in ("mlp_in", "mlp_out"):
            assert spec.module_path(model, role, layer).startswith(path + ".")
        seen = {}
        handle = mlp.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
        try:
            ids = torch.tensor([[5, 6, 7]])
            extra = {"decoder_input_ids": ids} if is_encoder_decoder(bundle) else {}
            model(input_ids=ids, use_cache=False, **extra)
        finally:
            handle.remove()
        assert isinstance(seen["x"], torch.Tensor) and seen["x"].shape == (1, 3, hidden)
        assert isinstance(seen["y"], torch.Tensor) and seen["y"].shape == (1, 3, hidden)
        # the MLP applied to its input gives back what the block received from it
        assert torch.allclose(mlp(seen["x"]), seen["y"])
    assert spec.mlp_activation(model) in ACT2FN
    expected = {"gpt2": "gelu_new", "gptj": "gelu_new", "gpt_neox": "gelu", "llama": "silu", "mistral": "silu",
                "qwen2": "silu", "gemma": "gelu_pytorch_tanh", "gemma2": "gelu_pytorch_tanh",
                "gemma3_text": "gelu_pytorch_tanh", "t5": "relu"}
    assert spec.mlp_activation(model) == expected[bundle.model_type]


def test_t5_mlp_roles_in_both_stacks_and_gated_activation() -> None:
    model = tiny_model("t5", feed_forward_proj="gated-gelu").model
    spec = arch_for(model)
    assert spec.module_path(model, "mlp", 1) == "decoder.block.1.layer.2.DenseReluDense"
    assert spec.module_path(model, "mlp", 1, encoder=True) == "encoder.block.1.layer.1.DenseReluDense"
    assert spec.mlp_activation(model) == "gelu_new"
    assert spec.has_role(model, "mlp_gate", 0)


def test_missing_activation_attribute_names_the_entry() -> None:
    model = tiny_model("llama").model
    with pytest.raises(UnknownArchitecture, match="arch.py"):
        ARCHITECTURES["t5"].mlp_activation(model)


def test_transposed_only_for_gpt2(bundle) -> None:
    model = bundle.model
    spec = arch_for(model)
    mlp_out = get_module(model, spec.module_path(model, "mlp_out", 0))
    hidden, inter = _hidden(model), _intermediate(model)
    if bundle.model_type == "gpt2":
        assert spec.transposed
        assert tuple(mlp_out.weight.shape) == (inter, hidden)  # Conv1D stores (in, out)
        assert tuple(spec.weight_out_in(mlp_out).shape) == (hidden, 4 * hidden)
    else:
        assert not spec.transposed
        assert isinstance(mlp_out, nn.Linear)
        assert spec.weight_out_in(mlp_out) is mlp_out.weight


def test_weight_out_in_is_a_view_and_delta_round_trips() -> None:
    model = tiny_model("gpt2").model
    spec = arch_for(model)
    module = get_module(model, spec.module_path(model, "mlp_out", 1))
    view = spec.weight_out_in(module)
    assert view.data_ptr() == module.weight.data_ptr()
    assert spec.delta_to_param(view).shape == module.weight.shape


def test_t5_encoder_paths() -> None:
    model = tiny_model("t5").model
    spec = arch_for(model)
    assert is_encoder_decoder(model) and spec.encoder_layers
    assert spec.num_layers(model, encoder=True) == 2
    for layer in range(2):
        for role in ("mlp_in", "mlp_out"):
            path = spec.module_path(model, role, layer, encoder=True)
            assert path.startswith(f"encoder.block.{layer}.layer.1.DenseReluDense")
            assert isinstance(get_module(model, path), nn.Linear)
        assert spec.module_path(model, "mlp_out", layer).startswith(f"decoder.block.{layer}.layer.2.")
    with pytest.raises(ValueError):
        spec.module_path(model, "attn_out", 0, encoder=True)


def test_t5_gated_variant_uses_wi_1_and_gate() -> None:
    model = tiny_model("t5", feed_forward_proj="gated-gelu").model
    spec = arch_for(model)
    assert spec.module_path(model, "mlp_in", 0).endswith("DenseReluDense.wi_1")
    assert spec.module_path(model, "mlp_gate", 0).endswith("DenseReluDense.wi_0")
    assert spec.module_path(model, "mlp_in", 0, encoder=True).endswith("DenseReluDense.wi_1")


def test_unknown_model_type_lists_known_ones() -> None:
    with pytest.raises(UnknownArchitecture) as info:
        arch_for("bert")
    message = str(info.value)
    assert "'bert'" in message
    for known in ("gpt2", "llama", "t5", "gemma3_text"):
        assert known in message


def test_unknown_module_raises_with_entry_hint() -> None:
    model = tiny_model("llama").model
    with pytest.raises(UnknownArchitecture, match="arch.py"):
        ARCHITECTURES["gpt2"].module_path(model, "mlp_in", 0)


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_is_encoder_decoder_answers_for_model_config_bundle_and_wrapper(model_type) -> None:
    bundle = tiny_model(model_type)
    expected = model_type == "t5"
    assert bundle.model.config.is_encoder_decoder is expected  # what Hugging Face says

    class Wrapper(nn.Module):  # an editor's wrapper exposing the wrapped model's config
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner
            self.config = inner.config

    for asked in (bundle, bundle.model, bundle.model.config, Wrapper(bundle.model)):
        assert is_encoder_decoder(asked) is expected, type(asked).__name__


def test_is_encoder_decoder_is_false_without_a_config() -> None:
    assert is_encoder_decoder(nn.Linear(2, 2)) is False
