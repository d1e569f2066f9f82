"""What the engine's heap release costs and saves: SAFT with and without it, in alternating fresh processes.

With gradient checkpointing on the CPU the engine calls glibc's `malloc_trim` once per training step,
after the forward pass (`saftune.sparse.heap`). The pages it hands back are faulted in again where the
backward pass reuses them, so its cost is the call plus those faults, which only a whole step shows.
The release acts on the process's heap, so it cannot be timed beside other methods in one process (as
benchmarks/llm_engine.py times the rest): here each process runs one variant alone, the two variants
alternate --reps times (the machine's drift reaches both alike), and each pair gives one ratio.

    saft            the engine as shipped (release on)
    saft-heap-kept  the same without the release

`--variants A B` pairs two other methods of llm_engine.py the same way, e.g. `saft limit`: SAFT's step time
over the limit's with the release included, which the interleaved timing there cannot give.

Each process: the model, --warmup steps, then --steps timed steps (median), peak RSS over the loaded
model (the step's memory, as llm_engine.py measures it), with llm_engine.py's models and batches.

Usage:
    python benchmarks/heap_release.py --models smollm2 llama:768x12 --dtypes fp32 bf16 --reps 3
    python benchmarks/heap_release.py --quick     # smoke run, under a minute
Results: --out (default benchmarks/results/heap_release.json) and the same name .png
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import llm_engine  # noqa: E402

VARIANTS = ("saft", "saft-heap-kept")


def measure(args, model: str, dtype: str, method: str) -> dict:
    """One process: `method` alone on `model`, checkpointing on."""
    options = {"batch": args.batch, "seq": args.seq, "steps": args.steps, "warmup": args.warmup, "sparsity": args.sparsity,
               "threads": args.threads, "batches": 1, "device": "cpu", "model": model, "method": method, "dtype": dtype,
               "checkpointing": True}
    return llm_engine.run_worker(llm_engine.__file__, options, {"model": model, "method": method, "dtype": dtype})


def summary(pairs: list[dict], variants=VARIANTS) -> dict:
    """Ratios first variant / second per pair, and their median, min and max."""
    first, second = variants
    ok = [p for p in pairs if all("step_seconds" in p[v] for v in variants)]
    if not ok:
        return {}
    time_ratios = [p[first]["step_seconds"] / p[second]["step_seconds"] for p in ok]
    memory = {v: [p[v]["memory_mib"] for p in ok] for v in variants}
    memory_ratios = [a / b for a, b in zip(memory[first], memory[second], strict=True)]
    return {"pairs": len(ok),
            "time_ratio_median": statistics.median(time_ratios), "time_ratio_min": min(time_ratios),
            "time_ratio_max": max(time_ratios),
            "memory_ratio_median": statistics.median(memory_ratios), "memory_ratio_min": min(memory_ratios),
            "memory_ratio_max": max(memory_ratios),
            "memory_mib_median": {v: statistics.median(m) for v, m in memory.items()}}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    first, second = variants = report["settings"].get("variants", VARIANTS)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, run in enumerate(runs.values()):
        ok = [p for p in run["pairs"] if all("step_seconds" in p[v] for v in variants)]
        left.scatter([i] * len(ok), [p[first]["step_seconds"] / p[second]["step_seconds"] for p in ok], color="C0")
        for j, v in enumerate(variants):
            right.bar(i + j * 0.4, statistics.median(p[v]["memory_mib"] for p in ok) if ok else 0, 0.4,
                      color=f"C{j}", label=v if i == 0 else None)
    labels = [k.replace("/", "\n") for k in runs]
    left.axhline(1.0, color="gray", lw=0.8)
    left.set_xticks(range(len(runs)), labels, fontsize=7)
    left.set_ylabel(f"step time, {first} / {second} (one point per pair)")
    right.set_xticks([i + 0.2 for i in range(len(runs))], labels, fontsize=7)
    right.set_ylabel("peak RSS over the loaded model (MiB), median")
    right.legend()
    machine = report["machine"]
    fig.suptitle(f"heap release after a checkpointed forward pass ({machine['cpu_capability']}, {machine['threads']} threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2", "llama:768x12"])
    parser.add_argument("--dtypes", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    parser.add_argument("--variants", nargs=2, default=list(VARIANTS), help="the two methods to pair (llm_engine.py's)")
    parser.add_argument("--reps", type=int, default=3, help="pairs of processes per model and dtype")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--sparsity", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--quick", action="store_true", help="smoke run: a tiny model, short sequences, one pair")
    parser.add_argument("--out", type=Path, default=llm_engine.RESULTS / "heap_release.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.dtypes, args.seq, args.steps, args.reps = ["llama:128x4"], ["fp32"], 64, 2, 1
    import torch

    report = {"machine": {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
                          "threads": args.threads, "platform": platform.platform(), "torch": torch.__version__},
              "settings": {k: getattr(args, k) for k in ("batch", "seq", "steps", "warmup", "sparsity", "reps", "variants")},
              "runs": {}}
    started = time.perf_counter()
    for model in args.models:
        for dtype in args.dtypes:
            pairs = []
            for rep in range(args.reps):
                order = args.variants if rep % 2 == 0 else args.variants[::-1]  # alternate which goes first
                pair = {v: measure(args, model, dtype, v) for v in order}
                pairs.append(pair)
            key = f"{model}/{dtype}/checkpointing-on"
            report["runs"][key] = {"pairs": pairs, "summary": summary(pairs, args.variants)}
            print(key, json.dumps(report["runs"][key]["summary"]), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1) + "\n")
    report["seconds"] = time.perf_counter() - started
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out} in {report['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
