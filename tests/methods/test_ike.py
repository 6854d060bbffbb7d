"""IKE (editlab/methods/ike.py): retrieved demonstrations in context, no weight change."""

import json
from collections import Counter

import lightning as L
import pytest
import torch

from editlab.data.datamodule import EditDataModule
from editlab.data.records import EditRecord, Probe, RecordError
from editlab.evaluation.scorer import ScoringSettings
from editlab.lit.callbacks import EditorCallback
from editlab.lit.edit_eval import EditEvalModule
from editlab.methods.conditioned import ConditionedLM
from editlab.methods.ike import IKE
from editlab.models.encoder import SentenceEncoder
from editlab.models.tiny import tiny_model
from editlab.evaluation.generation import greedy_generate
from editlab.evaluation.teacher_forced import score_pairs

from conftest import assert_state_equal, make_records, state_copy

FACTS = [
    ("The capital of Spain is", "Berlin", "Madrid", "The Spanish capital is", "The capital of Japan is", "Tokyo"),
    ("The official language of Germany is", "French", "German", "People in Germany speak",
     "The official language of Italy is", "Italian"),
    ("Toyota is a company from", "Finland", "Japan", "Toyota is based in", "Sony is a company from", "Japan"),
    ("The Eiffel Tower is located in", "London", "Paris", "The Eiffel Tower stands in",
     "The Colosseum is located in", "Rome"),
    ("Windows is developed by", "Google", "Microsoft", "Windows is a product of", "Android is developed by",
     "Google"),
    ("Marie Curie was born in", "Egypt", "Poland", "The birthplace of Marie Curie is",
     "Albert Einstein was born in", "Germany"),
]


def training_records(n=len(FACTS)):
    return [EditRecord(record_id=i, prompt=p, subject=p.split()[0], target_new=new, target_true=true,
                       rephrase_prompts=(reph,), locality=(Probe(loc, loc_ans, "neighborhood"),),
                       source="train.json", index=i)
            for i, (p, new, true, reph, loc, loc_ans) in enumerate(FACTS[:n])]


@pytest.fixture(scope="module")
def encoder():
    return SentenceEncoder.tiny()


@pytest.fixture(scope="module")
def bundle():
    return tiny_model("llama", max_position_embeddings=512)


def ike(encoder, tmp_path, **kwargs):
    kwargs.setdefault("train_data", training_records())
    return IKE(encoder=encoder, cache_dir=str(tmp_path / "cache"), **kwargs)


def nearest_first(encoder, record, pool):
    facts = [f"{r.prompt} {r.target_new}" for r in pool]
    sims = encoder.encode(facts) @ encoder.encode([f"{record.prompt} {record.target_new}"])[0]
    return [pool[i] for i in sorted(range(len(pool)), key=lambda i: -float(sims[i]))]


def test_prompt_has_the_retrieved_demonstrations_in_ascending_similarity(bundle, encoder, tmp_path):
    record = make_records()[0]  # The capital of France is -> Rome
    editor = ike(encoder, tmp_path, k=3, demo_ratio=(1, 0, 0))  # copy demonstrations only: exact text
    editor.compute_edit(bundle.model, bundle.tokenizer, [record])
    near = nearest_first(encoder, record, training_records())[:3]
    expected = "".join(f"New Fact: {r.prompt} {r.target_new}\nPrompt: {r.prompt} {r.target_new}\n\n"
                       for r in reversed(near))  # the most similar last, next to the query
    expected += ("New Fact: The capital of France is Rome\nPrompt: The capital of France is Rome\n\n"
                 "New Fact: The capital of France is Rome\nPrompt: ")
    assert editor.prompt_prefix([record]) == expected
    assert [d[0] for d in editor.demonstrations([record])] == list(reversed(near))


def test_demonstration_kinds_follow_the_reference_proportions(bundle, encoder, tmp_path):
    pool = [EditRecord(record_id=i, prompt=f"{p} {i}", subject="x", target_new=new, rephrase_prompts=(reph,),
                       locality=(Probe(loc, ans),), source="train.json", index=i)
            for i, (p, new, _, reph, loc, ans) in enumerate(FACTS * 6)]
    record = make_records()[1]
    editor = ike(encoder, tmp_path, train_data=pool)  # k = 32, copy:update:retain = 1:3:4
    editor.compute_edit(bundle.model, bundle.tokenizer, [record])
    demos = editor.demonstrations([record])
    assert Counter(kind for _, kind, _, _ in demos) == {"copy": 4, "update": 12, "retain": 16}
    for rec, kind, prompt, answer in demos:
        assert (prompt, answer) == {"copy": (rec.prompt, rec.target_new),
                                    "update": (rec.rephrase_prompts[0], rec.target_new),
                                    "retain": (rec.locality[0].prompt, rec.locality[0].target)}[kind]
    # the same seed and facts give the same context; another seed shuffles the kinds
    assert editor.prompt_prefix([record]) == editor.prompt_prefix([record])
    other = ike(encoder, tmp_path, train_data=pool, seed=1)
    other.compute_edit(bundle.model, bundle.tokenizer, [record])
    assert [d[0] for d in other.demonstrations([record])] == [d[0] for d in demos]
    assert [d[1] for d in other.demonstrations([record])] != [d[1] for d in demos]


def test_weights_untouched_and_scores_are_those_of_the_prefixed_prompt(bundle, encoder, tmp_path):
    model, tok = bundle.model, bundle.tokenizer
    before = state_copy(model)
    record = make_records()[0]
    editor = ike(encoder, tmp_path, k=2)
    with editor.apply(model, tok, [record]) as session:
        assert_state_equal(model, before)
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
        wrapper = session.forward_model
        assert isinstance(wrapper, ConditionedLM) and wrapper is not model
        # apply's check that the edited model's outputs are finite ran the edit prompt through it
        checked = len(tok(editor.prompt_prefix([record]) + record.prompt + " Rome")["input_ids"]) - len(
            tok(record.prompt + " Rome")["input_ids"])
        assert wrapper.context_tokens == checked and wrapper.context_rows == 1
        wrapper.context_tokens = wrapper.context_rows = 0
        prefix = editor.prompt_prefix([record])
        prompts = [record.prompt, *record.rephrase_prompts, record.locality[0].prompt]
        via = score_pairs(wrapper, tok, prompts, ["Rome"] * 3)
        direct = score_pairs(model, tok, [prefix + p for p in prompts], ["Rome"] * 3)
        assert torch.allclose(via.nll, direct.nll, atol=1e-5)  # as the reference: context + prompt as text
        concat = ike(encoder, tmp_path, k=2, text_join=False)
        concat.compute_edit(model, tok, [record])
        via = score_pairs(concat.wrap(model, tok, [record]), tok, prompts, ["Rome"] * 3)
        for i, prompt in enumerate(prompts):
            # text_join=False: the context's tokens, then the prompt's and the target's as they are
            ids = tok(prefix)["input_ids"] + tok(prompt + " Rome")["input_ids"]
            target = tok(prompt + " Rome")["input_ids"][len(tok(prompt)["input_ids"]):]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], dim=-1)
            nll = -logp[len(ids) - len(target) - 1: len(ids) - 1].gather(1, torch.tensor(target)[:, None]).mean()
            assert torch.allclose(via.nll[i], nll, atol=1e-5)
        assert_state_equal(model, before)
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert_state_equal(model, before)
    assert session.forward_model is model
    tokens = len(tok(prefix)["input_ids"])
    assert editor.stats[-1] == {"facts": 1, "demonstrations": 2, "context_tokens": tokens}
    added = sum(len(tok(prefix + p + " Rome")["input_ids"]) - len(tok(p + " Rome")["input_ids"]) for p in prompts)
    assert wrapper.context_tokens == added and wrapper.context_rows == 3  # the space merges: tokens - 1


def test_training_embeddings_are_cached_on_disk(bundle, encoder, tmp_path, monkeypatch):
    record = make_records()[0]
    first = ike(encoder, tmp_path, k=2)
    first.compute_edit(bundle.model, bundle.tokenizer, [record])
    files = list((tmp_path / "cache").rglob("*.pt"))
    assert len(files) == 1 and files[0].name.startswith("train-6-")
    calls = []
    original = SentenceEncoder.encode

    def counting(self, texts, batch_size=64):
        calls.append(len(texts))
        return original(self, texts, batch_size)

    monkeypatch.setattr(SentenceEncoder, "encode", counting)
    second = ike(encoder, tmp_path, k=2)
    second.compute_edit(bundle.model, bundle.tokenizer, [record])
    assert calls == [1]  # only the new fact; the training split came from the cache
    assert second.prompt_prefix([record]) == first.prompt_prefix([record])
    third = ike(encoder, tmp_path, k=2, train_data=training_records(5))  # other data: other key
    third.compute_edit(bundle.model, bundle.tokenizer, [record])
    assert calls == [1, 5, 1] and len(list((tmp_path / "cache").rglob("*.pt"))) == 2


def test_training_records_equal_to_the_edit_are_not_demonstrations(bundle, encoder, tmp_path):
    pool = training_records()
    editor = ike(encoder, tmp_path, k=10)
    editor.compute_edit(bundle.model, bundle.tokenizer, [pool[0]])
    demos = editor.demonstrations([pool[0]])
    assert len(demos) == len(pool) - 1 and pool[0] not in [d[0] for d in demos]


def _trainer(callbacks):
    return L.Trainer(accelerator="cpu", devices=1, inference_mode=False, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=callbacks)


@pytest.mark.parametrize("sequential", [False, True])
def test_edit_loop_scores_through_the_context(bundle, encoder, tmp_path, sequential):
    before = state_copy(bundle.model)
    editor = ike(encoder, tmp_path, k=2)
    scoring = ScoringSettings(scoring_modes=["teacher_forced", "probability_comparison", "generation"],
                              fluency=True, fluency_max_new_tokens=4)
    module = EditEvalModule(bundle, scoring, output_dir=str(tmp_path / "out"), score_after_stream=sequential)
    dm = EditDataModule(test=make_records, batch_size=1)
    _trainer([EditorCallback(editor, sequential=sequential)]).test(module, datamodule=dm, verbose=False)
    assert_state_equal(bundle.model, before)
    summary = module.summary
    for key in ("post/reliability", "post/locality", "post/generalization", "post/efficacy_score",
                "post/reliability@generation_em", "post/fluency"):
        assert key in summary, key
    rows = [json.loads(x) for x in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    assert any(r["post"] != r["pre"] for r in rows)  # the context changes the answers
    assert [s["facts"] for s in editor.stats] == ([1, 2, 3] if sequential else [1, 1, 1])
    if sequential:  # the memory accumulates: the last context lists every fact
        assert editor.prompt_prefix(make_records()).count("\nNew Fact: ") >= 3
        assert "final/reliability" in summary


def test_bad_input_is_a_clear_error(bundle, encoder, tmp_path):
    bad = list(training_records())
    bad[3] = EditRecord(record_id=3, prompt="Sony is a company from", subject="Sony", target_new="Korea",
                        locality=(Probe("x", "y"),), source="train.json", index=3)
    with pytest.raises(RecordError, match=r"train.json, record 3, field 'rephrase_prompts'"):
        ike(encoder, tmp_path, k=2, train_data=bad).compute_edit(bundle.model, bundle.tokenizer, make_records()[:1])
    with pytest.raises(ValueError, match="demo_format uses unknown fields \\['subject'\\]"):
        IKE(train_data=training_records(), demo_format="New Fact: {subject}")
    with pytest.raises(ValueError, match="needs train_data"):
        IKE()
    with pytest.raises(ValueError, match="demo_ratio"):
        IKE(train_data=training_records(), demo_ratio=(1, 2))
    with pytest.raises(TypeError, match="record 1 is a dict"):
        ike(encoder, tmp_path, k=0).compute_edit(bundle.model, bundle.tokenizer, [make_records()[0], {"prompt": "x"}])


def test_k_zero_needs_no_training_data_or_encoder(bundle, tmp_path):
    editor = IKE(k=0, fact_copy=False)
    record = make_records()[0]
    edit = editor.compute_edit(bundle.model, bundle.tokenizer, [record])
    assert list(edit.memory) == [record]
    assert editor.prompt_prefix([record]) == "New Fact: The capital of France is Rome\nPrompt: "


def test_hydra_experiment_runs_end_to_end(tmp_path, monkeypatch):
    """``experiment=ike_smollm2_counterfact`` on a tiny model with EasyEdit-schema files written
    here (val + train), the packaged encoder, k = 2, a tiny model with 512 positions."""
    import importlib.util

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf, open_dict

    from editlab.models.encoder import PACKAGED_INSTALL, PACKAGED_MODULE
    from editlab.train import run

    if importlib.util.find_spec(PACKAGED_MODULE) is None:
        pytest.skip(f"needs the packaged encoder: {PACKAGED_INSTALL}")
    monkeypatch.setenv("EDITLAB_CACHE", str(tmp_path / "cache"))
    rows = [{"case_id": i, "prompt": p, "subject": p.split()[0], "target_new": new, "ground_truth": true,
             "rephrase_prompt": reph, "locality_prompt": loc, "locality_ground_truth": ans}
            for i, (p, new, true, reph, loc, ans) in enumerate(FACTS)]
    (tmp_path / "counterfact").mkdir()
    (tmp_path / "counterfact" / "counterfact-val.json").write_text(json.dumps(rows[:2]))
    (tmp_path / "counterfact" / "counterfact-train.json").write_text(json.dumps(rows[2:]))
    GlobalHydra.instance().clear()
    configs = str(__import__("pathlib").Path(__file__).resolve().parents[2] / "editlab" / "configs")
    with initialize_config_dir(config_dir=configs, version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True, overrides=[
            "experiment=ike_smollm2_counterfact", "model=tiny_llama", f"paths.data_dir={tmp_path}",
            "+model.max_position_embeddings=512", "method.k=2", "logger=csv", "callbacks=none"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "out")
    OmegaConf.resolve(cfg.paths)
    summary = run(cfg)
    assert len((tmp_path / "out" / "records.jsonl").read_text().splitlines()) == 2
    assert "post/reliability" in summary and "post/locality" in summary
    assert list((tmp_path / "cache" / "ike").rglob("counterfact-train-4-*.pt"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ike_on_cuda_matches_the_cpu(encoder, tmp_path):
    import copy

    from editlab.evaluation.generation import greedy_generate

    cpu = tiny_model("llama", max_position_embeddings=512)
    gpu = copy.deepcopy(cpu.model).cuda()
    record = make_records()[0]
    prompts = [record.prompt, *record.rephrase_prompts, record.locality[0].prompt]
    results = []
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for model in (cpu.model, gpu):
            editor = ike(encoder, tmp_path, k=2)
            with editor.apply(model, cpu.tokenizer, [record]) as session:
                wrapper = session.forward_model
                results.append((score_pairs(wrapper, cpu.tokenizer, prompts, ["Rome"] * 3).nll.cpu(),
                                greedy_generate(wrapper, cpu.tokenizer, prompts, max_new_tokens=[2, 4, 3])))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert torch.allclose(results[0][0], results[1][0], atol=1e-4)
    assert results[0][1] == results[1][1]


@pytest.mark.parametrize("text_join", [True, False])
def test_t5_answers_behind_the_context_on_the_encoder_side(encoder, tmp_path, text_join):
    """IKE on a T5 model: the encoder reads context + input (as text, or the context's tokens
    then the input's), the decoder scores and generates the answer."""
    t5 = tiny_model("t5")
    model, tok = t5.model, t5.tokenizer
    before = state_copy(model)
    record = make_records()[0]
    editor = ike(encoder, tmp_path, k=2, text_join=text_join)
    prompts = [record.prompt, *record.rephrase_prompts, record.locality[0].prompt]
    with editor.apply(model, tok, [record]) as session:
        wrapper = session.forward_model
        assert isinstance(wrapper, ConditionedLM) and wrapper.seq2seq
        prefix = editor.prompt_prefix([record])
        via = score_pairs(wrapper, tok, prompts, ["Rome"] * 3)
        generated = greedy_generate(wrapper, tok, prompts, max_new_tokens=3)
    for i, prompt in enumerate(prompts):
        encoded = (tok(prefix + prompt)["input_ids"] if text_join
                   else tok(prefix, add_special_tokens=False)["input_ids"] + tok(prompt)["input_ids"])
        start = model.config.decoder_start_token_id
        target = tok("Rome", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([encoded]), decoder_input_ids=torch.tensor([[start] + target[:-1]])).logits
            out = model.generate(input_ids=torch.tensor([encoded]), max_new_tokens=3, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        nll = -torch.log_softmax(logits[0], -1).gather(1, torch.tensor(target)[:, None]).mean()
        assert torch.allclose(via.nll[i], nll, atol=1e-5)
        assert generated[i] == tok.decode(out[0, 1:], skip_special_tokens=True)
    assert_state_equal(model, before)


def test_edit_loop_on_t5(encoder, tmp_path):
    """The edit loop scores and generates through IKE's wrapper around a T5 model."""
    t5 = tiny_model("t5")
    before = state_copy(t5.model)
    editor = ike(encoder, tmp_path, k=2)
    scoring = ScoringSettings(scoring_modes=["teacher_forced", "probability_comparison", "generation"])
    module = EditEvalModule(t5, scoring, output_dir=str(tmp_path / "out"), score_after_stream=True)
    dm = EditDataModule(test=make_records, batch_size=1)
    _trainer([EditorCallback(editor, sequential=True)]).test(module, datamodule=dm, verbose=False)
    assert_state_equal(t5.model, before)
    for key in ("post/reliability", "post/locality", "post/efficacy_score", "post/reliability@generation_em",
                "final/reliability"):
        assert key in module.summary, key
    rows = [json.loads(x) for x in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    assert any(r["post"] != r["pre"] for r in rows)
    assert [s["facts"] for s in editor.stats] == [1, 2, 3]
