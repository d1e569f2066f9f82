"""AdamW's step on full fine-tuning of the real all-MiniLM-L6-v2: torch's per-tensor loop vs its fused kernel.

The trainer steps AdamW with `fused=True` wherever torch has the kernel (CPU and CUDA). This times one
optimizer step over all 22.7M parameters (gradients filled with noise) for each implementation,
alternately in one process so both see the same machine load, and checks that the two give the same
weights up to float rounding. It also times a whole demo training step (forward, backward, clip, AdamW)
to show the step's share of it.

Usage:
    python benchmarks/optimizer_step.py             # results: benchmarks/results/optimizer_step.json
    python benchmarks/optimizer_step.py --repeats 5 --out /tmp/o.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from saftune.models import create
from saftune.grid import GridConfig
from saftune.run import RunConfig, build_benchmark

RESULTS = Path(__file__).parent / "results"


def timed_steps(model, implementation: str, steps: int) -> tuple[float, torch.nn.Module]:
    """Median seconds of one AdamW step over every parameter; returns the model it stepped too."""
    params = [p for p in model.parameters()]
    options = {"fused": True} if implementation == "fused" else {"foreach": implementation == "foreach"}
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, **options)
    generator = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator) * 1e-3
        started = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:]), model


def training_step_seconds(model, bench, steps: int) -> float:
    """Median seconds of a demo training step (8 sentences, forward + backward + clip + fused AdamW)."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    times = []
    for step in range(steps):
        batch = model.collate(bench.train.inputs[8 * step % 32 : 8 * step % 32 + 8],
                              bench.train.labels[8 * step % 32 : 8 * step % 32 + 8], train=True)
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model({k: v for k, v in batch.items() if k != "labels"}),
                                                 batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds of each implementation")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per round (the first is not timed)")
    parser.add_argument("--out", default=str(RESULTS / "optimizer_step.json"))
    args = parser.parse_args()

    pretrained = create("minilm")
    bench = build_benchmark(RunConfig(dataset="sentiment-domains", dataset_options=GridConfig.load("demo").dataset_options))
    pretrained.set_classes(bench.classnames, bench.templates)
    implementations = ["for-loop", "foreach", "fused"]
    seconds = {name: [] for name in implementations}
    finals = {}
    for _ in range(args.repeats):
        for name in implementations:
            took, stepped = timed_steps(copy.deepcopy(pretrained), name, args.steps)
            seconds[name].append(took)
            finals[name] = stepped
    reference = dict(finals["for-loop"].named_parameters())
    max_diff = max((p - reference[n]).abs().max().item() for n, p in finals["fused"].named_parameters())
    step = training_step_seconds(copy.deepcopy(pretrained), bench, args.steps + 1)
    median = {name: statistics.median(v) for name, v in seconds.items()}
    result = {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "parameters": sum(p.numel() for p in pretrained.parameters()),
        "adamw_step_seconds": {k: round(v, 4) for k, v in median.items()},
        "fused_speedup_over_for_loop": round(median["for-loop"] / median["fused"], 2),
        "fused_speedup_over_foreach": round(median["foreach"] / median["fused"], 2),
        "max_abs_weight_difference_fused_vs_for_loop": max_diff,
        "demo_training_step_seconds_with_fused": round(step, 4),
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
