"""from_pretrained on local folders: round trip, freezing, tokenizer preparation, errors, dtypes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from editlab.models.arch import is_encoder_decoder
from editlab.models.loading import (
    ModelBundle,
    ModelLoadError,
    from_pretrained,
    prepare_tokenizer,
    resolve_device,
    resolve_dtype,
)
from editlab.models.tiny import tiny_model, tiny_tokenizer

PROMPTS = ["The capital of France is", "Paris"]


def _save(bundle: ModelBundle, folder: Path) -> Path:
    bundle.model.save_pretrained(folder)
    bundle.tokenizer.save_pretrained(folder)
    return folder


def _logits(bundle: ModelBundle) -> torch.Tensor:
    batch = bundle.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        if is_encoder_decoder(bundle):
            start = torch.full((2, 1), bundle.model.config.decoder_start_token_id)
            return bundle.model(**batch, decoder_input_ids=start).logits
        return bundle.model(**batch).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[ModelBundle, Path]]:
    root = tmp_path_factory.mktemp("models")
    out = {}
    for model_type in ("gpt2", "t5"):
        bundle = tiny_model(model_type, seed=3)
        out[model_type] = (bundle, _save(bundle, root / model_type))
    return out


@pytest.mark.parametrize("model_type", ["gpt2", "t5"])
def test_round_trip(saved, model_type: str) -> None:
    original, folder = saved[model_type]
    loaded = from_pretrained(str(folder))
    assert loaded.name == str(folder)
    assert loaded.model_type == model_type
    assert is_encoder_decoder(loaded) == (model_type == "t5")
    assert type(loaded.model) is type(original.model)
    assert loaded.device == torch.device("cpu")
    assert loaded.model.dtype == torch.float32
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.tokenizer.padding_side == "right"
    assert loaded.tokenizer("The capital of France is Paris")["input_ids"] == original.tokenizer(
        "The capital of France is Paris"
    )["input_ids"]
    torch.testing.assert_close(_logits(loaded), _logits(original))


def test_seq2seq_flag_overrides_config(saved) -> None:
    _, folder = saved["gpt2"]
    with pytest.raises(ValueError):
        from_pretrained(str(folder), seq2seq=True)  # gpt2 has no seq2seq class
    assert not is_encoder_decoder(from_pretrained(str(folder), seq2seq=False))


def test_pad_token_set_from_eos(saved, tmp_path: Path) -> None:
    original, folder = saved["gpt2"]
    copy = tmp_path / "nopad"
    original.model.save_pretrained(copy)
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = None
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(copy)
    loaded = from_pretrained(str(copy))
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token == "<eos>"
    assert loaded.tokenizer.padding_side == "right"


def test_prepare_tokenizer_keeps_existing_pad() -> None:
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "left"
    assert prepare_tokenizer(tokenizer).pad_token == "<pad>"
    assert tokenizer.padding_side == "right"


def test_bfloat16(saved) -> None:
    _, folder = saved["gpt2"]
    loaded = from_pretrained(str(folder), dtype="bfloat16")
    assert loaded.model.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert _logits(loaded).dtype == torch.bfloat16


def test_dtype_and_device_strings() -> None:
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("float16") is torch.float16
    assert resolve_dtype("torch.bfloat16") is torch.bfloat16
    assert resolve_dtype("auto") == "auto"
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("float8")
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            resolve_device("cuda:1")


@pytest.mark.parametrize("name", ["/nonexistent/model/dir", "./missing-model", "~/no/such/model"])
def test_bad_local_path(name: str) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_pretrained(name)


def test_offline_uncached_hub_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE") as info:
        from_pretrained("editlab-test/no-such-model", cache_dir=str(tmp_path))
    assert isinstance(info.value.__cause__, OSError)
    assert "hf download editlab-test/no-such-model" in str(info.value)
