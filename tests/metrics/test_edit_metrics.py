"""Hand-computed checks of the torchmetrics classes in editlab.metrics.edit."""

from __future__ import annotations

import json
import math
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchmetrics import MetricCollection
from torchmetrics.utilities.data import dim_zero_sum

from editlab.metrics.edit import (
    NGramEntropy,
    PredictionAgreement,
    ProbabilityComparisonMagnitude,
    ProbabilityComparisonScore,
    RecordMean,
    TeacherForcedAccuracy,
    build_edit_metrics,
    computed,
)

ALL_CLASSES = [
    RecordMean,
    TeacherForcedAccuracy,
    PredictionAgreement,
    ProbabilityComparisonScore,
    ProbabilityComparisonMagnitude,
    NGramEntropy,
]

# Two batches of teacher-forced predictions.
# Batch 1: record 0 has rows with accuracy 1 (3/3) and 1/2; record 1 has one row with accuracy 0.
BATCH_1 = dict(
    pred=torch.tensor([[4, 5, 6], [4, 9, 0], [1, 1, 0]]),
    target=torch.tensor([[4, 5, 6], [4, 5, 0], [2, 2, 0]]),
    mask=torch.tensor([[True, True, True], [True, True, False], [True, True, False]]),
    record_index=torch.tensor([0, 0, 1]),
)
# Batch 2: its record 0 has one row with accuracy 1/3.
BATCH_2 = dict(
    pred=torch.tensor([[7, 0, 0]]),
    target=torch.tensor([[7, 8, 9]]),
    mask=torch.tensor([[True, True, True]]),
    record_index=torch.tensor([0]),
)
# record means: 0.75, 0, 1/3 -> (0.75 + 0 + 1/3) / 3 = 0.3611111111111111
TWO_BATCH_ACCURACY = 0.3611111111111111


def test_states_are_summed_under_ddp() -> None:
    for cls in ALL_CLASSES:
        metric = cls()
        assert set(metric._reductions) == {"total", "count"}
        for name, reduction in metric._reductions.items():
            assert reduction is dim_zero_sum, (cls.__name__, name)
        assert metric.full_state_update is False
        assert metric.is_differentiable is False
        assert metric.total.dtype == torch.float64


def test_higher_is_better() -> None:
    for cls in ALL_CLASSES[1:]:
        assert cls.higher_is_better is True


def test_record_mean_groups_rows_by_record() -> None:
    metric = RecordMean()
    # record 0: (1 + 0) / 2 = 0.5, record 1: 1 -> (0.5 + 1) / 2 = 0.75, not the row mean 2/3
    metric.update(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0, 1]))
    assert metric.compute().item() == 0.75
    assert metric.count.item() == 2


def test_record_mean_skips_records_without_rows() -> None:
    metric = RecordMean()
    metric.update(torch.tensor([0.2, 0.6], dtype=torch.float64), torch.tensor([0, 3]), num_records=5)
    assert metric.count.item() == 2
    assert metric.compute().item() == pytest.approx(0.4, abs=1e-15)
    with pytest.raises(ValueError, match="segment ids"):
        metric.update(torch.tensor([1.0]), torch.tensor([5]), num_records=5)
    with pytest.raises(ValueError, match="NaN"):
        metric.update(torch.tensor([math.nan]), torch.tensor([0]))


def test_never_updated_computes_nan() -> None:
    with pytest.warns(UserWarning, match="before the ``update``"):
        value = TeacherForcedAccuracy().compute()
    assert math.isnan(value.item())


def test_teacher_forced_accuracy_accumulates_over_batches() -> None:
    metric = TeacherForcedAccuracy()
    metric.update(**BATCH_1)
    # after batch 1: (0.75 + 0) / 2
    assert metric.compute().item() == 0.375
    metric.update(**BATCH_2)
    assert metric.count.item() == 3
    assert metric.compute().item() == pytest.approx(TWO_BATCH_ACCURACY, abs=1e-15)
    metric.reset()
    assert metric.count.item() == 0 and metric.total.item() == 0.0


def test_prediction_agreement() -> None:
    metric = PredictionAgreement()
    post = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0], [8, 8, 8, 0]])
    pre = torch.tensor([[1, 2, 3, 0], [5, 7, 0, 0], [8, 8, 8, 0]])
    mask = torch.tensor([[True] * 4, [True, True, False, False], [True, True, True, False]])
    # rows: 3/4, 1/2, 1 ; records: row 0 -> 0, rows 1, 2 -> 1
    # record means: 0.75, (0.5 + 1) / 2 = 0.75 -> 0.75
    metric.update(post, pre, mask, torch.tensor([0, 1, 1]))
    assert metric.compute().item() == 0.75


def test_probability_comparison_classes() -> None:
    score, magnitude = ProbabilityComparisonScore(), ProbabilityComparisonMagnitude()
    nll_new = torch.tensor([0.5, 2.0, 1.0])
    nll_true = torch.tensor([1.0, 0.5, 3.0])
    index = torch.tensor([0, 0, 1])
    score.update(nll_new, nll_true, index)
    magnitude.update(nll_new, nll_true, index)
    # successes 1, 0 | 1 -> record means 0.5, 1 -> 0.75
    assert score.compute().item() == 0.75
    # magnitudes: exp(-0.5) - exp(-1) = 0.2386512185411911, exp(-2) - exp(-0.5) = -0.4711953764760207
    #   | exp(-1) - exp(-3) = 0.3180923728035784
    # record means: (0.2386512185411911 - 0.4711953764760207) / 2 = -0.11627207896741482, 0.3180923728035784
    #   -> 0.10091014691808178
    assert magnitude.compute().item() == pytest.approx(0.10091014691808178, abs=1e-12)


def test_ngram_entropy_metric() -> None:
    metric = NGramEntropy()
    # per text: "a b a b" -> 0.9727652780181632, "a b c" -> 1/3, "x x x" -> 0 (see test_functional)
    # record 0: (0.9727652780181632 + 1/3) / 2 = 0.6530493056757483; record 1: 0 -> 0.32652465283787413
    metric.update(["a b a b", "a b c", "x x x"], [0, 0, 1])
    assert metric.compute().item() == pytest.approx(0.32652465283787413, abs=1e-12)
    metric.update(["a b c"], torch.tensor([0]))
    # third record 1/3 -> (0.6530493056757483 + 0 + 0.3333333333333333) / 3
    assert metric.compute().item() == pytest.approx(0.3287942130030272, abs=1e-12)


def test_merged_states_equal_single_instance() -> None:
    single, rank0, rank1 = TeacherForcedAccuracy(), TeacherForcedAccuracy(), TeacherForcedAccuracy()
    single.update(**BATCH_1)
    single.update(**BATCH_2)
    rank0.update(**BATCH_1)
    rank1.update(**BATCH_2)
    rank0.merge_state(rank1)
    assert rank0.count.item() == single.count.item() == 3
    assert rank0.compute().item() == single.compute().item()
    assert single.compute().item() == pytest.approx(TWO_BATCH_ACCURACY, abs=1e-15)
    # the same by summing states by hand
    by_hand = TeacherForcedAccuracy()
    by_hand.update(**BATCH_1)
    other = TeacherForcedAccuracy()
    other.update(**BATCH_2)
    assert (by_hand.total + other.total).item() / (by_hand.count + other.count).item() == pytest.approx(
        TWO_BATCH_ACCURACY, abs=1e-15
    )


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=30),
    )
    try:
        metrics = build_edit_metrics("post/")
        metrics["reliability"].update(**(BATCH_1 if rank == 0 else BATCH_2))
        if rank == 1:  # only rank 1 has efficacy probes: rank 0 must still join that metric's sync
            metrics["efficacy_score"].update(
                torch.tensor([0.1, 2.0]), torch.tensor([1.0, 1.0]), torch.tensor([0, 1])
            )
        result = computed(metrics)
        result["local_count"] = float(metrics["reliability"].count.item())
        Path(out_dir, f"{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_real_ddp_reduction_with_gloo(tmp_path: Path) -> None:
    mp.start_processes(
        _ddp_worker,
        args=(2, str(tmp_path / "init"), str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="fork",
    )
    for rank, local_count in ((0, 2.0), (1, 1.0)):
        result = json.loads((tmp_path / f"{rank}.json").read_text())
        assert result["post/reliability"] == pytest.approx(TWO_BATCH_ACCURACY, abs=1e-15)
        # efficacy: records 1.0 and 0.0 -> 0.5, seen from both ranks
        assert result["post/efficacy_score"] == 0.5
        assert set(result) == {"post/reliability", "post/efficacy_score", "local_count"}
        # states are unsynced again after compute, so accumulation can go on per rank
        assert result["local_count"] == local_count


def test_build_edit_metrics_keys_and_members() -> None:
    metrics = build_edit_metrics("post/")
    assert isinstance(metrics, MetricCollection)
    expected = {
        "reliability": TeacherForcedAccuracy,
        "generalization": TeacherForcedAccuracy,
        "portability": TeacherForcedAccuracy,
        "locality": PredictionAgreement,
        "locality_acc": TeacherForcedAccuracy,
        "efficacy_score": ProbabilityComparisonScore,
        "efficacy_magnitude": ProbabilityComparisonMagnitude,
        "paraphrase_score": ProbabilityComparisonScore,
        "paraphrase_magnitude": ProbabilityComparisonMagnitude,
        "neighborhood_score": ProbabilityComparisonScore,
        "neighborhood_magnitude": ProbabilityComparisonMagnitude,
        "fluency": NGramEntropy,
    }
    assert set(metrics.keys()) == {f"post/{name}" for name in expected}
    for name, cls in expected.items():
        assert type(metrics[name]) is cls
        assert metrics[f"post/{name}"] is metrics[name]
    # members of one class must not share states
    assert metrics["reliability"] is not metrics["generalization"]
    metrics["reliability"].update(**BATCH_1)
    assert metrics["generalization"].count.item() == 0


def test_computed_skips_unfed_metrics() -> None:
    metrics = build_edit_metrics("post/")
    metrics["reliability"].update(**BATCH_1)
    metrics["reliability"].update(**BATCH_2)
    metrics["fluency"].update(["a b a b"], [0])
    result = computed(metrics)
    expected = {"post/reliability": TWO_BATCH_ACCURACY, "post/fluency": 0.9727652780181632}
    assert result == pytest.approx(expected)


def test_computed_adds_counterfact_score() -> None:
    metrics = build_edit_metrics("pre/")
    index = torch.tensor([0, 1])
    # efficacy: successes 1, 1 -> 1.0; paraphrase: 1, 0 -> 0.5; neighborhood: 1, 0 -> 0.5 (preferred = true)
    metrics["efficacy_score"].update(torch.tensor([0.1, 0.2]), torch.tensor([1.0, 1.0]), index)
    metrics["paraphrase_score"].update(torch.tensor([0.1, 2.0]), torch.tensor([1.0, 1.0]), index)
    metrics["neighborhood_score"].update(torch.tensor([0.5, 3.0]), torch.tensor([1.0, 1.0]), index)
    result = computed(metrics)
    assert result["pre/efficacy_score"] == 1.0
    assert result["pre/paraphrase_score"] == 0.5
    assert result["pre/neighborhood_score"] == 0.5
    # harmonic mean 3 / (1/1 + 1/0.5 + 1/0.5) = 0.6
    assert result["pre/cf_score"] == pytest.approx(0.6, abs=1e-15)
    assert len(result) == 4


def test_computed_without_all_counterfact_parts_has_no_score() -> None:
    metrics = build_edit_metrics("post/")
    index = torch.tensor([0])
    metrics["efficacy_score"].update(torch.tensor([0.1]), torch.tensor([1.0]), index)
    metrics["paraphrase_score"].update(torch.tensor([0.1]), torch.tensor([1.0]), index)
    assert "post/cf_score" not in computed(metrics)


# --- a tiny random GPT-2: the metrics against explicit log_softmax / argmax indexing -------------------


@pytest.fixture(scope="module")
def tiny_gpt2() -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=64)
    return transformers.GPT2LMHeadModel(config).eval()


def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def _by_hand(model: torch.nn.Module, prompt: list[int], target: list[int]) -> tuple[list[int], float, float]:
    """Argmax at each target position, the mean NLL of the target and its geometric-mean probability."""
    logits = _logits(model, prompt + target)
    preds, nlls, probs = [], [], []
    for j, token in enumerate(target):
        row = logits[len(prompt) - 1 + j]  # the logits at position t predict token t + 1
        preds.append(int(row.argmax()))
        nlls.append(-float(torch.log_softmax(row.double(), dim=-1)[token]))
        probs.append(float(torch.softmax(row.double(), dim=-1)[token]))
    return preds, sum(nlls) / len(nlls), math.prod(probs) ** (1 / len(probs))


def test_tiny_model_accuracy_and_probability_comparison(tiny_gpt2: torch.nn.Module) -> None:
    prompt = [3, 17, 42, 8]
    # target_new: two greedy tokens, then a token the model does not predict -> accuracy 2/3 by construction
    first = int(_logits(tiny_gpt2, prompt)[-1].argmax())
    second = int(_logits(tiny_gpt2, prompt + [first])[-1].argmax())
    third = (int(_logits(tiny_gpt2, prompt + [first, second])[-1].argmax()) + 1) % 50
    target_new = [first, second, third]
    target_true = [11, 29]

    preds_new, nll_new, prob_new = _by_hand(tiny_gpt2, prompt, target_new)
    preds_true, nll_true, prob_true = _by_hand(tiny_gpt2, prompt, target_true)
    acc_new = sum(p == t for p, t in zip(preds_new, target_new)) / 3
    acc_true = sum(p == t for p, t in zip(preds_true, target_true)) / 2
    assert acc_new == pytest.approx(2 / 3, abs=1e-15)

    # right-padded [2, 3] batch as the scorer produces it; the two rows are two records
    accuracy = TeacherForcedAccuracy()
    accuracy.update(
        pred=torch.tensor([preds_new, preds_true + [0]]),
        target=torch.tensor([target_new, target_true + [0]]),
        mask=torch.tensor([[True, True, True], [True, True, False]]),
        record_index=torch.tensor([0, 1]),
    )
    assert accuracy.compute().item() == pytest.approx((acc_new + acc_true) / 2, abs=1e-15)

    # efficacy prefers target_new; the magnitude is the difference of geometric-mean token probabilities
    score, magnitude = ProbabilityComparisonScore(), ProbabilityComparisonMagnitude()
    score.update(torch.tensor([nll_new]), torch.tensor([nll_true]), torch.tensor([0]))
    magnitude.update(torch.tensor([nll_new]), torch.tensor([nll_true]), torch.tensor([0]))
    assert score.compute().item() == float(prob_new > prob_true)
    assert magnitude.compute().item() == pytest.approx(prob_new - prob_true, abs=1e-6)

    # neighborhood prefers target_true: the opposite comparison
    neighborhood = ProbabilityComparisonScore()
    neighborhood.update(torch.tensor([nll_true]), torch.tensor([nll_new]), torch.tensor([0]))
    assert neighborhood.compute().item() == float(prob_true > prob_new)


def test_generation_match_and_generation_members() -> None:
    from editlab.metrics.edit import GenerationMatch, generation_metric_names

    metric = GenerationMatch("f1")
    assert set(metric._reductions) == {"total", "count"}
    assert all(fx is dim_zero_sum for fx in metric._reductions.values())
    # record 0: F1 1 and 0.5 -> 0.75; record 1: F1 0 -> mean over records 0.375
    metric.update(["Paris", "Paris Rome Rome", "Milan"], ["paris", "Paris", "Rome"], torch.tensor([0, 0, 1]), 2)
    assert float(metric.compute()) == 0.375
    with pytest.raises(ValueError, match="unknown generation score"):
        GenerationMatch("bleu")
    names = generation_metric_names("generation_qa", judge=True)
    assert "reliability@generation_qa_em" in names and "locality@generation_qa_f1" in names
    assert "portability@generation_qa_judge" in names and "locality@generation_qa_judge" not in names
    collection = build_edit_metrics("post/", generation="generation")
    collection["reliability@generation_contains"].update(["The Paris."], ["Paris"], [0], 1)
    assert computed(collection) == {"post/reliability@generation_contains": 1.0}
    assert "reliability@generation_em" not in build_edit_metrics("post/")
