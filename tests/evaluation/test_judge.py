"""The judge interface: deterministic callables offline, and the LLM judge on a tiny model."""

from __future__ import annotations

import pytest
import torch

from editlab.evaluation.judge import LLMJudge, build_judge, judge_scores


def _contains_judge(prompt: str, target: str, generation: str) -> float:
    return 1.0 if target.lower() in generation.lower() else 0.0


def test_callable_judge_is_used_as_is():
    judge = build_judge(_contains_judge)
    assert judge is _contains_judge
    got = judge_scores(judge, ["q1", "q2"], ["Paris", "Rome"], ["in paris", "Milan"])
    assert got.dtype == torch.float64 and got.tolist() == [1.0, 0.0]
    assert build_judge(None) is None


def test_judge_scores_outside_unit_interval_raise():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        judge_scores(lambda p, t, g: 2.0, ["q"], ["a"], ["b"])
    with pytest.raises(TypeError):
        build_judge(3)


def test_llm_judge_probability_of_yes(tiny):
    bundle = tiny("llama")
    judge = build_judge(bundle, yes=" Paris", no=" Rome")  # any two single tokens of the tiny vocabulary
    assert isinstance(judge, LLMJudge)
    prompts, targets, gens = ["The capital of France is", "Hi"], ["Paris", "Rome"], ["Paris", "Milan"]
    batched = judge_scores(judge, prompts, targets, gens)
    single = [judge(p, t, g) for p, t, g in zip(prompts, targets, gens)]
    assert ((batched > 0) & (batched < 1)).all()
    assert batched.tolist() == pytest.approx(single, abs=1e-5)
    # by hand: softmax over the two tokens' logits at the last position of the filled template
    text = judge.template.format(prompt=prompts[0], target=targets[0], generation=gens[0])
    with torch.no_grad():
        logits = bundle.model(**bundle.tokenizer(text, return_tensors="pt")).logits[0, -1]
    pair = torch.softmax(logits[[judge.yes_id, judge.no_id]].float(), -1)
    assert float(batched[0]) == pytest.approx(float(pair[0]), abs=1e-5)
    assert bundle.tokenizer.padding_side == "right"
