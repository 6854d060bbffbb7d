"""The same computations on a CUDA device as on the CPU (skipped where no GPU is present).

Every editor, the scorer, the layer statistics and causal tracing are run on a CUDA copy of a tiny
model and compared with the CPU result; editing then restoring on the GPU must be bit-exact.
TF32 is switched off so the GPU computes in true fp32.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import lightning as L
import pytest
import torch

from editlab.analysis.causal import noise_std, trace_prompt
from editlab.data.collate import EditBatchCollator
from editlab.data.corpora import TextFile
from editlab.data.datamodule import EditDataModule
from editlab.lit.callbacks import EditorCallback
from editlab.lit.edit_eval import EditEvalModule
from editlab.lit.editor_train import EditorTrainModule
from editlab.methods.ft import FTL
from editlab.methods.ke import KE
from editlab.methods.kn import KN
from editlab.methods.memit import MEMIT
from editlab.methods.mend import MEND
from editlab.methods.rome import ROME
from editlab.models.tiny import TINY_CORPUS
from editlab.evaluation.teacher_forced import score_pairs
from editlab.stats import layer_stats

from conftest import assert_state_equal, make_records, state_copy

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def _exact_fp32(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITLAB_CACHE", str(tmp_path / "cache"))
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TINY_CORPUS, encoding="utf-8")
    return TextFile(path)


def _on_cuda(bundle):
    return replace(bundle, model=copy.deepcopy(bundle.model).to("cuda"))


def _editors(corpus, tmp_path):
    kv = dict(layers=[1], fact_token="last", v_num_grad_steps=10, v_lr=0.5, v_weight_decay=1e-3,
              clamp_norm_factor=20.0, context_template_length_params=((5, 2),), template_prompts=("The", "I"),
              mom2_corpus=corpus, stats_cache_dir=str(tmp_path / "stats"))
    return {
        "ft": FTL(layers=[1], lr=0.05, num_steps=10, objective="teacher_forced"),
        "rome": ROME(**kv),
        "memit": MEMIT(**dict(kv, layers=[1, 2], mom2_update_weight=10.0)),
        "kn": KN(steps=4),
    }


@pytest.mark.parametrize("method", ["ft", "rome", "memit", "kn"])
@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_editor_on_cuda_matches_cpu_and_restores(tiny_deep, corpus, tmp_path, method, model_type):
    cpu = tiny_deep(model_type)
    gpu = _on_cuda(cpu)
    recs = make_records()[:2] if method == "memit" else make_records()[:1]
    editor = _editors(corpus, tmp_path)[method]
    before = state_copy(gpu.model)
    d_cpu = editor.compute_deltas(cpu.model, cpu.tokenizer, recs)
    with editor.apply(gpu.model, gpu.tokenizer, recs) as session:
        d_gpu = session.deltas
        assert set(d_gpu) == set(d_cpu)
        for name, delta in d_gpu.items():
            assert delta.device.type == "cuda" or delta.is_cpu  # deltas may be kept on either side
            torch.testing.assert_close(delta.cpu().float(), d_cpu[name].float(), rtol=2e-3, atol=2e-4 * d_cpu[name].abs().max().item() + 1e-6)
        s = score_pairs(gpu.model, gpu.tokenizer, [r.prompt for r in recs], [r.target_new for r in recs])
        assert s.nll.device.type == "cuda" or s.nll.is_cpu
    assert_state_equal(gpu.model, before)
    s0 = score_pairs(gpu.model, gpu.tokenizer, [r.prompt for r in recs], [r.target_new for r in recs])
    assert (s.nll.cpu() < s0.nll.cpu()).all(), "the edit raises the target probability on the GPU too"


def test_scoring_on_cuda_matches_cpu(tiny):
    cpu = tiny("llama")
    gpu = _on_cuda(cpu)
    recs = make_records()
    prompts = [r.prompt for r in recs] + [p for r in recs for p in r.rephrase_prompts]
    targets = [r.target_new for r in recs] + [r.target_new for r in recs for _ in r.rephrase_prompts]
    a = score_pairs(cpu.model, cpu.tokenizer, prompts, targets)
    b = score_pairs(gpu.model, gpu.tokenizer, prompts, targets)
    torch.testing.assert_close(b.nll.cpu(), a.nll, rtol=1e-4, atol=1e-5)


def test_layer_stats_on_cuda_match_cpu(tiny, corpus, tmp_path):
    cpu = tiny("gpt2")
    gpu = _on_cuda(cpu)
    kw = dict(max_seq_len=32, batch_tokens=128, progress=False)
    a = layer_stats(cpu.model, cpu.tokenizer, [0, 1], corpus, cache_dir=tmp_path / "a", **kw)
    b = layer_stats(gpu.model, gpu.tokenizer, [0, 1], corpus, cache_dir=tmp_path / "b", **kw)
    for layer in (0, 1):
        assert b[layer].count == a[layer].count
        torch.testing.assert_close(b[layer].mom2.cpu(), a[layer].mom2, rtol=1e-4, atol=1e-6)


def test_causal_trace_on_cuda_matches_cpu(tiny):
    cpu = tiny("llama")
    gpu = _on_cuda(cpu)
    noise = 3 * noise_std(cpu.model, cpu.tokenizer, ["Victor Hugo", "France"])
    kw = dict(noise=noise, kinds=["hidden", "mlp"], samples=3, window=2)
    a = trace_prompt(cpu.model, cpu.tokenizer, "The mother tongue of Victor Hugo was", "Victor Hugo", **kw)
    b = trace_prompt(gpu.model, gpu.tokenizer, "The mother tongue of Victor Hugo was", "Victor Hugo", **kw)
    for kind in kw["kinds"]:
        assert b[kind].answer_id == a[kind].answer_id
        assert abs(b[kind].high - a[kind].high) < 1e-4
        # the noise draws are seeded on the CPU, so both devices corrupt identically
        assert abs(b[kind].low - a[kind].low) < 1e-4
        assert abs(b[kind].scores - a[kind].scores).max() < 1e-3


def test_edit_loop_on_gpu_trainer(tiny, tmp_path):
    gpu = _on_cuda(tiny("gpt2"))
    before = {k: v.cpu() for k, v in state_copy(gpu.model).items()}
    module = EditEvalModule(gpu, output_dir=str(tmp_path))
    trainer = L.Trainer(accelerator="gpu", devices=1, inference_mode=False, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[EditorCallback(FTL(layers=[1], lr=0.05, num_steps=40, objective="teacher_forced"))])
    trainer.test(module, datamodule=EditDataModule(test=make_records), verbose=False)
    assert module.summary["post/reliability"] == 1.0
    assert module.summary["post/reliability"] > module.summary["pre/reliability"]
    # Lightning's single-device teardown moves the module (and so the model) back to the CPU
    assert_state_equal(gpu.model.cpu(), before)


def _trainable(name: str, **kwargs):
    torch.manual_seed(0)
    return MEND(rank=16, **kwargs) if name == "mend" else KE(hidden_dim=16, condition_dim=32, **kwargs)


@pytest.mark.parametrize("batch_edits", ["joint", "independent"])
@pytest.mark.parametrize("name", ["mend", "ke"])
def test_trainable_editor_objective_on_cuda_matches_cpu(tiny, name, batch_edits):
    """One training objective (losses and the editor's gradients) is the same on both devices,
    for a joint batch edit and for independent edits in one batched pass (RowDeltas hooks)."""
    cpu = tiny("llama")
    gpu = _on_cuda(cpu)
    results = []
    for bundle in (cpu, gpu):
        editor = _trainable(name, batch_edits=batch_edits)
        editor.bind(bundle.model)
        editor.to(bundle.model.device).train()
        batch = EditBatchCollator(bundle.tokenizer)(make_records()).to(bundle.model.device)
        out = editor.training_losses(bundle.model, batch)
        out["loss"].backward()
        grads = {n: p.grad.detach().cpu() for n, p in editor.named_parameters() if p.grad is not None}
        results.append(({k: float(v.detach()) for k, v in out.items()}, grads))
    (loss_cpu, grad_cpu), (loss_gpu, grad_gpu) = results
    assert set(loss_gpu) == set(loss_cpu) and grad_cpu and set(grad_gpu) == set(grad_cpu)
    for key, value in loss_cpu.items():
        assert loss_gpu[key] == pytest.approx(value, rel=1e-3, abs=1e-5), key
    for key, grad in grad_cpu.items():
        torch.testing.assert_close(grad_gpu[key], grad, rtol=1e-2, atol=1e-3 * grad.abs().max().item() + 1e-7)


def test_editor_training_on_gpu_trainer(tiny, tmp_path):
    """MEND trained by the Lightning module on the GPU: every editor parameter moves, the base model
    does not, and the trained editor's edit raises the target probability on the GPU."""
    bundle = tiny("llama")
    before = state_copy(bundle.model)
    module = EditorTrainModule(bundle, _trainable("mend"), lr=1e-3)
    start = {n: p.detach().clone() for n, p in module.editor.named_parameters()}
    records = make_records()
    trainer = L.Trainer(accelerator="gpu", devices=1, max_steps=3, inference_mode=False, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=EditDataModule(train=lambda: records, train_batch_size=2))
    assert trainer.global_step == 3
    moved = {n for n, p in module.editor.named_parameters()
             if not torch.equal(p.detach().cpu(), start[n].cpu())}
    assert moved == set(start), f"unchanged: {set(start) - moved}"
    gpu = _on_cuda(bundle)
    module.editor.to("cuda").eval()
    prompts, targets = [r.prompt for r in records], [r.target_new for r in records]
    s0 = score_pairs(gpu.model, gpu.tokenizer, prompts, targets)
    with module.editor.apply(gpu.model, gpu.tokenizer, records[:1]):
        s1 = score_pairs(gpu.model, gpu.tokenizer, prompts[:1], targets[:1])
    assert s1.nll.cpu()[0] < s0.nll.cpu()[0]
    assert_state_equal(bundle.model.cpu(), before)
