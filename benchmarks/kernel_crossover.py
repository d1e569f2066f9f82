"""When is the gathered sparse weight gradient faster than the dense one?

For an nn.Linear with d selected entries, the engine computes dL/dW[r, c] = sum_n dy[n, r] x[n, c] for
the selected (r, c) only (`saftune.sparse.kernels.selected_weight_grad`), instead of the dense
dy^T x (out x in) followed by a gather. This script times both over densities and shapes and prints
the density where the dense path starts to win; `LINEAR_KERNEL_MAX_DENSITY` in the engine should sit
below it.

The sparse side is what the kernel adds to a training step (the forward's gather of the used input
columns and the backward's sampled dot products, `LinearSelection` built once as at sparsify time); the
dense side is the hook path (dense weight gradient, then a gather). Masks are random: every selected
entry in its own row and column as far as possible, the slowest case for the sparse kernel.

Usage:
    python benchmarks/kernel_crossover.py --threads 2      # results: benchmarks/results/kernel_crossover.json (wall clock)
    python benchmarks/kernel_crossover.py --threads 1 --cpu-time --out /tmp/k.json   # on a busy machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from saftune.sparse.engine import LINEAR_KERNEL_MAX_DENSITY
from saftune.sparse.kernels import LinearSelection, selected_weight_grad

RESULTS = Path(__file__).parent / "results"


def _time(fns: dict, repeats: int, clock=time.perf_counter) -> dict:
    """Median seconds per function, the functions interleaved (A, B, A, B, ...) so that both see the same
    machine load."""
    for fn in fns.values():
        fn()  # warm-up
    samples = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = clock()
            fn()
            samples[key].append(clock() - start)
    return {key: statistics.median(v) for key, v in samples.items()}


def measure(out_features: int, in_features: int, tokens: int, density: float, repeats: int, clock=time.perf_counter) -> dict:
    g = torch.Generator().manual_seed(0)
    grad_out = torch.randn(tokens, out_features, generator=g)
    inputs = torch.randn(tokens, in_features, generator=g)
    d = max(1, int(density * out_features * in_features))
    flat = torch.sort(torch.randperm(out_features * in_features, generator=g)[:d]).values
    selection = LinearSelection.from_indices(flat, (out_features, in_features))  # built once, at sparsify time

    def sparse():  # what the kernel adds to a step: the forward's column gather and the backward's dot products
        return selected_weight_grad(grad_out, selection.columns(inputs), selection)

    def dense():  # the hook path: the dense weight gradient, then the gather of the selected entries
        return (grad_out.T @ inputs).view(-1).index_select(0, flat)

    torch.testing.assert_close(sparse(), dense(), atol=1e-3, rtol=1e-4)
    t = _time({"sparse": sparse, "dense": dense}, repeats, clock)
    return {"shape": [out_features, in_features], "tokens": tokens, "density": density, "selected": d,
            "sparse_seconds": t["sparse"], "dense_seconds": t["dense"], "sparse_over_dense": t["sparse"] / t["dense"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per point (median)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--out", type=Path, default=RESULTS / "kernel_crossover.json", help="JSON results")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with the thread's CPU clock (use with --threads 1 on a busy machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    densities = [1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3]
    rows = []
    for shape in ((384, 384), (1536, 384), (768, 768), (3072, 768), (768, 3072), (1024, 1024), (4096, 1024)):
        for tokens in (128, 256, 2048):
            for density in densities:
                r = measure(*shape, tokens, density, args.repeats, clock)
                rows.append(r)
                print(f"  {shape[0]:>4}x{shape[1]:<4} tokens {tokens:>5} density {density:7.4f}: sparse "
                      f"{1e3 * r['sparse_seconds']:8.2f} ms  dense {1e3 * r['dense_seconds']:8.2f} ms  "
                      f"ratio {r['sparse_over_dense']:6.2f}", flush=True)
    crossover = {}
    for r in rows:
        key = f"{r['shape'][0]}x{r['shape'][1]}/tokens={r['tokens']}"
        if r["sparse_over_dense"] >= 1 and key not in crossover:
            crossover[key] = r["density"]
    print("\nfirst density where the dense gradient is at least as fast:")
    for key in dict.fromkeys(f"{r['shape'][0]}x{r['shape'][1]}/tokens={r['tokens']}" for r in rows):
        print(f"  {key:<24} {crossover.get(key, '> 0.3')}")
    print(f"engine threshold LINEAR_KERNEL_MAX_DENSITY = {LINEAR_KERNEL_MAX_DENSITY}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                                    "threads": torch.get_num_threads(),
                                    "clock": "thread CPU time" if args.cpu_time else "wall", "rows": rows, "crossover": crossover}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
