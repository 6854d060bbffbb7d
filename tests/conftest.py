"""Shared fixtures: tiny random models (no download) and schema-true records written by us."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from editlab.data.records import EditRecord, Probe
from editlab.models.tiny import TINY_MODEL_TYPES, tiny_model

# every architecture of the table (editlab/models/arch.py) has a tiny model
ALL_TYPES = TINY_MODEL_TYPES
CAUSAL_TYPES = tuple(t for t in TINY_MODEL_TYPES if t != "t5")

_CACHE: dict[str, object] = {}


@pytest.fixture(scope="session")
def tiny():
    """``tiny(model_type)`` → a cached ModelBundle (treat it as read-only or restore it)."""

    def get(model_type: str = "gpt2"):
        if model_type not in _CACHE:
            _CACHE[model_type] = tiny_model(model_type, seed=0)
        return _CACHE[model_type]

    return get


_DEEP: dict[str, object] = {}


@pytest.fixture(scope="session")
def tiny_deep():
    """``tiny_deep(model_type)`` → a cached 4-block tiny model with larger initial weights
    (``initializer_range=0.2``: peaked, not uniform, next-token distributions), for editors whose
    edit at a lower block must reach the answer position through later blocks' attention."""

    def get(model_type: str = "llama"):
        if model_type not in _DEEP:
            depth = {"n_layer": 4} if model_type in ("gpt2", "gptj") else {"num_hidden_layers": 4}
            if model_type == "gemma3_text":
                depth["layer_types"] = ["sliding_attention", "full_attention"] * 2
            _DEEP[model_type] = tiny_model(model_type, seed=0, initializer_range=0.2, **depth)
        return _DEEP[model_type]

    return get


def make_records() -> list[EditRecord]:
    return [
        EditRecord(
            record_id=0,
            prompt="The capital of France is",
            subject="France",
            target_new="Rome",
            target_true="Paris",
            rephrase_prompts=("The French capital city is",),
            locality=(Probe("The capital of Italy is", "Rome", "neighborhood"),),
            portability=(Probe("The language spoken in the capital of France is", "Italian", "one_hop"),),
            neighborhood_prompts=("The capital of Italy is", "The largest city of France is"),
            generation_prompts=("France is a country where",),
        ),
        EditRecord(
            record_id=1,
            prompt="The mother tongue of Danielle Darrieux is",
            subject="Danielle Darrieux",
            target_new="English",
            target_true="French",
            rephrase_prompts=("Danielle Darrieux speaks the language", "The native language of Danielle Darrieux is"),
            locality=(Probe("The mother tongue of Léon Blum is", "French", "neighborhood"),),
            neighborhood_prompts=("The mother tongue of Léon Blum is",),
        ),
        EditRecord(
            record_id=2,
            prompt="Toko Yasuda plays the",
            subject="Toko Yasuda",
            target_new="piano",
            target_true=None,
            locality=(Probe("The company that makes the iPhone is", "Apple", "other"),),
        ),
    ]


@pytest.fixture
def records() -> list[EditRecord]:
    return make_records()


def packed_stream(tokenizer, docs) -> list[int]:
    """The packed token stream of a corpus, by hand: documents joined with EOS (what
    ``editlab.data.corpora.pack_rows`` must produce before it cuts rows)."""
    ids: list[int] = []
    for i, doc in enumerate(docs):
        if i:
            ids.append(tokenizer.eos_token_id)
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
    return ids


def state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), f"{k} changed"


def assert_same_training_state(full, full_trainer, resumed, resumed_trainer) -> None:
    """A resumed training run ended where the uninterrupted one did: the same step, the same editor
    tensors (weights and buffers) and the same Adam state, bit for bit."""
    assert resumed_trainer.global_step == full_trainer.global_step
    resumed_state = resumed.editor.state_dict()
    for k, v in full.editor.state_dict().items():
        assert torch.equal(resumed_state[k], v), k
    a = full_trainer.optimizers[0].state_dict()["state"]
    b = resumed_trainer.optimizers[0].state_dict()["state"]
    assert a.keys() == b.keys()
    for i in a:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a[i][name], b[i][name]), (i, name)


@contextmanager
def scripted_next_tokens(model: torch.nn.Module, table: dict[int, int], default: int) -> Iterator[None]:
    """Make a tiny Llama predict ``table[token]`` (``default`` for other tokens) after every input
    token, deterministically and with a clear margin, for teacher-forced scoring and generation alike.

    Hooks replace the final norm's output at each position with a unit vector coding the next
    token, and the LM head's weight is swapped for one whose rows are those unit vectors (other
    rows zero); both are restored on exit.
    """
    head = model.get_output_embeddings()
    tokens = sorted(set(table.values()) | {default})
    if len(tokens) > head.weight.shape[1]:
        raise ValueError("more scripted tokens than hidden dimensions")
    code = {t: k for k, t in enumerate(tokens)}
    lookup = torch.full((head.weight.shape[0],), code[default], dtype=torch.long)
    for src, dst in table.items():
        lookup[src] = code[dst]
    weight = torch.zeros_like(head.weight)
    for t, k in code.items():
        weight[t, k] = 1.0
    seen: dict[str, torch.Tensor] = {}

    def grab_ids(module, args):
        seen["ids"] = args[0]

    def script(module, args, out):
        ids = seen["ids"][:, -out.shape[1]:]
        return torch.nn.functional.one_hot(lookup[ids], out.shape[-1]).to(out.dtype) * 10.0

    original = head.weight.detach().clone()
    hooks = [model.get_input_embeddings().register_forward_pre_hook(grab_ids),
             model.model.norm.register_forward_hook(script)]
    try:
        with torch.no_grad():
            head.weight.copy_(weight)
        yield
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            head.weight.copy_(original)


@pytest.fixture
def corpus(tmp_path):
    """A tiny text corpus for key statistics (ROME, MEMIT, EMMET, AlphaEdit on tiny models)."""
    from editlab.data.corpora import TextFile
    from editlab.models.tiny import TINY_CORPUS

    path = tmp_path / "corpus.txt"
    path.write_text(TINY_CORPUS, encoding="utf-8")
    return TextFile(path)


@pytest.fixture
def template_cache(tmp_path, monkeypatch):
    """Context templates are cached under $EDITLAB_CACHE: one folder per test keeps tests apart."""
    monkeypatch.setenv("EDITLAB_CACHE", str(tmp_path / "cache"))
