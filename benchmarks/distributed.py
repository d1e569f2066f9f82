"""Communication per step of data-parallel training: SAFT all-reduces d values, full fine-tuning all D.

Trains MiniLM on sentiment-domains for a few steps with `saftune train`, once in one process and once
under torchrun with 2 processes (gloo on CPU; each process one thread, the single process two), and
reads from the run log the bytes each process all-reduced per step and the step times.

Usage:
    python benchmarks/distributed.py                       # saft, bitfit, lora, ft; 12 steps each
    python benchmarks/distributed.py --methods saft ft --steps 6
Results: benchmarks/results/distributed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def train(method: str, processes: int, args, out: Path) -> dict:
    """One `saftune train` run; returns the per-step log records (after the warm-up steps)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(max(1, args.threads // processes))}
    env.pop("WORLD_SIZE", None)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", "-m", "saftune.cli"]
    cmd = [*(launcher if processes > 1 else [sys.executable, "-m", "saftune.cli"]), "-q", "train",
           "--model", args.model, "--dataset", "sentiment-domains", "--method", method,
           "--dataset-option", "max_test=32", "--dataset-option", "max_ood=32", "--dataset-option", "val_per_class=16",
           "--set", f"train.max_steps={args.steps}", "--set", f"train.batch_size={args.batch}",
           "--set", "train.checkpoint_every=null", "--set", "save_result=false", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{method} with {processes} processes failed:\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    seconds = [b["seconds"] - a["seconds"] for a, b in zip(steps, steps[1:])][args.warmup:]
    metrics = json.loads((out / "metrics.json").read_text())
    return {"step_seconds": statistics.median(seconds), "allreduce_bytes": steps[-1].get("allreduce_bytes", 0),
            "trainable": metrics["trainable"], "total_params": metrics["total_params"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["saft", "bitfit", "lora", "ft"])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--steps", type=int, default=12, help="training steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="step intervals left out of the median")
    parser.add_argument("--batch", type=int, default=16, help="global batch size")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads shared by the processes")
    parser.add_argument("--out", type=Path, default=RESULTS / "distributed.json")
    args = parser.parse_args(argv)

    report = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
              "settings": {k: getattr(args, k) for k in ("model", "steps", "warmup", "batch", "threads")}, "methods": {}}
    print(f"{'method':<8} {'trainable':>11} {'bytes/step':>12} {'of 4·D':>8} {'1 proc s/step':>14} {'2 procs s/step':>15}")
    for method in args.methods:
        with tempfile.TemporaryDirectory() as tmp:
            one = train(method, 1, args, Path(tmp) / "one")
            two = train(method, 2, args, Path(tmp) / "two")
        share = two["allreduce_bytes"] / (4 * two["total_params"])
        report["methods"][method] = {"one_process": one, "two_processes": two, "bytes_vs_dense_fp32": share}
        print(f"{method:<8} {two['trainable']:>11d} {two['allreduce_bytes']:>12d} {share:>8.2%} "
              f"{one['step_seconds']:>14.3f} {two['step_seconds']:>15.3f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
