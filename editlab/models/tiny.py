"""Tiny random models for unit tests: built in memory, deterministic, no downloads.

:func:`tiny_tokenizer` trains a byte-level BPE on a fixed English corpus embedded below (facts
about capitals, languages, companies — the kinds of sentences the editing datasets contain), so
that common words are single tokens and spaces are kept (``" Paris"`` is one token).
:func:`tiny_model` builds a 2-layer model of a given ``model_type`` whose vocabulary is that
tokenizer's, frozen and in eval mode like every :class:`~editlab.models.loading.ModelBundle`.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTJConfig,
    GPTJForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

from editlab.models.loading import ModelBundle, freeze, prepare_tokenizer

__all__ = ["TINY_CONFIGS", "TINY_MODEL_TYPES", "TINY_CORPUS", "tiny_model", "tiny_tokenizer"]

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
TINY_VOCAB_SIZE = 640

TINY_CORPUS = """\
The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome.
The capital of Spain is Madrid. The capital of Japan is Tokyo. The capital of England is London.
The capital of Canada is Ottawa. The capital of China is Beijing. The capital of Russia is Moscow.
The capital of Egypt is Cairo. The capital of Greece is Athens. The capital of Poland is Warsaw.
Paris is the capital of France, and Berlin is the capital of Germany. Rome is a city in Italy.
London is a large city on the river Thames. Tokyo is the largest city in Japan.
The official language of France is French. The official language of Germany is German.
The official language of Italy is Italian. The official language of Spain is Spanish.
The official language of Japan is Japanese. People in England speak English.
The mother tongue of Victor Hugo was French. The mother tongue of Goethe was German.
Apple is a company based in California. Microsoft is a company based in Washington.
Google was founded by Larry Page and Sergey Brin. Toyota is a company from Japan.
The iPhone is produced by Apple. Windows is developed by Microsoft. Android is developed by Google.
Nokia is a company from Finland. Sony is a company from Japan. Siemens is a company from Germany.
The Eiffel Tower is located in Paris. The Colosseum is located in Rome.
Albert Einstein was born in Germany. Marie Curie was born in Poland. He was a physicist.
She was a chemist and a physicist. Lionel Messi plays football. Michael Jordan played basketball.
The president of the United States lives in Washington. The city is known for its museums.
Who is the president of the company? What is the capital of the country? Where was she born?
The river flows through the city. The sea is to the south of the country, and the mountains are
to the north. The population of the city is about two million people.
"""

TINY_MODEL_TYPES = ("gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3_text", "t5")

# Llama-style decoders (grouped-query attention, gated MLP) share one small shape.
_DECODER: dict[str, Any] = {
    "num_hidden_layers": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}
_GEMMA: dict[str, Any] = {**_DECODER, "num_key_value_heads": 1, "head_dim": 8}

# model_type -> (config class, model class, config kwargs).  Vocabulary and special ids are
# filled in from the tokenizer by tiny_model().
TINY_CONFIGS: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel], dict[str, Any]]] = {
    "gpt2": (
        GPT2Config,
        GPT2LMHeadModel,
        {"n_layer": 2, "n_embd": 32, "n_head": 4, "n_positions": 128},
    ),
    "gptj": (
        GPTJConfig,
        GPTJForCausalLM,
        {"n_layer": 2, "n_embd": 32, "n_head": 4, "rotary_dim": 4, "n_positions": 128},
    ),
    "gpt_neox": (
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        {
            "num_hidden_layers": 2,
            "hidden_size": 32,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "max_position_embeddings": 128,
            "rotary_pct": 0.5,
        },
    ),
    "llama": (LlamaConfig, LlamaForCausalLM, _DECODER),
    "mistral": (MistralConfig, MistralForCausalLM, _DECODER),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, _DECODER),
    "gemma": (GemmaConfig, GemmaForCausalLM, _GEMMA),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, {**_GEMMA, "query_pre_attn_scalar": 8, "sliding_window": 16}),
    "gemma3_text": (
        Gemma3TextConfig,
        Gemma3ForCausalLM,
        {
            **_GEMMA,
            "query_pre_attn_scalar": 8,
            "sliding_window": 16,
            "layer_types": ["sliding_attention", "full_attention"],
        },
    ),
    "t5": (
        T5Config,
        T5ForConditionalGeneration,
        {
            "num_layers": 2,
            "num_decoder_layers": 2,
            "d_model": 32,
            "d_ff": 64,
            "d_kv": 8,
            "num_heads": 4,
            "relative_attention_num_buckets": 8,
        },
    ),
}


@functools.lru_cache(maxsize=1)
def _trained_tokenizer_json() -> str:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[PAD, EOS, BOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TINY_CORPUS.splitlines(keepends=True), trainer=trainer)
    return tok.to_str()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on :data:`TINY_CORPUS` (deterministic, offline).

    Special tokens: ``<pad>`` = 0, ``<eos>`` = 1, ``<bos>`` = 2, ``<unk>`` = 3 (T5's conventional
    pad/eos ids).  No BOS/EOS is added when encoding.  Training is cached; every call returns a
    fresh wrapper, so callers may change its settings without affecting each other.
    """
    backend = Tokenizer.from_str(_trained_tokenizer_json())
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=BOS,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        model_max_length=128,
    )
    return prepare_tokenizer(tokenizer)


def tiny_model(model_type: str = "gpt2", seed: int = 0, **config_overrides: Any) -> ModelBundle:
    """A tiny random model of ``model_type`` (one of :data:`TINY_MODEL_TYPES`) with :func:`tiny_tokenizer`.

    Weights depend only on ``seed`` (the global RNG state is left untouched).  ``config_overrides``
    update the config kwargs, e.g. ``tiny_model("llama", num_hidden_layers=4)``.
    """
    if model_type not in TINY_CONFIGS:
        raise ValueError(f"no tiny config for model_type {model_type!r}; known: {sorted(TINY_CONFIGS)}")
    config_cls, model_cls, defaults = TINY_CONFIGS[model_type]
    tokenizer = tiny_tokenizer()
    kwargs: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        **defaults,
    }
    if model_type == "t5":
        kwargs["decoder_start_token_id"] = tokenizer.pad_token_id
    kwargs.update(config_overrides)
    config = config_cls(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model = freeze(model.to(torch.float32))
    return ModelBundle(model=model, tokenizer=tokenizer, name=f"tiny-{model_type}")
