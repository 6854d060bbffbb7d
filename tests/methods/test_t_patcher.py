"""T-Patcher on tiny models: the neuron fires on the edit and stays silent on the memory, the edit
happens, patches accumulate in a stream, and nothing else of the model changes."""

import json

import lightning as L
import pytest
import torch

from editlab.data.datamodule import EditDataModule
from editlab.lit.callbacks import EditorCallback
from editlab.lit.edit_eval import EditEvalModule
from editlab.methods.base import EditError, WeightEditSession, applied
from editlab.methods.patches import FFNPatch, HostReplay, host_patches
from editlab.methods.t_patcher import TPatcher
from editlab.evaluation.teacher_forced import score_pairs
from editlab.models.arch import is_encoder_decoder
from editlab.tracing import Trace

from conftest import assert_state_equal, state_copy

MEMORY = [
    "Apple is a company based in California.",
    "Google was founded by Larry Page and Sergey Brin.",
    "Lionel Messi plays football.",
    "She was a chemist and a physicist.",
]
FAST = dict(memory_corpus=MEMORY, lr=0.05, max_steps=300, check_every=10)  # the paper's lr 1e-2 needs ~4x the steps


def _german(records):
    """records[1] asking for a one-token target (" German")."""
    r = records[1]
    return type(r)(record_id="german", prompt=r.prompt, subject=r.subject, target_new="German")


def _p_target(bundle, rec):
    s = score_pairs(bundle.model, bundle.tokenizer, [rec.prompt], [rec.target_new])
    return float(torch.exp(-s.nll[0])), bool((s.pred[0] == s.target[0])[s.mask[0]].all())


def _host_inputs(bundle, path, texts):
    """Inputs of the host MLP at every real position of ``texts`` (one forward each)."""
    out = []
    for text in texts:
        ids = bundle.tokenizer(text, return_tensors="pt")["input_ids"]
        extra = {"decoder_input_ids": ids} if is_encoder_decoder(bundle) else {}
        with Trace(bundle.model, [path], retain_input=True, stop=True) as tr, torch.no_grad():
            bundle.model(input_ids=ids, use_cache=False, **extra)
        out.append(tr.inputs[path].reshape(-1, tr.inputs[path].shape[-1]))
    return torch.cat(out)


def _snapshot(model):
    return (state_copy(model), [n for n, _ in model.named_modules()],
            {n: p.requires_grad for n, p in model.named_parameters()},
            {n: m.training for n, m in model.named_modules()},
            sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()))


def _assert_unchanged(model, snap):
    state, names, grads, modes, hooks = snap
    assert_state_equal(model, state)
    assert [n for n, _ in model.named_modules()] == names
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks


@pytest.mark.parametrize("model_type,settings", [
    ("llama", dict(memory_corpus=MEMORY, max_steps=400)),  # the paper's optimiser settings
    ("gpt2", FAST),
])
def test_neuron_fires_on_the_edit_and_not_on_memory_and_the_edit_happens(tiny_deep, records, model_type, settings):
    bundle = tiny_deep(model_type)
    rec = records[0]  # " Rome": one token, one neuron
    snap = _snapshot(bundle.model)
    p0, hit0 = _p_target(bundle, rec)
    editor = TPatcher(**settings)
    edit = editor.compute_edit(bundle.model, bundle.tokenizer, [rec])
    _assert_unchanged(bundle.model, snap)  # compute_edit leaves the model alone
    ((path, patch),) = edit.patches.items()
    assert path == ("model.layers.3.mlp" if model_type == "llama" else "transformer.h.3.mlp")  # the last FFN
    assert isinstance(patch, FFNPatch) and patch.num_slots == 1
    assert patch.activation == ("relu" if model_type == "llama" else "gelu_new")  # gated host -> ReLU
    # fires on the edit token (the last prompt position, which predicts the target) ...
    edit_q = HostReplay(bundle.model, bundle.tokenizer, [rec], 3, "t").inputs
    assert patch.pre_activation(edit_q).min() > 0
    # ... and stays silent on every position of the memory prompts
    assert patch.pre_activation(_host_inputs(bundle, path, MEMORY)).max() <= 0
    with applied(bundle.model, edit):
        p1, hit1 = _p_target(bundle, rec)
    assert not hit0 and hit1 and p1 > p0
    _assert_unchanged(bundle.model, snap)  # restore removed the neuron


def test_sequential_neurons_accumulate_and_restore_removes_them(tiny_deep, records):
    bundle = tiny_deep("llama")
    snap = _snapshot(bundle.model)
    editor = TPatcher(**FAST)
    session = WeightEditSession(bundle.model)
    try:
        first = editor.compute_edit(bundle.model, bundle.tokenizer, [records[0]])
        session.apply(first)
        second = editor.compute_edit(bundle.model, bundle.tokenizer, [_german(records)])
        session.apply(second)
        host = bundle.model.get_submodule("model.layers.3.mlp")
        patches = host_patches(host)
        assert len(patches) == 2 and [p.num_slots for p in patches] == [1, 1]  # two edits, two neurons
        assert session.patches == patches
        # the later neurons learned to stay silent on the first edit's inputs (its anchors)
        assert patches[1].pre_activation(patches[0].anchors).max() <= 0
        assert _p_target(bundle, records[0])[1], "the first edit still holds with the second installed"
        assert _p_target(bundle, _german(records))[1]
        # a mistake already corrected by an installed neuron gets no new one
        assert editor.compute_edit(bundle.model, bundle.tokenizer, [records[0]]).patches == {}
    finally:
        session.restore()
    _assert_unchanged(bundle.model, snap)


def test_one_neuron_per_wrong_target_token(tiny_deep, records):
    bundle = tiny_deep("llama")
    editor = TPatcher(**{**FAST, "max_steps": 20})
    replay = HostReplay(bundle.model, bundle.tokenizer, records, 3, "t")
    with torch.no_grad():
        wrong = replay.wrong(replay.hidden(None))
    expected = sum(min(int((wrong & replay.record_mask(i)).sum()), 5) for i in range(len(records)))
    edit = editor.compute_edit(bundle.model, bundle.tokenizer, records)
    (patch,) = edit.patches.values()
    assert patch.num_slots == expected >= len(records)
    assert TPatcher(**{**FAST, "max_steps": 20, "max_neurons_per_edit": 1}).compute_edit(
        bundle.model, bundle.tokenizer, records).patches["model.layers.3.mlp"].num_slots == len(records)


def test_bad_record_and_failure_midway_leave_the_model_unchanged(tiny, records, monkeypatch):
    bundle = tiny("llama")
    snap = _snapshot(bundle.model)
    bad = type(records[0])(record_id="r7", prompt="The capital of France is", subject="France", target_new="x")
    object.__setattr__(bad, "target_new", " ")  # past the record's own validation
    with pytest.raises(EditError, match=r"record 'r7': field 'target_new'"):
        TPatcher(**FAST).compute_edit(bundle.model, bundle.tokenizer, [bad])
    _assert_unchanged(bundle.model, snap)

    calls = {"n": 0}
    original = FFNPatch.compute

    def failing(*args):  # raised from inside the hooked host MLP, mid-training
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("synthetic failure inside the patched forward")
        return original(*args)

    monkeypatch.setattr(FFNPatch, "compute", staticmethod(failing))
    session = WeightEditSession(bundle.model)
    with pytest.raises(RuntimeError, match="synthetic"):
        session.apply(TPatcher(**FAST).compute_edit(bundle.model, bundle.tokenizer, [records[0]]))
    assert not session.edited and calls["n"] == 3
    _assert_unchanged(bundle.model, snap)  # the hook is gone, nothing else changed
    with pytest.raises(EditError, match="no records"):
        TPatcher(**FAST).compute_edit(bundle.model, bundle.tokenizer, [])
    with pytest.raises(EditError, match="out of range"):
        TPatcher(layer=5, **FAST).compute_edit(bundle.model, bundle.tokenizer, records[:1])


def test_memory_is_cached_per_model_and_host(tiny, tmp_path):
    bundle = tiny("gpt2")
    corpus_file = tmp_path / "wiki.txt"
    corpus_file.write_text("The river flows through the city.\n\nThe sea is to the south of the country.\n")
    from editlab.data.corpora import TextFile

    editor = TPatcher(memory_corpus=TextFile(str(corpus_file)), memory_tokens=10, memory_seq_len=8)
    m1 = editor.memory(bundle.model, bundle.tokenizer, "transformer.h.1.mlp")
    assert m1.shape == (10, 32) and m1.dtype == torch.float32
    assert editor.memory(bundle.model, bundle.tokenizer, "transformer.h.1.mlp") is m1
    assert editor.memory(bundle.model, bundle.tokenizer, "transformer.h.0.mlp") is not m1
    from editlab.data.corpora import WikipediaSample

    default = TPatcher(memory_tokens=100)  # the offline Wikipedia sample
    assert isinstance(default.memory_corpus, WikipediaSample)
    assert default.memory(bundle.model, bundle.tokenizer, "transformer.h.1.mlp").shape == (100, 32)
    prompts = TPatcher(memory_corpus=MEMORY, memory_tokens=1000)
    n_tokens = sum(len(bundle.tokenizer(t)["input_ids"]) for t in MEMORY)
    assert prompts.memory(bundle.model, bundle.tokenizer, "transformer.h.1.mlp").shape[0] == n_tokens


def test_seq2seq_patches_the_decoder_last_ffn(tiny, records):
    bundle = tiny("t5")
    snap = _snapshot(bundle.model)
    rec = records[0]
    p0, _ = _p_target(bundle, rec)
    edit = TPatcher(**{**FAST, "max_steps": 60}).compute_edit(bundle.model, bundle.tokenizer, [rec])
    ((path, patch),) = edit.patches.items()
    assert path == "decoder.block.1.layer.2.DenseReluDense" and patch.activation == "relu"
    with applied(bundle.model, edit):
        p1, _ = _p_target(bundle, rec)
    assert p1 > p0
    _assert_unchanged(bundle.model, snap)


def _loop(bundle, editor, tmp_path, recs, sequential):
    module = EditEvalModule(bundle, output_dir=str(tmp_path), score_after_stream=sequential)
    trainer = L.Trainer(accelerator="cpu", devices=1, inference_mode=False, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[EditorCallback(editor, sequential=sequential)])
    trainer.test(module, datamodule=EditDataModule(test=lambda: recs, batch_size=1), verbose=False)
    rows = [json.loads(x) for x in (tmp_path / "records.jsonl").read_text().splitlines()]
    return module.summary, rows


@pytest.mark.parametrize("sequential", [False, True])
def test_edit_loop_end_to_end(tiny_deep, records, tmp_path, sequential):
    bundle = tiny_deep("llama")
    snap = _snapshot(bundle.model)
    recs = [records[0], _german(records)]
    summary, rows = _loop(bundle, TPatcher(**FAST), tmp_path, recs, sequential)
    _assert_unchanged(bundle.model, snap)
    assert len(rows) == 2 and all(r["edit_seconds"] > 0 for r in rows)
    assert summary["pre/reliability"] == 0.0 and summary["post/reliability"] == 1.0
    assert summary["post/efficacy_score"] > summary["pre/efficacy_score"]
    if sequential:  # the first edit, rescored after the whole stream, still holds
        assert rows[0]["final"]["reliability"] == 1.0
    assert "post/locality" in summary


def test_experiment_runs_through_the_entry_point(tmp_path):
    """``experiment=t_patcher_smollm2_zsre`` with a tiny model, a two-record zsRE file and a small
    memory corpus: the Hydra config instantiates T-Patcher and the edit loop runs it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf, open_dict

    from editlab.models.tiny import TINY_CORPUS
    from editlab.train import run

    rows = [{"subject": s, "src": f"The capital of {s} is", "alt": "Rome", "answers": ["Paris"],
             "rephrase": f"The capital city of {s} is", "loc": "nq question: who wrote hamlet",
             "loc_ans": "Shakespeare"} for s in ("France", "Spain")]
    (tmp_path / "zsre.json").write_text(json.dumps(rows))
    (tmp_path / "corpus.txt").write_text(TINY_CORPUS)
    GlobalHydra.instance().clear()
    configs = str(__import__("pathlib").Path(__file__).resolve().parents[2] / "editlab" / "configs")
    with initialize_config_dir(config_dir=configs, version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True, overrides=[
            "experiment=t_patcher_smollm2_zsre", "model=tiny_llama", f"paths.data_dir={tmp_path}",
            "data.test.path=zsre.json", "module.scoring.generation_framing=plain", "method.max_steps=20",
            "method.memory_tokens=64",
            "method.memory_corpus._target_=editlab.data.corpora.TextFile",
            f"+method.memory_corpus.path={tmp_path / 'corpus.txt'}", "logger=csv", "callbacks=none"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "out")
    OmegaConf.resolve(cfg.paths)
    summary = run(cfg)
    assert len((tmp_path / "out" / "records.jsonl").read_text().splitlines()) == 2
    assert "post/reliability" in summary and "post/locality" in summary
