"""RecordScorer (editlab/evaluation/scorer.py): the edit loop's scoring without Lightning."""

import pytest
import torch

from editlab.evaluation.fluency import Fluency
from editlab.evaluation.generation import GenerationScoring
from editlab.errors import SettingError
from editlab.evaluation.scorer import ScoringSettings, StateCache, answers_by_record, build_scorer

from conftest import make_records

MODES = ["teacher_forced", "probability_comparison", "generation"]


def test_settings_are_checked_by_name(tiny):
    """Every setting is checked when the settings are made, by its name, generation and fluency
    settings included while their mode is off; the defaults are valid."""
    with pytest.raises(SettingError, match="scoring_modes has unknown scoring modes"):
        ScoringSettings(scoring_modes=["teacher_forced", "wild"])
    with pytest.raises(SettingError, match="scoring_modes must include 'teacher_forced'"):
        ScoringSettings(scoring_modes=["generation"])
    with pytest.raises(SettingError, match="scoring_modes must be a list"):
        ScoringSettings(scoring_modes="generation")
    with pytest.raises(SettingError, match="generation_framing is unknown"):
        ScoringSettings(generation_framing="wild")
    with pytest.raises(SettingError, match="qa_template"):
        ScoringSettings(qa_template="no placeholder")
    with pytest.raises(SettingError, match="generation_max_new_tokens"):
        ScoringSettings(scoring_modes=MODES, generation_max_new_tokens=0)
    with pytest.raises(SettingError, match="generation_margin"):
        ScoringSettings(generation_margin=-1)
    with pytest.raises(SettingError, match="fluency_prompts"):
        ScoringSettings(fluency=True, fluency_prompts=0)
    with pytest.raises(SettingError, match="fluency_max_new_tokens"):
        ScoringSettings(fluency_max_new_tokens=0)
    with pytest.raises(SettingError, match="chunk_size"):
        ScoringSettings(chunk_size=0)
    assert ScoringSettings(scoring_modes=["teacher_forced", "generation"]).scoring_modes == ("teacher_forced",
                                                                                           "generation")
    tok = tiny("gpt2").tokenizer
    assert build_scorer(tok, ScoringSettings(judge=lambda p, t, g: 1.0)).judge is None  # a judge needs generation
    assert build_scorer(tok).probability_comparison and build_scorer(tok).generation is None
    assert not build_scorer(tok, ScoringSettings(probability_comparison=False)).probability_comparison
    # scoring_modes, given, overrides probability_comparison
    assert build_scorer(tok, ScoringSettings(scoring_modes=MODES, probability_comparison=False)).probability_comparison
    assert ScoringSettings(probability_comparison=False).modes == ("teacher_forced",)


def test_generation_caps_follow_the_reference_and_the_framing(tiny):
    tok = tiny("gpt2").tokenizer
    gen = GenerationScoring(tok, "question_answer", "Q: {prompt}\nA:", margin=2, max_new_tokens=4)
    assert gen.label == "generation_qa" and gen.frame("Who?") == "Q: Who?\nA:"
    n = len(tok(" Paris", add_special_tokens=False)["input_ids"])
    assert gen.cap("Paris") == min(n + 2, 4)
    assert gen.cap("a very long reference answer with many tokens") == 4


def test_cached_observation_equals_a_fresh_one(tiny):
    bundle = tiny("gpt2")
    scorer = build_scorer(bundle.tokenizer, ScoringSettings(scoring_modes=MODES, fluency=True, fluency_max_new_tokens=4))
    records = make_records()
    probes = scorer.probes(records)
    cache = StateCache()
    cached = scorer.observe(bundle.model, probes, cache)
    fresh = scorer.observe(bundle.model, scorer.probes(records[1:]))
    again = scorer.observe(bundle.model, scorer.probes(records[1:]), cache)  # all read from the cache
    assert len(cache.scores) == len(probes.plan) and cache.answers and cache.fluency
    assert torch.equal(fresh.scores.nll, again.scores.nll) and fresh.answers == again.answers
    assert fresh.fluency == again.fluency
    per_record = answers_by_record(probes, cached.answers)
    assert len(per_record) == 3 and len(per_record[1]["generalization"]) == 2


def test_update_fills_the_stage_metrics_and_per_record_values(tiny):
    bundle = tiny("llama")
    scorer = build_scorer(bundle.tokenizer, ScoringSettings(scoring_modes=MODES, judge=lambda p, t, g: 0.5))
    probes = scorer.probes(make_records())
    obs = scorer.observe(bundle.model, probes)
    metrics = scorer.metrics("post/")
    values = scorer.update(metrics, probes, obs, obs, compare_with_pre=True, device="cpu")
    assert values["locality"].tolist() == [1.0, 1.0, 1.0]  # the same state agrees with itself
    assert values["locality@generation_em"].tolist() == [1.0, 1.0, 1.0]
    assert torch.isnan(values["efficacy_score"][2])  # record 2 has no true target
    assert values["reliability@generation_judge"].tolist() == [0.5, 0.5, 0.5]
    pre_values = scorer.update(scorer.metrics("pre/"), probes, obs, obs, compare_with_pre=False, device="cpu")
    assert "locality" not in pre_values and "locality@generation_em" not in pre_values


def test_fluency_reads_the_first_distinct_prompts(tiny):
    bundle = tiny("gpt2")
    texts, owners = Fluency(prompts=1, max_new_tokens=3).texts(bundle.model, bundle.tokenizer, make_records())
    assert owners == [0] and len(texts) == 1


def test_evaluation_runs_without_lightning_or_hydra():
    import subprocess
    import sys

    code = ("import sys, editlab.evaluation, editlab.metrics.keys; "
            "print(sorted(m for m in ('lightning', 'hydra', 'editlab.lit') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
