"""Metric keys (editlab/metrics/keys.py): built and parsed in one place."""

import pytest

from editlab.metrics import keys
from editlab.metrics.edit import build_edit_metrics, computed, generation_metric_names
from editlab.metrics.functional import GENERATION_SCORES


def test_generation_keys_round_trip():
    for label in keys.GENERATION_LABELS.values():
        for kind in keys.GENERATION_KINDS:
            name = keys.generation_metric("locality_acc", label, kind)
            key = keys.join("final", name)
            parsed = keys.parse_key(key)
            assert (parsed.stage, parsed.metric, str(parsed)) == ("final", name, key)
            assert parsed.generation == keys.GenerationMetric("locality_acc", label, kind)
            assert str(parsed.generation) == name
    assert keys.generation_metric("reliability", "generation_qa", "em") == "reliability@generation_qa_em"


def test_non_generation_and_malformed_names_parse_to_none():
    for metric in ("reliability", "efficacy_score", "general_perplexity", "reliability@generation_bleu",
                   "reliability@wild_em", "@generation_em", "time/edit_seconds_median"):
        assert keys.parse_generation_metric(metric) is None, metric
    assert keys.parse_key("reliability") == keys.MetricKey("", "reliability")


def test_bad_parts_are_refused():
    with pytest.raises(ValueError, match="generation label"):
        keys.generation_metric("reliability", "generation_wild", "em")
    with pytest.raises(ValueError, match="generation score"):
        keys.generation_metric("reliability", "generation", "bleu")
    with pytest.raises(ValueError, match="stage"):
        keys.join("", "reliability")


def test_run_level_keys():
    assert keys.time_key("edit") == "time/edit_seconds_median"
    assert keys.general_metric("perplexity") == "general_perplexity" and keys.is_general("general_perplexity")
    assert keys.GENERATION_KINDS == (*GENERATION_SCORES, "judge")


def test_the_metric_collection_names_parse_back():
    names = generation_metric_names("generation_chat", judge=True)
    assert all(keys.parse_generation_metric(n).label == "generation_chat" for n in names)
    collection = build_edit_metrics("post/", generation="generation_chat", judge=True)
    judged = [n for n in names if keys.parse_generation_metric(n).kind == keys.JUDGE]
    assert judged and all(n in collection for n in judged)
    assert computed(collection) == {}  # nothing counted yet
