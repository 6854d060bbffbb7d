import pytest
import torch

from editlab.data.collate import encode_pairs
from editlab.data.records import EditRecord
from editlab.methods.base import EditError
from editlab.methods.kn import KN
from editlab.models.arch import arch_for, get_module
from editlab.models.tiny import tiny_model
from editlab.evaluation.teacher_forced import score_pairs
from editlab.tracing import Trace

from conftest import CAUSAL_TYPES, assert_state_equal, state_copy

PROMPT = "The capital of France is"


# ------------------------------------------------------------------ helpers
def _naive_ig(model, tokenizer, editor: KN, prompt: str, target: str) -> list[torch.Tensor]:
    """The reference procedure: per layer, one full forward of the whole sequence per IG point."""
    arch = arch_for(model)
    batch = encode_pairs(tokenizer, [prompt], [target])
    n_prompt = int(batch.prompt_lengths[0])
    tokens = batch.target_ids[0][batch.target_mask[0]].tolist()
    alphas, weights = editor.points()
    total = None
    for j, token in enumerate(tokens):
        ids = batch.input_ids[:, : n_prompt + j]
        per_layer = []
        for layer in range(arch.num_layers(model)):
            path = arch.module_path(model, "mlp_out", layer)
            with torch.no_grad(), Trace(model, [path], retain_input=True) as tr:
                model(input_ids=ids, use_cache=False)
            act = tr.inputs[path][0, -1]
            leaf = (alphas.float().unsqueeze(1) * act.unsqueeze(0)).requires_grad_(True)

            def put(_path, x, leaf=leaf):
                x = x.expand(len(alphas), *x.shape[1:]).clone()
                x[:, -1] = leaf
                return x

            with torch.enable_grad(), Trace(model, [path], edit_input=put):
                logits = model(input_ids=ids.expand(len(alphas), -1), use_cache=False).logits
                prob = torch.softmax(logits[:, -1].float(), dim=-1)[:, token]
                (grad,) = torch.autograd.grad(prob.sum(), leaf)
            per_layer.append(((weights.unsqueeze(1) * grad.double()).sum(0) * act.double()).float())
        total = per_layer if total is None else [t + s for t, s in zip(total, per_layer)]
    return [t / len(tokens) for t in total]


def _prob_with_layer_scaled(model, tokenizer, prompt, target, layer, scale) -> float:
    """P(first target token) with layer ``layer``'s FFN activation at the last position × ``scale``."""
    arch = arch_for(model)
    batch = encode_pairs(tokenizer, [prompt], [target])
    n_prompt = int(batch.prompt_lengths[0])
    token = int(batch.target_ids[0, 0])
    path = arch.module_path(model, "mlp_out", layer)

    def put(_path, x):
        x = x.clone()
        x[:, -1] = x[:, -1] * scale
        return x

    with torch.no_grad(), Trace(model, [path], edit_input=put):
        logits = model(input_ids=batch.input_ids[:, :n_prompt], use_cache=False).logits
    return float(torch.softmax(logits[0, -1].float(), dim=-1)[token])


def _p_new(bundle, rec) -> float:
    s = score_pairs(bundle.model, bundle.tokenizer, [rec.prompt], [rec.target_new])
    return float(torch.exp(-s.nll[0]))


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# -------------------------------------------------------------- attribution
@pytest.mark.parametrize("model_type", CAUSAL_TYPES)
def test_batched_ig_equals_naive_per_layer_loop(tiny, model_type):
    bundle = tiny(model_type)
    editor = KN(steps=5, batch_size=2)  # 3 chunks, the last one short
    target = "Paris is"  # two answer tokens: each attributed at its own position
    fast = editor.attribute(bundle.model, bundle.tokenizer, PROMPT, target)
    slow = _naive_ig(bundle.model, bundle.tokenizer, editor, PROMPT, target)
    assert len(fast) == len(slow) == arch_for(bundle.model).num_layers(bundle.model)
    scale = max(float(s.abs().max()) for s in slow)
    assert scale > 0
    for f, s in zip(fast, slow):
        assert f.shape == s.shape
        assert torch.allclose(f, s, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("model_type", ["gpt2", "gemma3_text"])
def test_one_token_prompt_has_no_prefix_and_still_matches(tiny, model_type):
    bundle = tiny(model_type)
    assert len(bundle.tokenizer("The")["input_ids"]) == 1
    editor = KN(steps=3)
    fast = editor.attribute(bundle.model, bundle.tokenizer, "The", "capital of")
    slow = _naive_ig(bundle.model, bundle.tokenizer, editor, "The", "capital of")
    scale = max(float(s.abs().max()) for s in slow)
    for f, s in zip(fast, slow):
        assert torch.allclose(f, s, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("model_type,riemann,steps,rtol",
                         [("llama", "midpoint", 32, 5e-3), ("gpt2", "midpoint", 32, 5e-3),
                          ("gpt2", "linspace", 200, 2e-2)])
def test_ig_completeness_one_layer(tiny, model_type, riemann, steps, rtol):
    """Σ_i attribution_i over one layer ≈ P(a) − P(0) (the IG completeness axiom)."""
    bundle = tiny(model_type)
    editor = KN(steps=steps, batch_size=steps, riemann=riemann)
    scores = editor.attribute(bundle.model, bundle.tokenizer, PROMPT, "Paris")
    for layer in range(len(scores)):
        p1 = _prob_with_layer_scaled(bundle.model, bundle.tokenizer, PROMPT, "Paris", layer, 1.0)
        p0 = _prob_with_layer_scaled(bundle.model, bundle.tokenizer, PROMPT, "Paris", layer, 0.0)
        assert abs(p1 - p0) > 1e-7
        assert float(scores[layer].double().sum()) == pytest.approx(p1 - p0, rel=rtol, abs=1e-9)


# ---------------------------------------------------------------- selection
def test_coarse_respects_adaptive_threshold():
    editor = KN(adaptive_threshold=0.5)
    scores = [torch.tensor([1.0, 5.0, 2.5, -9.0]), torch.tensor([10.0, 5.0, 4.9, 0.0])]
    # threshold 0.5 × 10 = 5, strictly above
    assert editor.coarse(scores) == {(1, 0)}
    assert KN(adaptive_threshold=0.2).coarse(scores) == {(0, 1), (0, 2), (1, 0), (1, 1), (1, 2)}
    assert editor.coarse([torch.tensor([-1.0, 0.0]), torch.tensor([-3.0])]) == set()


def test_refinement_keeps_neurons_shared_by_more_than_p():
    sets = [{(0, 1), (1, 2), (1, 3)}, {(0, 1), (1, 2)}, {(0, 1), (1, 4)}, {(0, 1), (1, 2)}, {(1, 3)}]
    # 5 prompts, p = 0.4: a neuron must be coarse for more than 2 of them
    assert KN(refine=True, p=0.4).refined(sets) == [(0, 1), (1, 2)]
    assert KN(refine=True, p=0.0).refined(sets) == [(0, 1), (1, 2), (1, 3), (1, 4)]
    assert KN(refine=False, p=0.4).refined(sets) == [(0, 1), (1, 2), (1, 3), (1, 4)]


def test_neurons_use_the_old_fact_and_the_rephrasings_only_with_refine(tiny, records, monkeypatch):
    bundle = tiny("gpt2")
    rec = records[1]  # two rephrasings
    seen = []
    fixed = {
        rec.prompt: [torch.tensor([9.0, 1.0, 3.0]), torch.tensor([0.0, 10.0, 0.0])],
        rec.rephrase_prompts[0]: [torch.tensor([9.0, 0.0, 0.0]), torch.tensor([0.0, 10.0, 3.0])],
        rec.rephrase_prompts[1]: [torch.tensor([0.0, 0.0, 0.0]), torch.tensor([0.0, 10.0, 3.0])],
    }

    def fake(self, model, tokenizer, prompt, target):
        seen.append((prompt, target))
        return fixed[prompt]

    monkeypatch.setattr(KN, "attribute", fake)
    plain = KN(adaptive_threshold=0.2)
    assert plain.neurons(bundle.model, bundle.tokenizer, rec) == [(0, 0), (0, 2), (1, 1)]
    assert seen == [(rec.prompt, rec.target_true)]
    seen.clear()
    # coarse sets: {(0,0),(0,2),(1,1)}, {(0,0),(1,1),(1,2)}, {(1,1),(1,2)}; p = 0.4 → count > 1.2
    refined = KN(adaptive_threshold=0.2, refine=True, p=0.4)
    assert refined.neurons(bundle.model, bundle.tokenizer, rec) == [(0, 0), (1, 1), (1, 2)]
    assert [q for q, _ in seen] == [rec.prompt, *rec.rephrase_prompts]


def test_selected_neurons_are_above_threshold_on_a_real_attribution(tiny, records):
    bundle = tiny("llama")
    editor = KN(steps=4, adaptive_threshold=0.3)
    rec = records[0]
    scores = editor.attribute(bundle.model, bundle.tokenizer, rec.prompt, rec.target_true)
    chosen = editor.neurons(bundle.model, bundle.tokenizer, rec)
    top = max(float(s.max()) for s in scores)
    assert chosen
    for layer, s in enumerate(scores):
        above = {int(i) for i in torch.nonzero(s > 0.3 * top).flatten()}
        assert above == {i for l, i in chosen if l == layer}


# --------------------------------------------------------------------- edit
@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gpt_neox"])
def test_deltas_touch_only_selected_columns(tiny, records, model_type):
    bundle = tiny(model_type)
    model, tok = bundle.model, bundle.tokenizer
    arch = arch_for(model)
    rec = records[0]
    editor = KN(steps=4, adaptive_threshold=0.3)
    deltas = editor.compute_deltas(model, tok, [rec])
    chosen = editor.last_neurons[rec.record_id]
    assert chosen
    emb = get_module(model, arch.embeddings).weight
    new_id = int(encode_pairs(tok, [rec.prompt], [rec.target_new]).target_ids[0, 0])
    old_id = int(encode_pairs(tok, [rec.prompt], [rec.target_true]).target_ids[0, 0])
    shift = 2.0 * emb[new_id] - 2.0 * emb[old_id]
    layers = sorted({layer for layer, _ in chosen})
    assert set(deltas) == {f"{arch.module_path(model, 'mlp_out', layer)}.weight" for layer in layers}
    params = dict(model.named_parameters())
    for layer in layers:
        name = f"{arch.module_path(model, 'mlp_out', layer)}.weight"
        assert deltas[name].shape == params[name].shape
        out_in = arch.delta_to_param(deltas[name])  # (out, in) view: .t() is its own inverse
        cols = {i for l, i in chosen if l == layer}
        nonzero = {int(i) for i in torch.nonzero(out_in.abs().sum(0)).flatten()}
        assert nonzero == cols
        for i in cols:
            assert torch.allclose(out_in[:, i], shift, atol=1e-6)


def test_apply_then_restore_is_bit_exact_and_model_untouched(tiny, records):
    bundle = tiny("gpt2")
    model = bundle.model
    before = state_copy(model)
    flags = [p.requires_grad for p in model.parameters()]
    hooks, training = _hooks(model), model.training
    editor = KN(steps=4)
    deltas = editor.compute_deltas(model, bundle.tokenizer, records[:1])
    assert_state_equal(model, before)  # computing never writes
    assert _hooks(model) == hooks and model.training == training
    assert [p.requires_grad for p in model.parameters()] == flags
    with editor.apply(model, bundle.tokenizer, records[:1]) as session:
        assert session.deltas.keys() == deltas.keys()
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
        assert changed and all(k in deltas for k in changed)
    assert_state_equal(model, before)


def test_several_records_sum_their_deltas(tiny, records):
    bundle = tiny("llama")
    editor = KN(steps=4)
    both = editor.compute_deltas(bundle.model, bundle.tokenizer, records[:2])
    single = [editor.compute_deltas(bundle.model, bundle.tokenizer, [r]) for r in records[:2]]
    assert set(both) == set(single[0]) | set(single[1])
    for name, delta in both.items():
        expected = sum(d[name] for d in single if name in d)
        assert torch.allclose(delta, expected, atol=1e-6)


def test_edit_raises_new_target_probability(records):
    """One block, tied embeddings, only the new answer added, with a large scale: the edit moves the
    prompt's last residual by exactly c · s · E[new] (c = the selected neurons' activations there;
    nothing else reaches that position in a one-block model), and as s grows the final LayerNorm
    output turns towards E[new], which the tied head scores highest."""
    bundle = tiny_model("gpt2", seed=0, n_layer=1)
    model, tok = bundle.model, bundle.tokenizer
    arch = arch_for(model)
    rec = records[0]
    editor = KN(steps=8, old_scale=0.0, new_scale=100.0)
    ids = tok(rec.prompt, return_tensors="pt")["input_ids"]
    mlp_out = arch.module_path(model, "mlp_out", 0)
    with torch.no_grad(), Trace(model, [mlp_out, arch.final_norm], retain_input=True) as tr:
        model(input_ids=ids, use_cache=False)
    acts, resid = tr.inputs[mlp_out][0, -1], tr.inputs[arch.final_norm][0, -1]
    p0 = _p_new(bundle, rec)
    with editor.apply(model, tok, [rec]):
        with torch.no_grad(), Trace(model, [arch.final_norm], retain_input=True) as tr2:
            model(input_ids=ids, use_cache=False)
        p1 = _p_new(bundle, rec)
    chosen = editor.last_neurons[rec.record_id]
    c = float(sum(acts[i] for _, i in chosen))
    assert chosen and c > 0
    new_id = int(encode_pairs(tok, [rec.prompt], [rec.target_new]).target_ids[0, 0])
    emb = get_module(model, arch.embeddings).weight
    assert torch.allclose(tr2.inputs[arch.final_norm][0, -1] - resid, c * 100.0 * emb[new_id], atol=1e-4)
    assert p1 > 1.5 * p0


def test_argmax_old_token_subtracts_the_models_prediction(tiny, records):
    bundle = tiny("gpt2")
    model, tok = bundle.model, bundle.tokenizer
    arch = arch_for(model)
    rec = records[0]
    editor = KN(steps=4, old_token="argmax")
    deltas = editor.compute_deltas(model, tok, [rec])
    logits = model(**tok(rec.prompt, return_tensors="pt")).logits[0, -1]
    top = int(logits.argmax())
    new_id = int(encode_pairs(tok, [rec.prompt], [rec.target_new]).target_ids[0, 0])
    emb = get_module(model, arch.embeddings).weight
    layer, index = editor.last_neurons[rec.record_id][0]
    name = f"{arch.module_path(model, 'mlp_out', layer)}.weight"
    col = arch.delta_to_param(deltas[name])[:, index]
    assert torch.allclose(col, 2.0 * emb[new_id] - 2.0 * emb[top], atol=1e-6)


# ------------------------------------------------------------------- errors
def test_missing_target_true_names_the_record(tiny, records):
    bundle = tiny("gpt2")
    with pytest.raises(EditError, match=r"record 2 .*'target_true'"):
        KN(steps=2).compute_deltas(bundle.model, bundle.tokenizer, [records[0], records[2]])
    blank = EditRecord(record_id="abc", prompt="Toko Yasuda plays the", subject="Toko Yasuda",
                       target_new="piano", target_true="  ")
    with pytest.raises(EditError, match=r"'abc'.*target_true"):
        KN(steps=2).compute_deltas(bundle.model, bundle.tokenizer, [blank])


def test_encoder_decoder_is_a_clear_error(tiny, records):
    bundle = tiny("t5")
    with pytest.raises(EditError, match="decoder-only"):
        KN(steps=2).compute_deltas(bundle.model, bundle.tokenizer, records[:1])


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match="riemann"):
        KN(riemann="trapezoid")
    with pytest.raises(ValueError, match="old_token"):
        KN(old_token="nope")
    with pytest.raises(ValueError, match="p must"):
        KN(p=1.0)
    with pytest.raises(ValueError, match="steps"):
        KN(steps=0)


# ------------------------------------------------------------ edit loop (Hydra)
def test_experiment_runs_end_to_end_on_a_tiny_model(tmp_path):
    import json
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf, open_dict

    from editlab.train import run

    rows = [{
        "case_id": i,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is", "relation_id": "P103", "subject": subject,
            "target_new": {"str": "English", "id": "Q1860"}, "target_true": {"str": "French", "id": "Q150"},
        },
        "paraphrase_prompts": [f"{subject} is a native speaker of"],
        "neighborhood_prompts": ["The mother tongue of Léon Blum is"],
        "attribute_prompts": ["J. R. R. Tolkien is a native speaker of"],
        "generation_prompts": [f"{subject}'s mother tongue is"],
    } for i, subject in enumerate(["Danielle Darrieux", "Victor Hugo"])]
    (tmp_path / "cf.json").write_text(json.dumps(rows))
    configs = Path(__file__).resolve().parents[2] / "editlab" / "configs"
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True, overrides=[
            "experiment=kn_smollm2_counterfact", "model=tiny_llama", f"paths.data_dir={tmp_path}",
            "data.test.path=cf.json", "method.steps=4", "method.batch_size=2", "logger=csv",
            "callbacks=none",
        ])
    GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "out")
    OmegaConf.resolve(cfg.paths)
    summary = run(cfg)
    assert len((tmp_path / "out" / "records.jsonl").read_text().splitlines()) == 2
    assert "post/reliability" in summary and "post/efficacy_score" in summary
