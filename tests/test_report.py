import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from editlab.report import collect_runs, collect_sweep, format_table, main

ROOT = Path(__file__).resolve().parent.parent


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


def _job(sweep, name, overrides, summary=None, records=()):
    """A sweep job folder: .hydra/{config,overrides}.yaml, summary.json unless None, records lines."""
    folder = _run(sweep.parent, sweep.name, name, "FTL", "cf.json", summary or {}, records=0)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if summary is None:
        (folder / "summary.json").unlink()
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    return folder


def test_records_are_counted_across_rank_files_once_each(tmp_path):
    folder = _run(tmp_path, "ddp", "t", "ROME", "cf.json", {"post/reliability": 1.0}, records=0)
    rec = lambda i: json.dumps({"source": "cf.json", "index": i}) + "\n"  # noqa: E731
    (folder / "records.jsonl").write_text(rec(0) + rec(2))
    (folder / "records.rank1.jsonl").write_text(rec(1) + rec(3) + '{"source": "cf.js')  # killed mid-line
    assert collect_runs(tmp_path)[0].records == 4
    # merged into records.jsonl but the rank file left beside it: still 4, not 6
    (folder / "records.jsonl").write_text(rec(0) + rec(2) + rec(1) + rec(3))
    assert collect_runs(tmp_path)[0].records == 4
    (folder / "records.rank1.jsonl").unlink()
    assert collect_runs(tmp_path)[0].records == 4


def test_a_sweep_is_one_row_per_job_with_its_swept_values(tmp_path):
    sweep = tmp_path / "multiruns" / "ft" / "2026-01-01_00-00-00"
    common = ["experiment=ft", "data.test.limit=4"]
    _job(sweep, "0", [*common, "method.lr=0.001", "+method.x=1"], {"post/reliability": 0.5, "pre/reliability": 0.1},
         [{"source": "cf.json", "index": i} for i in range(4)])
    _job(sweep, "1", [*common, "method.lr=0.01", "+method.x=1"], {"post/reliability": 0.75, "post/locality": 0.9},
         [{"source": "cf.json", "index": i} for i in range(4)])
    _job(sweep, "2", [*common, "method.lr=0.1", "+method.x=1"], None, [{"source": "cf.json", "index": 0}])
    (sweep / "10").mkdir()  # a job that did not start: no .hydra, no row
    for folder in (sweep, sweep.parent):  # the sweep, or the experiment's latest sweep
        assert [j.name for j in collect_sweep(folder)] == ["0", "1", "2"]
    table = main(["--runs", str(sweep.parent), "--out", str(tmp_path / "sweep.csv")])
    lines = [line for line in table.splitlines() if line.startswith("|")]
    assert lines[0] == "| job | method.lr | reliability | locality | s/edit (median) | records |"
    assert lines[2:] == ["| 0 | 0.001 | 0.500 |  |  | 4 |", "| 1 | 0.01 | 0.750 | 0.900 |  | 4 |",
                         "| 2 | 0.1 |  |  |  | 1 |"]
    assert "Not finished (no summary yet): job 2" in table and "`experiment=ft`" in table
    rows = (tmp_path / "sweep.csv").read_text().splitlines()
    assert rows[0] == "job,method.lr,reliability,locality,s/edit (median),records"
    assert rows[1:] == ["0,0.001,0.5,,,4", "1,0.01,0.75,0.9,,4", "2,0.1,,,,1"]
    with pytest.raises(SystemExit):  # --model selects runs of a runs folder, not jobs
        main(["--runs", str(sweep), "--model", "x"])


def test_table_one_goes_to_csv_too(tmp_path):
    _run(tmp_path / "runs", "a", "t", "ROME", "cf.json", {"post/reliability": 0.9})
    main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "t.csv")])
    rows = (tmp_path / "t.csv").read_text().splitlines()
    assert rows[0] == "data,metric,TF: ROME" and "cf.json,reliability,0.900" in rows


def test_a_real_sweep_is_reported(tmp_path):
    """``python -m editlab.train -m`` over two learning rates on a tiny model, then the report."""
    from test_configs import _write_fixture

    _write_fixture(tmp_path / "cf.json")
    sweep = tmp_path / "sweep"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), EDITLAB_DATA_DIR=str(tmp_path))
    cmd = [sys.executable, "-m", "editlab.train", "-m", "experiment=ft_smollm2_counterfact", "model=tiny_llama",
           "data.test.path=cf.json", "method.layers=[1]", "method.num_steps=2", "logger=csv", "callbacks=none",
           "method.lr=1e-3,1e-2", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = subprocess.run([sys.executable, "-m", "editlab.report", "--runs", str(sweep)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    lines = [line for line in report.stdout.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:2] == ["job", "method.lr"] and "reliability" in header and header[-1] == "records"
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [row[:2] for row in rows] == [["0", "0.001"], ["1", "0.01"]]
    assert all(row[-1] == "2" for row in rows)  # both records of each job
    assert all(row[header.index("reliability")] for row in rows)


def test_curves_of_two_runs_are_one_png_per_metric(tmp_path, monkeypatch):
    """--curves: each run's curves.csv, one figure per metric with a line per run (labelled by the
    run's method), <stem>_<metric>.png beside --out."""
    from editlab.lit import curves as curves_module
    from editlab.lit.curves import write_curves_csv

    ft = _run(tmp_path / "runs", "ft_stream", "t1", "FTL", "cf.json", {})
    memit = _run(tmp_path / "runs", "memit_stream", "t2", "MEMIT", "cf.json", {})
    write_curves_csv([{"edits": 10, "batches": 1, "reliability": 0.9, "locality": 0.8},
                      {"edits": 20, "batches": 2, "reliability": 0.7, "locality": 0.6}], ft)
    write_curves_csv([{"edits": 10, "batches": 1, "reliability": 1.0, "reliability@generation_em": 0.5},
                      {"edits": 20, "batches": 2, "reliability": 0.95, "reliability@generation_em": 0.4}], memit)
    seen = {}
    real = curves_module.plot_comparison

    def spy(runs, out):
        seen.update(runs)
        return real(runs, out)

    monkeypatch.setattr(curves_module, "plot_comparison", spy)
    out = tmp_path / "cmp" / "stream.png"
    text = main(["--curves", str(ft), str(memit / "curves.csv"), "--out", str(out)])
    names = sorted(p.name for p in out.parent.iterdir())
    assert names == ["stream_locality.png", "stream_reliability.png", "stream_reliability_generation_em.png"]
    assert all((out.parent / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)
    assert text.splitlines() == [str(out.parent / n) for n in ["stream_reliability.png", "stream_locality.png",
                                                                "stream_reliability_generation_em.png"]]
    assert list(seen) == ["FTL", "MEMIT"] and seen["MEMIT"][1]["reliability"] == 0.95
    with pytest.raises(ValueError, match="no curves.csv"):
        main(["--curves", str(tmp_path / "runs")])
