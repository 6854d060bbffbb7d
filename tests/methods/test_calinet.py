"""CaliNet on tiny models: the calibration slots raise the target, sit beside the last FFN, are
shaped like the host FFN, accumulate in a stream, and leave the model as it was."""

import json

import lightning as L
import pytest
import torch

from editlab.data.datamodule import EditDataModule
from editlab.lit.callbacks import EditorCallback
from editlab.lit.edit_eval import EditEvalModule
from editlab.methods.base import EditError, WeightEditSession, applied
from editlab.methods.calinet import CaliNet
from editlab.methods.patches import FFNPatch, HostReplay, host_patches
from editlab.evaluation.teacher_forced import score_pairs

from conftest import assert_state_equal, state_copy

FAST = dict(max_steps=150)


def _p_target(bundle, rec):
    s = score_pairs(bundle.model, bundle.tokenizer, [rec.prompt], [rec.target_new])
    return float(torch.exp(-s.nll[0])), bool((s.pred[0] == s.target[0])[s.mask[0]].all())


def _snapshot(model):
    return (state_copy(model), [n for n, _ in model.named_modules()],
            {n: p.requires_grad for n, p in model.named_parameters()},
            sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()))


def _assert_unchanged(model, snap):
    state, names, grads, hooks = snap
    assert_state_equal(model, state)
    assert [n for n, _ in model.named_modules()] == names
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks


@pytest.mark.parametrize("model_type,path,gated,act", [
    ("llama", "model.layers.3.mlp", True, "silu"),
    ("gpt2", "transformer.h.3.mlp", False, "gelu_new"),
])
def test_slots_beside_the_last_ffn_raise_the_target(tiny_deep, records, model_type, path, gated, act):
    bundle = tiny_deep(model_type)
    rec = records[0]
    snap = _snapshot(bundle.model)
    p0, hit0 = _p_target(bundle, rec)
    editor = CaliNet(**FAST)
    edit = editor.compute_edit(bundle.model, bundle.tokenizer, [rec])
    _assert_unchanged(bundle.model, snap)  # compute_edit leaves the model alone
    ((where, patch),) = edit.patches.items()
    assert where == path and isinstance(patch, FFNPatch)
    assert patch.num_slots == 64 and patch.bias is None  # the paper's 64 slots, bias-free like the repository
    assert (patch.gates is not None) == gated and patch.activation == act  # built like the host FFN
    assert editor.last_losses[-1] < editor.last_losses[0]
    with applied(bundle.model, edit):
        p1, hit1 = _p_target(bundle, rec)
    assert p1 > p0 and not hit0 and hit1
    _assert_unchanged(bundle.model, snap)


def test_seq2seq_calibrates_the_decoder(tiny, records):
    bundle = tiny("t5")
    snap = _snapshot(bundle.model)
    rec = records[1]
    p0, _ = _p_target(bundle, rec)
    edit = CaliNet(**FAST).compute_edit(bundle.model, bundle.tokenizer, [rec])
    ((path, patch),) = edit.patches.items()
    assert path == "decoder.block.1.layer.2.DenseReluDense" and patch.gates is None and patch.activation == "relu"
    with applied(bundle.model, edit):
        p1, _ = _p_target(bundle, rec)
    assert p1 > p0
    _assert_unchanged(bundle.model, snap)


def test_batch_shares_slots_and_a_stream_adds_blocks(tiny_deep, records):
    bundle = tiny_deep("llama")
    snap = _snapshot(bundle.model)
    editor = CaliNet(num_slots=8, **FAST)
    session = WeightEditSession(bundle.model)
    try:
        session.apply(editor.compute_edit(bundle.model, bundle.tokenizer, records[:2]))
        session.apply(editor.compute_edit(bundle.model, bundle.tokenizer, records[2:]))
        patches = host_patches(bundle.model.get_submodule("model.layers.3.mlp"))
        assert [p.num_slots for p in patches] == [8, 8]
    finally:
        session.restore()
    _assert_unchanged(bundle.model, snap)


def test_early_stop_and_seeded_initialisation(tiny_deep, records):
    bundle = tiny_deep("llama")
    a = CaliNet(max_steps=3, early_stop_loss=None)
    pa = a.compute_edit(bundle.model, bundle.tokenizer, records[:1]).patches["model.layers.3.mlp"]
    b = CaliNet(max_steps=3, early_stop_loss=None)
    pb = b.compute_edit(bundle.model, bundle.tokenizer, records[:1]).patches["model.layers.3.mlp"]
    assert a.last_steps == 3 and torch.equal(pa.keys, pb.keys) and torch.equal(pa.values, pb.values)
    stopped = CaliNet(max_steps=500, early_stop_loss=10.0)
    stopped.compute_edit(bundle.model, bundle.tokenizer, records[:1])
    assert stopped.last_steps == 1  # the loss starts below 10


def test_bad_record_and_failure_midway_leave_the_model_unchanged(tiny, records, monkeypatch):
    bundle = tiny("gpt2")
    snap = _snapshot(bundle.model)
    bad = type(records[0])(record_id=11, prompt="The capital of France is", subject="France", target_new="x")
    object.__setattr__(bad, "prompt", "")  # past the record's own validation
    with pytest.raises(EditError, match=r"record 11: field 'prompt'"):
        CaliNet(**FAST).compute_edit(bundle.model, bundle.tokenizer, [bad])
    _assert_unchanged(bundle.model, snap)

    original = HostReplay.nll
    calls = {"n": 0}

    def failing(self, hidden):
        calls["n"] += 1
        if calls["n"] == 2:
            return original(self, hidden) * float("nan")
        return original(self, hidden)

    monkeypatch.setattr(HostReplay, "nll", failing)
    with pytest.raises(EditError, match="loss became nan at step 2 for records"):
        CaliNet(**FAST).compute_edit(bundle.model, bundle.tokenizer, records[:1])
    _assert_unchanged(bundle.model, snap)


@pytest.mark.parametrize("sequential", [False, True])
def test_edit_loop_end_to_end(tiny_deep, records, tmp_path, sequential):
    bundle = tiny_deep("llama")
    snap = _snapshot(bundle.model)
    module = EditEvalModule(bundle, output_dir=str(tmp_path))
    trainer = L.Trainer(accelerator="cpu", devices=1, inference_mode=False, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[EditorCallback(CaliNet(**FAST), sequential=sequential)])
    trainer.test(module, datamodule=EditDataModule(test=lambda: records[:2], batch_size=1), verbose=False)
    rows = [json.loads(x) for x in (tmp_path / "records.jsonl").read_text().splitlines()]
    _assert_unchanged(bundle.model, snap)
    assert len(rows) == 2 and all(r["edit_seconds"] > 0 for r in rows)
    summary = module.summary
    assert summary["post/efficacy_magnitude"] > summary["pre/efficacy_magnitude"]
    assert summary["post/reliability"] > summary["pre/reliability"]


def test_experiment_runs_through_the_entry_point(tmp_path):
    """``experiment=calinet_smollm2_counterfact`` with a tiny model and a two-record
    counterfact-val-style file: the Hydra config instantiates CaliNet and the edit loop runs it."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf, open_dict

    from editlab.train import run

    rows = [{"case_id": i, "prompt": f"The capital of {s} is", "subject": s, "target_new": "Rome",
             "ground_truth": "Paris", "rephrase_prompt": f"The capital city of {s} is",
             "locality_prompt": "The capital of Italy is", "locality_ground_truth": "Rome"}
            for i, s in enumerate(("France", "Spain"))]
    (tmp_path / "cf.json").write_text(json.dumps(rows))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[2] / "editlab" / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True, overrides=[
            "experiment=calinet_smollm2_counterfact", "model=tiny_llama", f"paths.data_dir={tmp_path}",
            "data.test.path=cf.json", "method.max_steps=10", "logger=csv", "callbacks=none"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "out")
    OmegaConf.resolve(cfg.paths)
    summary = run(cfg)
    assert len((tmp_path / "out" / "records.jsonl").read_text().splitlines()) == 2
    assert "post/reliability" in summary and "post/efficacy_score" in summary
