"""Grid throughput: one process using every CPU thread vs several worker processes splitting them.

Runs the same batch of demo-sized jobs (real all-MiniLM-L6-v2, the demo's data: short full fine-tuning
runs evaluated on the 400-sentence validation split) through `saftune.pool.RunPool` with 1 worker and
with `--workers` workers, alternately, and reports jobs per minute and the ratio. Nothing is shared
between the jobs (distinct seeds and learning rates), so only the use of the cores differs; the
validation accuracies of both settings are compared too (threads change float rounding only).

Usage:
    python benchmarks/grid_workers.py                  # results: benchmarks/results/grid_workers.json
    python benchmarks/grid_workers.py --jobs 4 --steps 10 --rounds 1 --out /tmp/w.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from saftune.pool import Job, RunPool
from saftune.grid import GridConfig
from saftune.run import RunConfig
from saftune.train.trainer import TrainConfig

RESULTS = Path(__file__).parent / "results"
DEMO_DATA = GridConfig.load("demo").dataset_options  # the demo's data, from its recipe


def jobs(count: int, steps: int) -> list[Job]:
    train = TrainConfig(epochs=10, max_steps=steps, batch_size=8, schedule="cosine", warmup_steps=0,
                        max_grad_norm=1.0, progress=False)
    return [Job(RunConfig(model="minilm", dataset="sentiment-domains", dataset_options=DEMO_DATA, method="ft",
                          method_options={"lr": 1e-5 * (i + 1)}, train=train, seed=1 + i % 3, eval_batch_size=32),
                evaluate_splits="val") for i in range(count)]


def timed(workers: int, batch: list[Job]) -> tuple[float, list[float]]:
    cache_dir = Path(tempfile.mkdtemp(prefix="grid-workers-"))
    try:
        with RunPool(workers, cache_dir=cache_dir if workers > 1 else None) as pool:
            list(pool.map(batch[:workers]))  # warm-up: workers started, the model loaded once per process
            started = time.perf_counter()
            vals = [r.metrics["val"] for r in pool.map(batch)]
            return time.perf_counter() - started, vals
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=6, help="jobs per measurement (a multiple of --workers)")
    parser.add_argument("--steps", type=int, default=20, help="training steps per job (the demo: 40)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating measurements of each setting")
    parser.add_argument("--out", default=str(RESULTS / "grid_workers.json"))
    args = parser.parse_args()

    batch = jobs(args.jobs, args.steps)
    seconds: dict[int, list[float]] = {1: [], args.workers: []}
    vals = {}
    for _ in range(args.rounds):
        for workers in (1, args.workers):
            took, vals[workers] = timed(workers, batch)
            seconds[workers].append(took)
    best = {w: min(v) for w, v in seconds.items()}
    result = {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpus": os.cpu_count(),
        "machine": f"{platform.machine()}, torch {torch.__version__}",
        "jobs": args.jobs, "steps_per_job": args.steps,
        "seconds": {f"{w} worker(s)": [round(s, 2) for s in v] for w, v in seconds.items()},
        "speedup_of_workers": round(best[1] / best[args.workers], 3),
        "val_accuracies": {f"{w} worker(s)": v for w, v in vals.items()},
        "max_val_difference": max(abs(a - b) for a, b in zip(vals[1], vals[args.workers])),
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
