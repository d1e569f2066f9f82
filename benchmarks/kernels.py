"""When is the gathered sparse weight gradient faster than the dense one?

For an nn.Linear with d selected entries, the engine computes dL/dW[r, c] = sum_n dy[n, r] x[n, c] for
the selected (r, c) only (`saftune.sparse.kernels.gathered_weight_grad`), instead of the dense
dy^T x (out x in) followed by a gather. This script times both over densities and shapes and prints
the density where the dense path starts to win; `LINEAR_KERNEL_MAX_DENSITY` in the engine should sit
below it.

Usage:
    python benchmarks/kernels.py                 # results: benchmarks/results/kernels.json
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
from saftune.sparse.kernels import gathered_weight_grad

RESULTS = Path(__file__).parent / "results"


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def measure(out_features: int, in_features: int, tokens: int, density: float, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    grad_out = torch.randn(tokens, out_features, generator=g)
    inputs = torch.randn(tokens, in_features, generator=g)
    d = max(1, int(density * out_features * in_features))
    flat = torch.sort(torch.randperm(out_features * in_features, generator=g)[:d]).values
    rows, cols = flat // in_features, flat % in_features
    sparse = _time(lambda: gathered_weight_grad(grad_out, inputs, rows, cols), repeats)
    dense = _time(lambda: (grad_out.T @ inputs).view(-1)[flat], repeats)
    return {"shape": [out_features, in_features], "tokens": tokens, "density": density, "selected": d,
            "sparse_seconds": sparse, "dense_seconds": dense, "sparse_over_dense": sparse / dense}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per point (median)")
    parser.add_argument("--out", type=Path, default=RESULTS / "kernels.json", help="JSON results")
    args = parser.parse_args(argv)
    densities = [1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3]
    rows = []
    for shape in ((384, 384), (1536, 384), (768, 768), (3072, 768)):
        for tokens in (256, 2048):
            for density in densities:
                r = measure(*shape, tokens, density, args.repeats)
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
                                    "threads": torch.get_num_threads(), "rows": rows, "crossover": crossover}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
