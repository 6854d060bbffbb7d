import json

import pytest
import yaml

from editlab.report import collect_runs, format_table, main


def _run(root, exp, time, method, path, summary, batch_size=1, records=2):
    folder = root / exp / time
    (folder / ".hydra").mkdir(parents=True)
    config = {
        "experiment_name": exp,
        "model": {"_target_": "editlab.models.packaged.smollm2_135m"},
        "method": {"_target_": f"editlab.methods.x.{method}"},
        "data": {"batch_size": batch_size, "test": {"path": path, "limit": 100}},
    }
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "records.jsonl").write_text("".join("{}\n" for _ in range(records)))
    return folder


def _rows(table):
    return {tuple(c.strip() for c in line.strip("|").split("|")[:2]): [c.strip() for c in line.strip("|").split("|")[2:]]
            for line in table.splitlines() if line.startswith("| ") and not line.startswith("| data")}


def test_table_has_a_column_group_per_scoring_mode(tmp_path):
    _run(tmp_path, "rome_cf", "2026-01-01_00-00-00", "ROME", "cf.json",
         {"post/reliability": 0.5, "post/efficacy_score": 0.75, "time/edit_seconds_median": 3.0})
    _run(tmp_path, "rome_cf", "2026-01-02_00-00-00", "ROME", "cf.json",  # the latest run wins
         {"post/reliability": 0.9, "post/locality": 0.8, "post/efficacy_score": 1.0,
          "post/neighborhood_score": 0.6, "post/reliability@generation_em": 0.25,
          "time/edit_seconds_median": 2.0})
    _run(tmp_path, "memit_cf", "2026-01-01_00-00-00", "MEMIT", "cf.json",
         {"post/reliability": 0.7, "time/edit_seconds_median": 40.0}, batch_size=10)
    _run(tmp_path, "ft_zsre", "2026-01-01_00-00-00", "FTL", "zsre.json", {"post/reliability": 0.4})
    (tmp_path / "broken" / "t").mkdir(parents=True)  # no summary: ignored
    runs = collect_runs(tmp_path)
    assert sorted(r.experiment for r in runs) == ["ft_zsre", "memit_cf", "rome_cf"]
    table = format_table(runs)
    header = next(line for line in table.splitlines() if line.startswith("| data"))
    cols = [c.strip() for c in header.strip("|").split("|")[2:]]
    assert cols == ["TF: FTL", "TF: MEMIT", "TF: ROME", "PC: FTL", "PC: MEMIT", "PC: ROME",
                    "GEN: FTL", "GEN: MEMIT", "GEN: ROME"]
    rows = _rows(table)
    assert rows[("cf.json", "reliability")] == ["", "0.700", "0.900", "", "", "1.000", "", "", "0.250"]
    assert rows[("cf.json", "locality")][:6] == ["", "", "0.800", "", "", "0.600"]
    assert rows[("cf.json", "s/edit (median)")][:3] == ["", "4.00", "2.00"]  # MEMIT: 40 s per batch of 10
    assert rows[("zsre.json", "reliability")][0] == "0.400"
    assert ("zsre.json", "portability") not in rows  # no run has it: no row


def test_command_writes_the_file_and_filters(tmp_path):
    _run(tmp_path / "runs", "a", "t", "ROME", "cf.json", {"post/reliability": 0.9, "final/reliability": 0.5})
    out = tmp_path / "t.md"
    table = main(["--runs", str(tmp_path / "runs"), "--stage", "final", "--out", str(out)])
    assert out.read_text() == table and "| 0.500 |" in table
    with pytest.raises(ValueError, match="no finished runs"):
        main(["--runs", str(tmp_path / "runs"), "--model", "gptj"])
