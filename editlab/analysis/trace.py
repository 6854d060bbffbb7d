"""Causal tracing entry point: ``python -m editlab.analysis.trace`` (config ``editlab/configs/trace.yaml``).

Traces ROME's known_1000 facts (Meng et al. 2022, §2) with :mod:`editlab.analysis.causal` (records
read by :func:`editlab.data.loaders.load_known`) and writes, in
the Hydra run directory (``experiments/runs/trace/<timestamp>/``)::

    cases/known_<id>.json     every kind of one record: scores [tokens × layers], low, high, tokens,
                              subject range, answer, timings (cases/known_<id>.npz: the same arrays)
    plots/known_<id>_<kind>.png   ROME-style heatmap (tokens × layers, subject tokens marked '*')
    summary.csv               average indirect effect per kind × token category × layer (+ std, n)
    summary.png               ROME Figure-2-style lines (95% intervals), one panel per kind
    summary_heatmap.png       the same as heatmaps (ROME's "rollup" plots)
    summary.json              settings, counts, mean high/low, peak layers; ``peak_mlp_last_subject``
                              is the layer with the highest average MLP indirect effect at the last
                              subject token (where ROME picks the layer to edit)

Which records are traced: ROME traces only facts the model knows — its ``causal_trace.py`` skips a
record unless the model's top next token, stripped, *equals* the attribute.  editlab generalises
that to multi-token attributes: a record is traced when the model's greedy next token is the
attribute's first token (as it follows the prompt).  ``data.only_known=false`` traces every record.
Either way the measured answer is the model's own prediction, as in ROME.

The noise level is ``trace.noise_factor`` (3) × the std of the subject-token embeddings of every
record in the file (ROME collects it over all knowns), unless ``trace.noise`` gives it directly.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from editlab.analysis.causal import (
    CATEGORIES,
    CATEGORY_LABELS,
    KINDS,
    TraceResult,
    average_indirect_effects,
    first_answer_token,
    next_token,
    noise_std,
    trace_prompt,
)
from editlab.data.loaders import KnownRecord, load_known

log = logging.getLogger(__name__)


_CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
_KIND_NAMES = {"hidden": "single hidden vector", "mlp": "MLP", "attn": "Attn"}


# --------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg backend: no display needed)
# --------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def _label(token: str) -> str:
    """A token as a tick label: whitespace made visible, '$' escaped (no mathtext)."""
    text = token.replace("\n", "\\n").replace("\t", "\\t").replace("$", r"\$")
    return text if text.strip() else repr(text)


def plot_trace_heatmap(result: TraceResult, path: str | Path, model_name: str = "") -> None:
    """One record's trace as ROME draws it: tokens down, layers across, colour = p(answer) after
    restoration (the scale starts at the corrupted probability), subject tokens marked with '*'."""
    plt = _pyplot()
    scores = result.scores
    labels = [_label(t) for t in result.tokens]
    for i in range(*result.subject_range):
        labels[i] += "*"
    n_tok, n_layers = scores.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.18 * n_layers + 2.0), max(2.0, 0.28 * n_tok + 1.0)), dpi=150)
    try:
        # ROME: the scale starts at the corrupted probability (restorations that hurt are blank)
        vmax = max(float(np.nanmax(scores)), result.low + 1e-9)
        mesh = ax.pcolor(scores, cmap=_CMAPS[result.kind], vmin=result.low, vmax=vmax)
        ax.invert_yaxis()
        ax.set_yticks([0.5 + i for i in range(n_tok)])
        ax.set_yticklabels(labels)
        ticks = list(range(0, n_layers, 5))
        ax.set_xticks([0.5 + i for i in ticks])
        ax.set_xticklabels([str(i) for i in ticks])
        answer = _label(result.answer.strip() or result.answer)
        if result.kind == "hidden":
            what = "state"
            ax.set_xlabel(f"single restored layer within {model_name or 'the model'}")
        else:
            what = _KIND_NAMES[result.kind]
            ax.set_xlabel(f"center of interval of {result.window} restored {what} layers")
        ax.set_title(f"Impact of restoring {what} after corrupted input\n"
                     f"p({answer}): clean {result.high:.3f}, corrupted {result.low:.3f}", fontsize=9)
        bar = fig.colorbar(mesh)
        bar.ax.set_title(f"p({answer})", y=-0.12, fontsize=8)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, bbox_inches="tight")
    finally:
        plt.close(fig)


def plot_summary(averages: Mapping[str, Mapping[str, Mapping[str, Any]]], path: str | Path, n_prompts: int,
                 model_name: str = "", window: int = 10) -> None:
    """ROME Figure 2 as lines: average indirect effect per layer for each token category, one
    panel per kind, with 95% intervals (1.96 std / sqrt(n))."""
    plt = _pyplot()
    kinds = list(averages)
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.5 * len(kinds), 3.5), sharey=True, dpi=150, squeeze=False)
    cmap = plt.get_cmap("tab10")
    try:
        for ax, kind in zip(axes[0], kinds):
            for i, cat in enumerate(CATEGORIES):
                entry = averages[kind][cat]
                if entry["n"] == 0:
                    continue
                y = np.asarray(entry["mean"])
                err = 1.96 * np.asarray(entry["std"]) / math.sqrt(entry["n"])
                x = np.arange(len(y))
                ax.fill_between(x, y - err, y + err, alpha=0.25, color=cmap(i))
                ax.plot(x, y, label=CATEGORY_LABELS[cat], color=cmap(i))
            what = "a single hidden vector" if kind == "hidden" else f"a run of {window} {_KIND_NAMES[kind]} modules"
            ax.set_title(f"Average indirect effect of {what}", fontsize=9)
            ax.set_xlabel(f"layer in {model_name or 'the model'}")
        axes[0][0].set_ylabel(f"average indirect effect on p(o), {n_prompts} prompts")
        axes[0][-1].legend(frameon=False, fontsize=7)
        fig.tight_layout()
        fig.savefig(path, bbox_inches="tight")
    finally:
        plt.close(fig)


def plot_summary_heatmap(averages: Mapping[str, Mapping[str, Mapping[str, Any]]], path: str | Path,
                         n_prompts: int, model_name: str = "") -> None:
    """ROME's rollup heatmaps: categories × layers, colour = average indirect effect (≥ 0)."""
    plt = _pyplot()
    kinds = list(averages)
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.5 * len(kinds), 2.4), dpi=150, squeeze=False)
    try:
        for ax, kind in zip(axes[0], kinds):
            rows = []
            for cat in CATEGORIES:
                mean = averages[kind][cat]["mean"]
                rows.append(np.full(_num_layers(averages), np.nan) if mean is None else np.clip(mean, 0, None))
            mesh = ax.pcolor(np.stack(rows), cmap=_CMAPS[kind], vmin=0.0)
            ax.invert_yaxis()
            ax.set_yticks([0.5 + i for i in range(len(CATEGORIES))])
            ax.set_yticklabels([CATEGORY_LABELS[c] for c in CATEGORIES], fontsize=7)
            ticks = list(range(0, len(rows[0]), 5))
            ax.set_xticks([0.5 + i for i in ticks])
            ax.set_xticklabels([str(i) for i in ticks])
            ax.set_title(f"Avg indirect effect ({kind}) over {n_prompts} prompts", fontsize=8)
            ax.set_xlabel(f"layer in {model_name or 'the model'}", fontsize=8)
            fig.colorbar(mesh, ax=ax)
        fig.tight_layout()
        fig.savefig(path, bbox_inches="tight")
    finally:
        plt.close(fig)


def _num_layers(averages) -> int:
    for per_kind in averages.values():
        for entry in per_kind.values():
            if entry["mean"] is not None:
                return len(entry["mean"])
    return 0


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------

def _save_case(out: Path, record: KnownRecord, results: Mapping[str, TraceResult]) -> None:
    cases = out / "cases"
    cases.mkdir(parents=True, exist_ok=True)
    first = next(iter(results.values()))
    payload = {
        "known_id": record.known_id, "index": record.index, "prompt": record.prompt, "subject": record.subject,
        "attribute": record.attribute, "relation_id": record.relation_id, "answer": first.answer,
        "answer_id": first.answer_id, "high": first.high, "low": first.low, "tokens": first.tokens,
        "input_ids": first.input_ids, "subject_range": list(first.subject_range), "noise": first.noise,
        "samples": first.samples, "shared_seconds": first.shared_seconds,
        "kinds": {k: {"scores": r.scores.tolist(), "window": r.window, "seconds": r.seconds} for k, r in results.items()},
    }
    (cases / f"known_{record.known_id}.json").write_text(json.dumps(payload, indent=1))
    arrays: dict[str, Any] = {f"scores_{k}": r.scores for k, r in results.items()}
    arrays.update(low=first.low, high=first.high, input_ids=np.asarray(first.input_ids),
                  subject_range=np.asarray(first.subject_range), answer=first.answer,
                  tokens=np.asarray(first.tokens, dtype=object).astype(str))
    np.savez(cases / f"known_{record.known_id}.npz", **arrays)


def _write_summary_csv(path: Path, averages: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["kind", "category", "layer", "aie", "std", "n"])
        for kind, per_cat in averages.items():
            for cat in CATEGORIES:
                entry = per_cat[cat]
                if entry["mean"] is None:
                    continue
                for layer, (m, s) in enumerate(zip(entry["mean"], entry["std"])):
                    writer.writerow([kind, cat, layer, f"{m:.6g}", f"{s:.6g}", entry["n"]])


def _peaks(averages) -> dict[str, dict[str, dict[str, float]]]:
    peaks: dict[str, dict[str, dict[str, float]]] = {}
    for kind, per_cat in averages.items():
        peaks[kind] = {}
        for cat, entry in per_cat.items():
            if entry["mean"] is not None:
                layer = int(np.argmax(entry["mean"]))
                peaks[kind][cat] = {"layer": layer, "aie": float(entry["mean"][layer])}
    return peaks


# --------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------

def select_known(model, tokenizer, records: Sequence[KnownRecord]) -> list[tuple[KnownRecord, bool, str]]:
    """``(record, known, prediction)`` for each record: known = the model's greedy next token after
    the prompt is the first token of the attribute."""
    preds = next_token(model, tokenizer, [r.prompt for r in records])
    out = []
    for record, (token, _) in zip(records, preds):
        expected = first_answer_token(tokenizer, record.prompt, record.attribute)
        out.append((record, token == expected, tokenizer.decode([token])))
    return out


def run(cfg: DictConfig) -> dict[str, Any]:
    """Trace the configured known_1000 records; write per-record results, plots and the summary;
    return the summary dict."""
    log.info("config:\n%s", OmegaConf.to_yaml({k: v for k, v in cfg.items() if k != "hydra"}))
    tcfg, dcfg = cfg.trace, cfg.data
    kinds = list(tcfg.kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"trace.kinds must be a non-empty subset of {list(KINDS)}, got {kinds}")
    if tcfg.get("threads"):
        torch.set_num_threads(int(tcfg.threads))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = cfg.paths.get("data_dir")

    bundle = hydra.utils.instantiate(cfg.model)
    model, tokenizer = bundle.model, bundle.tokenizer
    model_name = getattr(bundle, "name", "") or str(model.config.model_type)
    records = load_known(dcfg.path, limit=dcfg.n, offset=dcfg.offset, data_dir=data_dir)

    if tcfg.get("noise") is not None:
        base_std, noise = None, float(tcfg.noise)
    else:
        subjects = [r.subject for r in load_known(dcfg.path, data_dir=data_dir)]
        base_std = noise_std(model, tokenizer, subjects)
        noise = float(tcfg.noise_factor) * base_std
        log.info("noise: %.4g = %s × subject-embedding std %.4g (over %d subjects)",
                 noise, tcfg.noise_factor, base_std, len(subjects))

    selection = select_known(model, tokenizer, records)
    skipped = []
    to_trace = []
    for record, known, prediction in selection:
        if dcfg.only_known and not known:
            skipped.append({"known_id": record.known_id, "prediction": prediction, "attribute": record.attribute})
            log.info("skip known_id %d (model predicts %r, attribute %r)", record.known_id, prediction, record.attribute)
        else:
            to_trace.append((record, known))
    log.info("tracing %d of %d records (%s)", len(to_trace), len(records),
             "only those the model knows" if dcfg.only_known else "all")

    traced: dict[str, list[TraceResult]] = {k: [] for k in kinds}
    seconds: dict[str, list[float]] = {k: [] for k in kinds}
    shared: list[float] = []
    for n, (record, known) in enumerate(to_trace, 1):
        start = time.perf_counter()
        results = trace_prompt(
            model, tokenizer, record.prompt, record.subject, noise=noise, kinds=kinds,
            samples=int(tcfg.samples), window=int(tcfg.window), seed=int(cfg.seed),
            max_rows=tcfg.get("max_rows"),
        )
        first = next(iter(results.values()))
        for kind, result in results.items():
            result.meta.update(known_id=record.known_id, known=known)
            traced[kind].append(result)
            seconds[kind].append(result.seconds)
            if cfg.get("plots", True):
                plot_trace_heatmap(result, out / "plots" / f"known_{record.known_id}_{kind}.png", model_name)
        shared.append(first.shared_seconds)
        _save_case(out, record, results)
        log.info("[%d/%d] known_id %d %r → %r: high %.3f low %.3f; %s; shared %.1fs; total %.1fs",
                 n, len(to_trace), record.known_id, record.prompt, first.answer, first.high, first.low,
                 ", ".join(f"{k} {r.seconds:.1f}s" for k, r in results.items()), first.shared_seconds,
                 time.perf_counter() - start)

    averages = {k: average_indirect_effects(traced[k]) for k in kinds}
    n_traced = len(to_trace)
    summary: dict[str, Any] = {
        "model": model_name, "data": str(dcfg.path), "offset": int(dcfg.offset), "n_records": len(records),
        "n_traced": n_traced, "only_known": bool(dcfg.only_known), "skipped": skipped,
        "noise": noise, "noise_base_std": base_std, "noise_factor": None if base_std is None else float(tcfg.noise_factor),
        "samples": int(tcfg.samples), "window": int(tcfg.window), "kinds": kinds, "seed": int(cfg.seed),
        "threads": torch.get_num_threads(),
        "mean_high": float(np.mean([r.high for r in traced[kinds[0]]])) if n_traced else None,
        "mean_low": float(np.mean([r.low for r in traced[kinds[0]]])) if n_traced else None,
        "seconds_per_prompt": {k: float(np.mean(v)) if v else None for k, v in seconds.items()},
        "shared_seconds_per_prompt": float(np.mean(shared)) if shared else None,
        "peaks": _peaks(averages) if n_traced else {},
    }
    peak = summary["peaks"].get("mlp", {}).get("last_subject")
    summary["peak_mlp_last_subject"] = None if peak is None else peak["layer"]
    _write_summary_csv(out / "summary.csv", averages)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if n_traced:
        if cfg.get("plots", True):
            plot_summary(averages, out / "summary.png", n_traced, model_name, int(tcfg.window))
            plot_summary_heatmap(averages, out / "summary_heatmap.png", n_traced, model_name)
        for kind in kinds:
            p = summary["peaks"][kind]
            log.info("peak %s: last subject token layer %d (AIE %.4g), last token layer %d (AIE %.4g)", kind,
                     p["last_subject"]["layer"], p["last_subject"]["aie"], p["last"]["layer"], p["last"]["aie"])
        if peak is not None:
            log.info("peak: highest average MLP indirect effect at the last subject token is at layer %d "
                     "(AIE %.4g over %d prompts)", peak["layer"], peak["aie"], n_traced)
    else:
        log.warning("no record was traced (the model knows none of the %d selected records); "
                    "use data.only_known=false or more records (data.n)", len(records))
    log.info("results in %s", out)
    return summary


@hydra.main(version_base="1.3", config_path="../configs", config_name="trace")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
