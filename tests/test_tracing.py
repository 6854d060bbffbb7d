import pytest
import torch
from torch.func import functional_call

from editlab.models.arch import arch_for, get_module
from editlab.tracing import (
    CallRecorder, GradientFactors, RowDeltas, StopForward, Trace, replay_layers,
)

from conftest import CAUSAL_TYPES


def _inputs(bundle, text="The capital of France is Paris"):
    return bundle.tokenizer([text, "A short one"], return_tensors="pt", padding=True)


def _no_hooks(model):
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


@pytest.mark.parametrize("model_type", CAUSAL_TYPES)
def test_trace_captures_inputs_and_outputs(tiny, model_type):
    b = tiny(model_type)
    arch = arch_for(b.model)
    mlp_out = arch.module_path(b.model, "mlp_out", 1)
    block = arch.layer_path(1)
    seen = {}
    mod = get_module(b.model, mlp_out)
    h = mod.register_forward_hook(lambda m, a, o: seen.update(inp=a[0].clone(), out=o.clone()))
    try:
        with torch.no_grad():
            b.model(**_inputs(b))
    finally:
        h.remove()
    with torch.no_grad(), Trace(b.model, [mlp_out, block], retain_input=True, retain_output=True) as tr:
        b.model(**_inputs(b))
    assert torch.equal(tr.inputs[mlp_out], seen["inp"])
    assert torch.equal(tr.outputs[mlp_out], seen["out"])
    assert tr.outputs[block].shape == (*seen["out"].shape[:-1], b.model.config.hidden_size)
    _no_hooks(b.model)


def test_trace_edit_output_changes_logits(tiny):
    b = tiny("gpt2")
    arch = arch_for(b.model)
    path = arch.module_path(b.model, "mlp_out", 0)
    with torch.no_grad():
        base = b.model(**_inputs(b)).logits
        with Trace(b.model, [path], edit_output=lambda p, x: x * 0 + 1.0):
            edited = b.model(**_inputs(b)).logits
        again = b.model(**_inputs(b)).logits
    assert not torch.allclose(base, edited)
    assert torch.equal(base, again)
    _no_hooks(b.model)


def test_stop_forward_skips_the_rest(tiny):
    b = tiny("llama")
    arch = arch_for(b.model)
    first, last = arch.layer_path(0), arch.layer_path(arch.num_layers(b.model) - 1)
    calls = []
    h = get_module(b.model, last).register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with torch.no_grad(), Trace(b.model, [first], retain_output=True, stop=True) as tr:
            b.model(**_inputs(b))
    finally:
        h.remove()
    assert first in tr.outputs and calls == []
    _no_hooks(b.model)


def test_hooks_removed_after_exception(tiny):
    b = tiny("gpt2")
    path = arch_for(b.model).module_path(b.model, "mlp_out", 0)

    def boom(p, x):
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):  # only StopForward is swallowed
        with Trace(b.model, [path], edit_output=boom):
            b.model(**_inputs(b))
    _no_hooks(b.model)


def test_stop_forward_is_swallowed_by_its_trace_only(tiny):
    b = tiny("gpt2")
    arch = arch_for(b.model)
    first, last = arch.layer_path(0), arch.layer_path(1)
    after_forward = []
    with torch.no_grad(), Trace(b.model, [first], retain_output=True, stop=True) as tr:
        b.model(**_inputs(b))
        after_forward.append(1)  # skipped: the stopped forward leaves the block
    assert after_forward == [] and first in tr.outputs
    _no_hooks(b.model)

    def stopper(module, args):
        raise StopForward()

    handle = get_module(b.model, last).register_forward_pre_hook(stopper)
    try:
        with torch.no_grad(), pytest.raises(StopForward):  # outside a Trace it reaches the caller
            b.model(**_inputs(b))
        with torch.no_grad(), Trace(b.model, [first], retain_output=True) as tr:  # inside one it is swallowed
            b.model(**_inputs(b))
        assert first in tr.outputs
    finally:
        handle.remove()
    with torch.no_grad():  # nothing left behind: a full forward reaches the LM head
        logits = b.model(**_inputs(b)).logits
    assert logits.shape[-1] == b.model.config.vocab_size


@pytest.mark.parametrize("model_type", CAUSAL_TYPES)
def test_replay_reproduces_the_forward(tiny, model_type):
    b = tiny(model_type)
    arch = arch_for(b.model)
    n = arch.num_layers(b.model)
    upper = [arch.layer_path(i) for i in range(1, n)]
    inputs = _inputs(b)
    with torch.no_grad():
        with CallRecorder(b.model, upper, stop_at=arch.lm_head) as rec:
            b.model(**inputs, use_cache=False)
        final = get_module(b.model, arch.final_norm)
        replayed = final(replay_layers(b.model, upper, rec.calls, rec.calls[upper[0]].hidden))
    assert torch.allclose(replayed, rec.stopped_input, atol=1e-6)
    _no_hooks(b.model)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_row_deltas_give_every_row_its_own_weights(tiny, model_type):
    """Row n of a batch run under RowDeltas equals that row run with W + ΔW[rows[n]] substituted
    (Linear and Conv1D layouts), gradients reach the updates, and the hooks go away, on error too."""
    b = tiny(model_type)
    arch = arch_for(b.model)
    names = [arch.module_path(b.model, role, 1) + ".weight" for role in ("mlp_in", "mlp_out")]
    named = dict(b.model.named_parameters())
    torch.manual_seed(0)
    stacks = {n: (0.5 * torch.randn(2, *named[n].shape)).requires_grad_(True) for n in names}
    inputs = _inputs(b)
    rows = torch.tensor([1, 0])
    with RowDeltas(b.model, stacks, rows):
        logits = b.model(**inputs).logits
    _no_hooks(b.model)
    for n_row, edit in enumerate(rows.tolist()):
        params = {n: named[n].detach() + stacks[n][edit].detach() for n in names}
        with torch.no_grad():
            want = functional_call(b.model, params, args=(), kwargs=dict(inputs)).logits[n_row]
        torch.testing.assert_close(logits[n_row].detach(), want, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        plain = b.model(**inputs).logits
    assert (logits.detach() - plain).abs().max() > 1e-3
    logits.sum().backward()
    assert all(stacks[n].grad is not None and stacks[n].grad.abs().max() > 0 for n in names)
    with pytest.raises(RuntimeError, match="boom"):
        with RowDeltas(b.model, {n: v.detach() for n, v in stacks.items()}):
            raise RuntimeError("boom")
    _no_hooks(b.model)
    with pytest.raises(ValueError, match="row indices"):
        with RowDeltas(b.model, {names[0]: stacks[names[0]].detach()}, torch.tensor([0])):
            b.model(**inputs)
    _no_hooks(b.model)
    with pytest.raises(KeyError, match="not a weight or bias"):
        with RowDeltas(b.model, {"nope.weight": stacks[names[0]].detach()}):
            pass
    _no_hooks(b.model)
    norm = next(n for n, p in b.model.named_parameters() if n.endswith("weight") and p.dim() == 1)
    with pytest.raises(TypeError, match="not a linear layer"):
        with RowDeltas(b.model, {norm: torch.zeros(2, *named[norm].shape)}):
            pass
    _no_hooks(b.model)


def test_factor_rows_name_the_batch_row_of_each_factor(tiny):
    b = tiny("llama")
    path = arch_for(b.model).module_path(b.model, "mlp_out", 0)
    inputs = _inputs(b)
    with GradientFactors(b.model, [path]) as capture:
        b.model(**inputs)
        rows = capture.factor_rows(path)
    n, length = inputs["input_ids"].shape
    assert rows.tolist() == [r for r in range(n) for _ in range(length)]
