import time

import pytest
import torch

from editlab import stats
from editlab.models.arch import arch_for, get_module
from editlab.models.tiny import TINY_CORPUS, tiny_model
from editlab.data.corpora import TextFile
from editlab.stats import layer_stats, model_identity

from conftest import assert_state_equal, packed_stream, state_copy

SEQ = 32
KW = dict(max_seq_len=SEQ, batch_tokens=4 * SEQ, progress=False)


def _docs() -> list[str]:
    lines = [line for line in TINY_CORPUS.splitlines() if line.strip()]
    return [" ".join(lines[i : i + 3]) for i in range(0, len(lines), 3)]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(_docs()) + "\n", encoding="utf-8")
    return TextFile(path)


def _direct(bundle, docs, layers, seq=SEQ):
    """sum(k kᵀ)/count over the mlp_out inputs, with plain hooks, one row at a time."""
    model, arch = bundle.model, arch_for(bundle.model)
    ids = packed_stream(bundle.tokenizer, docs)
    rows = [ids[i : i + seq] for i in range(0, len(ids), seq)]
    sums: dict[int, torch.Tensor] = {}
    handles = []
    for layer in layers:
        def hook(module, args, output, _layer=layer):
            k = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[_layer] = sums.get(_layer, 0) + k.T @ k

        module = get_module(model, arch.module_path(model, "mlp_out", layer))
        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for row in rows:
                model(input_ids=torch.tensor([row]))
    finally:
        for handle in handles:
            handle.remove()
    return {layer: total / len(ids) for layer, total in sums.items()}, len(ids)


def _no_hooks(model):
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_matches_direct_computation(tiny, corpus, tmp_path, model_type):
    bundle = tiny(model_type)
    got = layer_stats(bundle.model, bundle.tokenizer, [1, 0], corpus, cache_dir=tmp_path / "c", **KW)
    assert list(got) == [1, 0]
    ref, count = _direct(bundle, _docs(), [0, 1])
    width = 4 * bundle.model.config.n_embd if model_type == "gpt2" else bundle.model.config.intermediate_size
    for layer in (0, 1):
        assert got[layer].count == count
        assert got[layer].mom2.shape == (width, width) and got[layer].mom2.dtype == torch.float64
        torch.testing.assert_close(got[layer].mom2, ref[layer], rtol=1e-5, atol=1e-8)
        assert torch.equal(got[layer].mom2, got[layer].mom2.T)
        assert got[layer].path.is_file()


def test_float32_products_close_to_float64(tiny, corpus, tmp_path):
    b = tiny("llama")
    f64 = layer_stats(b.model, b.tokenizer, [1], corpus, cache_dir=tmp_path, **KW)[1]
    f32 = layer_stats(b.model, b.tokenizer, [1], corpus, cache_dir=tmp_path, dtype=torch.float32, **KW)[1]
    assert f32.path != f64.path and f32.mom2.dtype == torch.float64
    torch.testing.assert_close(f32.mom2, f64.mom2, rtol=1e-4, atol=1e-7)


def test_forward_stops_after_highest_layer(corpus, tmp_path):
    bundle = tiny_model("llama", num_hidden_layers=4)
    model, arch = bundle.model, arch_for(bundle.model)
    calls = {i: 0 for i in range(4)}
    handles = [
        get_module(model, arch.layer_path(i)).register_forward_pre_hook(
            lambda m, a, _i=i: calls.__setitem__(_i, calls[_i] + 1)
        )
        for i in range(4)
    ]
    norm_calls = []
    handles.append(get_module(model, arch.final_norm).register_forward_hook(lambda *a: norm_calls.append(1)))
    try:
        got = layer_stats(model, bundle.tokenizer, [0, 1], corpus, cache_dir=tmp_path, **KW)
    finally:
        for handle in handles:
            handle.remove()
    assert calls[0] > 0 and calls[1] == calls[0]
    assert calls[2] == 0 and calls[3] == 0 and not norm_calls
    ref, _ = _direct(bundle, _docs(), [0, 1])
    torch.testing.assert_close(got[1].mom2, ref[1], rtol=1e-5, atol=1e-8)


def test_cache_hit_and_misses(tiny, corpus, tmp_path, monkeypatch):
    b = tiny("gpt2")
    forwards = []
    original = b.model.forward

    def counting(*args, **kwargs):
        forwards.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(b.model, "forward", counting)
    gathered = []
    real_gather = stats._gather
    def recording_gather(model, tokenizer, paths, *args, **kwargs):
        gathered.append(sorted(paths))
        return real_gather(model, tokenizer, paths, *args, **kwargs)

    monkeypatch.setattr(stats, "_gather", recording_gather)

    first = layer_stats(b.model, b.tokenizer, [0], corpus, cache_dir=tmp_path, **KW)
    assert gathered == [[0]] and forwards
    mtime = first[0].path.stat().st_mtime_ns

    def boom(*args, **kwargs):
        raise AssertionError("the model ran on a cache hit")

    monkeypatch.setattr(b.model, "forward", boom)
    start = time.perf_counter()
    again = layer_stats(b.model, b.tokenizer, [0], corpus, cache_dir=tmp_path, **KW)
    assert time.perf_counter() - start < 0.5
    assert torch.equal(again[0].mom2, first[0].mom2) and again[0].count == first[0].count
    assert again[0].path == first[0].path

    monkeypatch.setattr(b.model, "forward", counting)
    # partly cached: only layer 1 is computed, layer 0 is loaded (its file untouched)
    both = layer_stats(b.model, b.tokenizer, [0, 1], corpus, cache_dir=tmp_path, **KW)
    assert gathered[-1] == [1]
    assert first[0].path.stat().st_mtime_ns == mtime and torch.equal(both[0].mom2, first[0].mom2)
    # misses: n_tokens, corpus content, max_seq_len, model weights
    capped = layer_stats(b.model, b.tokenizer, [0], corpus, cache_dir=tmp_path, n_tokens=50, **KW)
    assert gathered[-1] == [0] and capped[0].count == 50 and capped[0].path != first[0].path
    other_path = tmp_path / "other.txt"
    other_path.write_text("\n\n".join(_docs()[:2]) + "\n", encoding="utf-8")
    other = layer_stats(b.model, b.tokenizer, [0], TextFile(other_path), cache_dir=tmp_path, **KW)
    assert len(gathered) == 4 and other[0].count < first[0].count
    longer = layer_stats(b.model, b.tokenizer, [0], corpus, cache_dir=tmp_path, **{**KW, "max_seq_len": 64})
    assert len(gathered) == 5 and longer[0].path != first[0].path
    seed1 = tiny_model("gpt2", seed=1)
    assert model_identity(seed1.model) != model_identity(b.model)
    layer_stats(seed1.model, seed1.tokenizer, [0], corpus, cache_dir=tmp_path, **KW)
    assert len(gathered) == 6


def test_cache_root_from_environment(tiny, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("EDITLAB_CACHE", str(tmp_path / "env"))
    b = tiny("llama")
    got = layer_stats(b.model, b.tokenizer, [0], corpus, **KW)
    assert got[0].path.is_relative_to(tmp_path / "env" / "stats")
    assert not list(got[0].path.parent.glob(".*"))  # no temp files left behind


def test_count_is_every_packed_token(tiny, corpus, tmp_path):
    b = tiny("gpt2")
    stream = packed_stream(b.tokenizer, _docs())
    full = layer_stats(b.model, b.tokenizer, [1], corpus, cache_dir=tmp_path, **KW)
    assert full[1].count == len(stream)
    capped = layer_stats(b.model, b.tokenizer, [1], corpus, cache_dir=tmp_path, n_tokens=70, **KW)
    assert capped[1].count == 70


def test_model_unchanged_and_no_hooks(corpus, tmp_path):
    bundle = tiny_model("gpt2")
    model = bundle.model
    model.train()
    model.transformer.h[0].eval()  # mixed modes come back as they were
    modes = {name: m.training for name, m in model.named_modules()}
    before = state_copy(model)
    layer_stats(model, bundle.tokenizer, [0, 1], corpus, cache_dir=tmp_path, **KW)
    assert_state_equal(model, before)
    _no_hooks(model)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(not p.requires_grad for p in model.parameters())


def test_rejects_bad_arguments(tiny, corpus, tmp_path):
    b = tiny("gpt2")
    with pytest.raises(ValueError, match="out of range"):
        layer_stats(b.model, b.tokenizer, [2], corpus, cache_dir=tmp_path, **KW)
    with pytest.raises(ValueError, match="dtype"):
        layer_stats(b.model, b.tokenizer, [0], corpus, cache_dir=tmp_path, dtype=torch.float16, **KW)
    t5 = tiny("t5")
    with pytest.raises(ValueError, match="decoder-only"):
        layer_stats(t5.model, t5.tokenizer, [0], corpus, cache_dir=tmp_path, **KW)


def test_a_cache_file_that_is_corrupt_or_pickled_is_recomputed_not_run(tmp_path):
    """A stats cache file is data from disk: truncated, corrupt or holding a pickle payload, it is
    skipped with a warning (and recomputed), never executed."""
    import os
    import pickle

    from editlab.stats import _load

    class Payload:
        def __reduce__(self):
            return (os.makedirs, (str(tmp_path / "made_by_pickle"),))

    key = {"corpus": "x"}
    pickled = tmp_path / "pickled.pt"
    torch.save({"key": Payload()}, pickled)
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(Payload()))
    cut = tmp_path / "cut.pt"
    torch.save({"mom2": torch.ones(2, 2), "count": 1, "key": "k"}, cut)
    cut.write_bytes(cut.read_bytes()[:40])
    listed = tmp_path / "listed.pt"
    torch.save([1, 2], listed)
    for path in (pickled, raw, cut, listed):
        assert _load(path, key) is None, path
    assert not (tmp_path / "made_by_pickle").exists()


def test_is_cached_tells_whether_layer_stats_would_load_without_computing(tiny, corpus, tmp_path,
                                                                          monkeypatch):
    b = tiny("llama")
    ran = []
    real_gather = stats._gather
    monkeypatch.setattr(stats, "_gather", lambda *a, **k: ran.append(1) or real_gather(*a, **k))
    args = (b.model, b.tokenizer)
    kw = dict(cache_dir=tmp_path, max_seq_len=SEQ)
    assert not stats.is_cached(*args, [0], corpus, **kw) and not ran  # nothing computed or written
    assert not any(tmp_path.rglob("*.pt"))
    got = layer_stats(*args, [0], corpus, cache_dir=tmp_path, **KW)
    assert stats.is_cached(*args, [0], corpus, **kw)
    assert not stats.is_cached(*args, [0, 1], corpus, **kw)  # every layer asked for must be cached
    # another statistic: n_tokens, row length, dtype, role, corpus, model weights
    assert not stats.is_cached(*args, [0], corpus, n_tokens=50, **kw)
    assert not stats.is_cached(*args, [0], corpus, cache_dir=tmp_path, max_seq_len=64)
    assert not stats.is_cached(*args, [0], corpus, dtype=torch.float32, **kw)
    assert not stats.is_cached(*args, [0], corpus, role="mlp_in", **kw)
    other = tmp_path / "other.txt"
    other.write_text(_docs()[0] + "\n", encoding="utf-8")
    assert not stats.is_cached(*args, [0], TextFile(other), **kw)
    seed1 = tiny_model("llama", seed=1)
    assert not stats.is_cached(seed1.model, seed1.tokenizer, [0], corpus, **kw)
    # a file at the right path that holds something else, or is unreadable, is not a cached statistic
    path = got[0].path
    path.write_bytes(path.read_bytes()[:40])
    assert not stats.is_cached(*args, [0], corpus, **kw)
    with pytest.raises(ValueError, match="out of range"):
        stats.is_cached(*args, [2], corpus, **kw)
    assert len(ran) == 1
