"""Benchmark: training throughput of the trainable editors (MEND, KE, MALMEN, RLEdit) with 1 and 2 processes.

Each (method, processes) pair trains the editor of the experiment ``<method>_smollm2_counterfact``
(its method config and learning rate; ``--model`` swaps the base model) on the first records of
``counterfact/counterfact-train.json`` for ``--warmup`` + ``--steps`` optimizer steps of
``--batch-size`` edits per process (``--batch-edits``: one joint batch edit, or each record edited
on its own in one batched pass; MALMEN always edits a step's records jointly), with
:class:`~editlab.lit.editor_train.EditorTrainModule` and a Lightning Trainer: one process, or DDP over ``--procs`` processes (gloo on CPU, NCCL on GPU;
Lightning launches the extra ranks).  RLEdit trains episodes: each of its optimizer steps is an
episode of ``--episode-steps`` steps of ``--batch-size`` edits (joint batch edits only; on another
model than SmolLM2-135M it edits the MLP weights of the last three blocks, its preset's weights
being SmolLM2's).  Validation, checkpoints and logging are off.  Timed: the
steps after the warm-up, on rank 0 (ranks are in lock-step through the gradient all-reduce).

Columns: ``examples/s`` = edits trained per second over all processes; ``steps/s`` = optimizer
steps per second; ``peak mem`` = the largest per-process peak (CPU: peak RSS, model included;
GPU: peak allocated CUDA memory).  Every configuration runs in fresh processes.

    python benchmarks/train_throughput.py                            # SmolLM2-135M (packaged), CPU
    python benchmarks/train_throughput.py --model tiny_llama --steps 5  # a quick check
    python benchmarks/train_throughput.py --accelerator gpu --procs 1,2
    python benchmarks/train_throughput.py --methods mend --procs 1 --batch-size 10 --batch-edits independent
    python benchmarks/train_throughput.py --methods malmen --procs 1,2 --batch-size 100  # one batch edit per step
    python benchmarks/train_throughput.py --methods rledit --procs 1 --batch-size 10 --episode-steps 10

On CPU each process gets ``cores / processes`` threads (``--threads`` to override); run it with
nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("mend", "ke", "malmen", "rledit")


def _compose(method: str, model: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "editlab" / "configs"), version_base="1.3"):
        # the experiment's training settings; the method preset of this (method, model) pairing
        # where there is one, else the method's own defaults (a preset is per model)
        preset = f"{method}/{model}" if (ROOT / "editlab" / "configs" / "method" / method / f"{model}.yaml").is_file() \
            else method
        overrides = [f"experiment={method}_smollm2_counterfact", f"model={model}", f"method={preset}"]
        return compose(config_name="train", overrides=overrides)


def run_worker(args: argparse.Namespace) -> None:
    """One configuration (this process is rank 0, or a rank Lightning launched)."""
    import hydra

    from editlab.data.datamodule import EditDataModule
    from editlab.data.loaders import load_counterfact_easyedit
    from editlab.lit.editor_train import EditorTrainModule

    torch.set_num_threads(args.threads)
    cfg = _compose(args.worker, args.model)
    L.seed_everything(0, verbose=False)
    bundle = hydra.utils.instantiate(cfg.model)
    per_step = args.batch_size  # edits per optimizer step and process
    if args.worker == "rledit":
        if args.batch_edits != "joint":
            raise SystemExit("rledit trains joint batch edits only (--batch-edits joint)")
        kwargs = {"edits_per_step": args.batch_size, "episode_steps": args.episode_steps}
        per_step = args.batch_size * args.episode_steps
    elif "batch_edits" in cfg.method:
        kwargs = {"batch_edits": args.batch_edits}
    elif args.batch_edits == "joint":  # MALMEN: a step's records are one batch edit
        kwargs = {}
    else:
        raise SystemExit(f"{args.worker} edits a step's records jointly only (--batch-edits joint)")
    editor = hydra.utils.instantiate(cfg.method, **kwargs)
    module = EditorTrainModule(bundle, editor, lr=cfg.fit.module.lr)
    steps = args.warmup + args.steps
    n_records = steps * per_step * args.procs
    records = load_counterfact_easyedit("counterfact/counterfact-train.json", limit=n_records,
                                        data_dir=args.data_dir)
    datamodule = EditDataModule(train=lambda: records, train_batch_size=per_step)
    timer = StepTimer(args.warmup)
    trainer = L.Trainer(
        accelerator=args.accelerator, devices=args.procs, strategy="ddp" if args.procs > 1 else "auto",
        max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=100.0,
        inference_mode=False, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[timer],
    )
    trainer.fit(module, datamodule=datamodule)
    if torch.cuda.is_available() and args.accelerator == "gpu":
        peak = torch.cuda.max_memory_allocated() / 1024**3
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    peaks = trainer.strategy.all_gather(torch.tensor([peak], dtype=torch.float64, device=module.device))
    if trainer.is_global_zero:
        seconds = timer.seconds
        result = {
            "method": args.worker, "batch_edits": args.batch_edits, "procs": args.procs,
            "steps": args.steps, "seconds": seconds,
            "steps_per_s": args.steps / seconds,
            "examples_per_s": args.steps * per_step * args.procs / seconds, "edits_per_step": per_step,
            "peak_gb": float(peaks.max()), "editor_params": sum(p.numel() for p in editor.parameters()),
            "device": timer.device, "threads": torch.get_num_threads(),
        }
        Path(args.out).write_text(json.dumps(result))


class StepTimer(L.Callback):
    """Wall time of the optimizer steps after ``warmup``."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start: float | None = None
        self.end: float | None = None
        self.device = "?"  # where the steps ran (the strategy moves the module back to the CPU after fit)

    @staticmethod
    def _now(pl_module) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.device = pl_module.device.type
        if trainer.global_step == self.warmup and self.start is None:
            self.start = self._now(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.end = self._now(pl_module)

    @property
    def seconds(self) -> float:
        if self.start is None or self.end is None:
            raise RuntimeError("no timed step: increase --steps")
        return self.end - self.start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2_135m",
                        help="an editlab/configs/model name: smollm2_135m (packaged, default), tiny_llama, ...")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--procs", default="1,2", help="process counts to run, comma-separated")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    parser.add_argument("--batch-size", type=int, default=1, help="edits per step and process")
    parser.add_argument("--episode-steps", type=int, default=2,
                        help="rledit: steps of --batch-size edits per episode (= per optimizer step)")
    parser.add_argument("--batch-edits", default="joint",
                        help="joint and/or independent (comma-separated): how a step's edits are applied")
    parser.add_argument("--accelerator", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per process (CPU default: cores / procs)")
    parser.add_argument("--data-dir", default=None, help="data directory (default: editlab's resolution)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        warnings.filterwarnings("ignore")
        args.procs = int(args.procs)
        run_worker(args)
        return

    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        configs = [(m, b, int(p)) for m in args.methods.split(",") for b in args.batch_edits.split(",")
                   for p in args.procs.split(",")]
        for method, batch_edits, procs in configs:
            threads = args.threads or max(1, (os.cpu_count() or 1) // procs)
            out = Path(tmp) / f"{method}-{batch_edits}-{procs}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method, "--out", str(out),
                   "--model", args.model, "--procs", str(procs), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
                   "--episode-steps", str(args.episode_steps),
                   "--batch-edits", batch_edits, "--accelerator", args.accelerator, "--threads", str(threads)]
            if args.data_dir:
                cmd += ["--data-dir", args.data_dir]
            env = dict(os.environ, OMP_NUM_THREADS=str(threads))
            env.pop("LOCAL_RANK", None)
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr[-4000:])
                raise SystemExit(f"{method} ({batch_edits}) with {procs} process(es) failed")
            rows.append(json.loads(out.read_text()))
    load_after = os.getloadavg()
    header = (f"{'method':6} {'batch edits':>11} {'edits/step':>10} {'procs':>5} {'device':>6} {'threads':>7} "
              f"{'steps':>5} "
              f"{'s/step':>7} "
              f"{'steps/s':>8} {'examples/s':>10} {'peak mem':>9} {'editor params':>13}")
    lines = [f"model {args.model}; edits/step: per optimizer step and process (rledit: an episode of "
             f"{args.episode_steps} steps of {args.batch_size})", header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['method']:6} {r['batch_edits']:>11} {r['edits_per_step']:>10} {r['procs']:>5} {r['device']:>6} "
            f"{r['threads']:>7} {r['steps']:>5} "
            f"{r['seconds'] / r['steps']:>7.3f} {r['steps_per_s']:>8.3f} {r['examples_per_s']:>10.2f} "
            f"{r['peak_gb']:>7.2f}GB {r['editor_params']:>13,}"
        )
    lines.append(f"torch {torch.__version__}; load average before {load_before[0]:.2f}, "
                 f"after {load_after[0]:.2f}")
    lines.append("peak mem: largest per-process peak (CPU: peak RSS incl. the model; "
                 "GPU: peak CUDA allocation)")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
