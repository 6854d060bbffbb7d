"""Benchmark: lifelong (sequential) editing — edits/s, growth along the stream, peak memory, stream state.

For each method, a fixed stream of ``--edits`` records of ``counterfact/counterfact-val.json`` (the
first ones) is edited in batches of ``--batch-size`` into one model, sequentially, through one
:class:`~editlab.methods.base.WeightEditSession`: per batch ``editor.edit_in(session, tokenizer,
batch)`` then ``session.apply(edit, verify=verify_outputs)``, exactly the edit loop's path
(:class:`~editlab.lit.callbacks.EditorCallback` with ``sequential=True``), without any scoring.
The model and the editor are composed as the command lines compose them (Hydra, from
``editlab/configs``): ``model=<--model>`` and ``method=<method>/<--model>`` where that preset
exists, else ``method=<method>``; ``--tiny`` (with ``--model tiny_llama``) makes it a 4-block tiny
Llama with small method settings, ``--override KEY=VALUE`` adds any Hydra override
(``method.n_iter=10``).

Columns (one row per method; every method runs in its own process, so each gets a fresh peak RSS):

* ``setup s``: untimed one-off work done before the stream (context templates, loading the key
  statistics and AlphaEdit's projections); what an editor computes once inside its first edit
  (T-Patcher's memory set) stays in the first batch;
* ``s/edit``: median over batches of batch seconds / batch size; ``edits/s`` = 1 / that,
  ``total`` = edits / the stream's seconds (failed batches included in the time);
* ``first`` / ``last``: seconds per edit of the first and last batch (growth along the stream);
* ``base`` / ``peak RSS``: the process's peak RSS after loading and set-up, and at the end (model
  included); ``peak CUDA``: peak allocated CUDA memory during the stream, model included
  (``--accelerator gpu``);
* ``state MB``: tensor bytes in the session's stream state at the end (stateful editors: AlphaEdit's
  kept keys, GRACE's codebook, UltraEdit's normalisation, WISE's side memory; ``-`` otherwise);
* ``failed``: batches whose edit raised :class:`~editlab.methods.base.EditError` (rolled back).

Methods whose key statistics (MEMIT, AlphaEdit, EMMET, ROME with ``mom2_adjustment``) are not in
the statistics cache are skipped with a line saying so — on SmolLM2 each missing layer costs about
20 minutes of CPU — unless ``--stats-ok`` is given (then they are computed, untimed, and cached).

    python benchmarks/lifelong.py                                    # nine methods, SmolLM2-135M, CPU
    python benchmarks/lifelong.py --methods ultraedit grace ft --edits 20 --batch-size 10
    python benchmarks/lifelong.py --model tiny_llama --tiny --edits 8 --batch-size 4 --stats-ok
    python benchmarks/lifelong.py --accelerator gpu                  # model and editing on CUDA
    python benchmarks/lifelong.py --methods grace --override method.n_iter=20

Run it with nothing else on the machine (two cores are easily shared); load averages are printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "editlab" / "configs"
METHODS = ("memit", "alphaedit", "emmet", "ultraedit", "grace", "wise", "rome", "ft", "t_patcher")
DATA = "counterfact/counterfact-val.json"

# --tiny (with --model tiny_llama): four blocks instead of two, so that the edited blocks are not the
# first or last one (editlab.stats.model_identity hashes those: editing them would change the identity
# the key statistics and context templates are cached under, and recompute them at every batch), and
# few optimisation steps and small corpora
TINY_MODEL = ["+model.num_hidden_layers=4"]
_KEY_VALUE = ["method.layers=[1,2]", "method.v_num_grad_steps=5", "method.mom2_n_tokens=4096",
              "method.context_template_length_params=[[5,2]]"]
TINY = {
    "memit": _KEY_VALUE,
    "alphaedit": _KEY_VALUE,
    "emmet": _KEY_VALUE,
    "rome": [*_KEY_VALUE, "method.layers=[2]"],
    "ultraedit": ["method.mlp_gate_layers=[]", "method.mlp_in_layers=[]", "method.mlp_out_layers=[1,2]"],
    "grace": ["method.layer=2", "method.n_iter=5"],
    "wise": ["method.layer=2", "method.n_iter=5", "method.irrelevant_count=50",
             "method.context_template_length_params=[[5,2]]"],
    "ft": ["method.layers=[1]", "method.num_steps=5"],
    "t_patcher": ["method.max_steps=50", "method.memory_tokens=512"],
}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def method_config(method: str, model: str) -> str:
    """``<method>/<model>`` where that preset exists, else ``<method>``."""
    return f"{method}/{model}" if (CONFIGS / "method" / method / f"{model}.yaml").is_file() else method


def tensor_bytes(value) -> int:
    """Bytes of every tensor in ``value`` (tensors, dicts, lists, tuples; other leaves count 0)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def key_statistics(editor):
    """``(KeyStatistics, layers)`` of an editor that preconditions with cached key statistics, or None."""
    from editlab.methods.keyvalue import KeyStatistics

    stats = getattr(editor, "stats", None)
    if not isinstance(stats, KeyStatistics) or not getattr(editor, "mom2_adjustment", True):
        return None
    return stats, list(editor.layers)


def missing_statistics(editor, model, tokenizer) -> list[int]:
    """The layers whose key statistics ``editor`` needs and the statistics cache lacks."""
    from editlab.stats import is_cached

    needed = key_statistics(editor)
    if needed is None:
        return []
    stats, layers = needed
    return [layer for layer in layers
            if not is_cached(model, tokenizer, [layer], stats.corpus, n_tokens=stats.n_tokens,
                             dtype=stats.dtype, cache_dir=stats.cache_dir)]


def prepare(editor, model, tokenizer) -> None:
    """What the editor computes once per model before its first edit, done untimed: context
    templates, key statistics, AlphaEdit's null-space projections."""
    if hasattr(editor, "templates"):
        editor.templates(model, tokenizer)
    needed = key_statistics(editor)
    if needed is not None:
        needed[0].mom2(model, tokenizer, needed[1])
    if hasattr(editor, "projections"):
        editor.projections(model, tokenizer)


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def run_child(args: argparse.Namespace) -> dict:
    import hydra

    from editlab.data.loaders import load_counterfact_easyedit
    from editlab.edit import build_editor, compose
    from editlab.methods.base import EditError, WeightEditSession, verify_outputs

    method = args.child
    chosen = method_config(method, args.model)
    overrides = [*([*TINY_MODEL, *TINY.get(method, [])] if args.tiny else []), *args.override]
    cfg = compose(args.model, chosen, overrides)
    editor = build_editor(cfg.method, None)
    bundle = hydra.utils.instantiate(cfg.model)
    model, tok = bundle.model, bundle.tokenizer
    if args.accelerator == "gpu":
        model.to("cuda")
    device = next(model.parameters()).device
    row = {"method": method, "config": chosen, "edits": args.edits, "batch_size": args.batch_size,
           "device": device.type}
    missing = missing_statistics(editor, model, tok)
    if missing and not args.stats_ok:
        return {**row, "skipped": f"key statistics of layer(s) {missing} are not cached (--stats-ok computes "
                                  "them, untimed; SmolLM2: about 20 minutes per layer on a CPU)"}
    records = load_counterfact_easyedit(DATA, limit=args.edits, data_dir=args.data_dir)
    batches = [records[i:i + args.batch_size] for i in range(0, len(records), args.batch_size)]
    start = time.perf_counter()
    prepare(editor, model, tok)
    setup = time.perf_counter() - start
    base_rss = peak_rss_gb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(args.seed)
    session = WeightEditSession(model)
    times, failed = [], []
    try:
        for index, batch in enumerate(batches):
            begin = _now(device)
            try:
                edit = editor.edit_in(session, tok, batch)
                session.apply(edit, verify=lambda s, b=batch: verify_outputs(s, tok, b))
            except EditError as err:
                failed.append(f"batch {index}: {err}")
                logging.warning("%s: batch %d failed: %s", method, index, err)
            seconds = _now(device) - begin
            times.append(seconds)
            logging.info("%s: batch %d (%d records) in %.2f s", method, index, len(batch), seconds)
        state = session.stream_state
    finally:
        session.restore()
    per_edit = [t / len(b) for t, b in zip(times, batches)]
    return {
        **row, "n": len(records), "setup_s": setup, "s_per_edit": statistics.median(per_edit),
        "total_s": sum(times), "first_s_per_edit": per_edit[0], "last_s_per_edit": per_edit[-1],
        "per_edit": per_edit, "rss_before_gb": base_rss, "rss_gb": peak_rss_gb(),
        "cuda_gb": torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else None,
        "stateful": bool(getattr(editor, "stateful", False)),
        "state_mb": tensor_bytes(state) / 1024**2 if state is not None else None,
        "failed": len(failed), "failures": failed,
    }


def format_table(rows: list[dict], args: argparse.Namespace, load: tuple[float, float]) -> str:
    header = (f"{'method':10} {'edits':>5} {'batch':>5} {'device':>6} {'setup s':>7} {'s/edit':>7} "
              f"{'edits/s':>7} {'total':>7} {'first':>7} {'last':>7} {'base':>7} {'peak RSS':>8} "
              f"{'peak CUDA':>9} {'state MB':>8} {'failed':>6}")
    lines = [f"model {args.model}, {args.edits} edits of {DATA} in batches of {args.batch_size}, sequential "
             f"(one session), {args.accelerator}", header, "-" * len(header)]
    notes = []
    for r in rows:
        if "skipped" in r or "error" in r:
            why = r.get("skipped") or f"error: {r['error']}"
            lines.append(f"{r['method']:10} skipped: {why}" if "skipped" in r else f"{r['method']:10} {why}")
            continue
        cuda = f"{r['cuda_gb']:>7.2f}GB" if r["cuda_gb"] is not None else f"{'-':>9}"
        state = f"{r['state_mb']:>8.3g}" if r["state_mb"] is not None else f"{'-':>8}"
        lines.append(
            f"{r['method']:10} {r['n']:>5} {r['batch_size']:>5} {r['device']:>6} {r['setup_s']:>7.2f} "
            f"{r['s_per_edit']:>7.3f} {1 / r['s_per_edit']:>7.2f} {r['n'] / r['total_s']:>7.2f} "
            f"{r['first_s_per_edit']:>7.3f} {r['last_s_per_edit']:>7.3f} {r['rss_before_gb']:>5.2f}GB "
            f"{r['rss_gb']:>6.2f}GB {cuda} {state} {r['failed']:>6}"
        )
        notes += [f"{r['method']}: {f}" for f in r["failures"]]
    lines.append(f"torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads; "
                 f"load average before {load[0]:.2f}, after {load[1]:.2f}")
    lines.append("s/edit: median over batches of batch seconds / batch size (edits/s = 1 / s/edit); "
                 "total: edits / stream seconds;\nfirst, last: s/edit of the first and last batch; "
                 "base: peak RSS before the stream")
    return "\n".join(lines + notes) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS),
                        help="method config names (space- or comma-separated); default: " + " ".join(METHODS))
    parser.add_argument("--model", default="smollm2_135m",
                        help="an editlab/configs/model name: smollm2_135m (packaged, default), tiny_llama...")
    parser.add_argument("--edits", type=int, default=100, help="records in the stream")
    parser.add_argument("--batch-size", type=int, default=10, help="records per edit")
    parser.add_argument("--accelerator", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--stats-ok", action="store_true",
                        help="compute missing key statistics (untimed) instead of skipping the method")
    parser.add_argument("--tiny", action="store_true",
                        help="with --model tiny_llama: a 4-block tiny model and small method settings")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a Hydra override of the composed config (repeatable), e.g. method.n_iter=10")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="torch's seed before the stream")
    parser.add_argument("--data-dir", default=None, help="data directory (default: editlab's resolution)")
    parser.add_argument("--json", default=None,
                        help="also write the rows (with per-batch times) to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.edits < 1 or args.batch_size < 1:
        parser.error("--edits and --batch-size must be positive")
    if args.tiny and args.model != "tiny_llama":
        parser.error("--tiny sets up the tiny Llama: use it with --model tiny_llama")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
        warnings.filterwarnings("ignore")
        Path(args.out).write_text(json.dumps(run_child(args)))
        return 0
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        print("--accelerator gpu: no CUDA device is visible; nothing was run")
        return 0
    methods = [m for item in args.methods for m in item.split(",") if m]
    unknown = [m for m in methods if not (CONFIGS / "method" / f"{m}.yaml").is_file()]
    if unknown:
        parser.error(f"no method config for {unknown} in {CONFIGS / 'method'}")

    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            out = Path(tmp) / f"{method}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", method, "--out", str(out),
                   "--model", args.model, "--edits", str(args.edits), "--batch-size", str(args.batch_size),
                   "--accelerator", args.accelerator, "--seed", str(args.seed)]
            cmd += ["--stats-ok"] if args.stats_ok else []
            cmd += ["--tiny"] if args.tiny else []
            cmd += [f"--override={o}" for o in args.override]
            cmd += ["--threads", str(args.threads)] if args.threads else []
            cmd += ["--data-dir", args.data_dir] if args.data_dir else []
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0 or not out.is_file():
                sys.stderr.write(proc.stderr[-4000:])
                last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
                rows.append({"method": method, "error": f"exit status {proc.returncode}: {last[:200]}"})
                continue
            row = json.loads(out.read_text())
            if "skipped" in row:
                print(f"{method}: skipped: {row['skipped']}", file=sys.stderr)
            rows.append(row)
    load_after = os.getloadavg()
    sys.stdout.write(format_table(rows, args, (load_before[0], load_after[0])))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
