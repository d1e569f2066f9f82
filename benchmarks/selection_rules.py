"""Phase-1 cost of each selection rule: time and memory to choose the same number of entries.

Each rule selects a mask of sparsity `--sparsity` from the same E batches, in a fresh process (peak RSS
is reset after the model and the batches are loaded; "memory" is the peak RSS growth during selection):

    grad     SAFT: |dataset-averaged gradient|, global top-k (one forward and backward per batch)
    gps      the same gradient, the same count per output unit (budget per_row)
    fps      |W| x mean |input|: forward passes only, under torch.no_grad (Linear / Embedding weights)
    lt-sft   |change| after E AdamW steps of full fine-tuning of an fp32 copy
    sift     the gradient of the first batch only, per-tensor top-k

Same models, batches and dual-encoder loss as benchmarks/engine.py.

Usage:
    python benchmarks/selection_rules.py                      # MiniLM (real) and a ~110M synthetic transformer
    python benchmarks/selection_rules.py --models minilm --repeats 1
Results: benchmarks/results/selection_rules.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import engine  # noqa: E402  the models, batches and loss of the engine benchmark

RESULTS = Path(__file__).parent / "results"
RULES = {  # rule -> select_mask options
    "grad": {"score": "grad"},
    "gps": {"score": "grad", "budget": "per_row"},
    "fps": {"score": "fps"},
    "lt-sft": {"score": "lt-sft"},
    "sift": {"score": "grad", "budget": "per_tensor", "max_batches": 1},
}


def worker(args) -> dict:
    import torch

    import saftune

    torch.set_num_threads(args.threads)
    model, vocab = engine._build(args.model)
    prompts, data = engine._batches(vocab, args.batch, args.seq, args.epoch_batches)
    loss_fn = engine._loss_fn(prompts)
    options = dict(RULES[args.rule])
    if args.rule == "lt-sft":  # one fine-tuning step per batch: as many passes over the data as the others
        options["score_options"] = {"steps": args.epoch_batches, "lr": 1e-4}
    model.eval()
    engine._reset_peak()
    base = engine._rss_kib()
    start = time.perf_counter()
    mask = saftune.select_mask(model, loss_fn, data, sparsity=args.sparsity, progress=False, **options)
    seconds = time.perf_counter() - start
    memory_mib = (engine._rss_kib("VmHWM") - base) / 1024
    return {"model": args.model, "rule": args.rule, "seconds": seconds, "memory_mib": memory_mib,
            "selected": mask.num_selected, "candidates": mask.num_candidates}


def run_worker(rule: str, model: str, args) -> dict:
    """One rule in `args.repeats` fresh processes; the medians are reported, every value kept."""
    cmd = [sys.executable, __file__, "--worker", "--rule", rule, "--model", model]
    for key in ("batch", "seq", "sparsity", "threads", "epoch_batches"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    runs = []
    for _ in range(args.repeats):
        out = subprocess.run(cmd, check=False, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if out.returncode != 0:
            raise SystemExit(f"{model}/{rule} failed:\n{out.stderr[-3000:]}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    result = dict(runs[0])
    for key in ("seconds", "memory_mib"):
        result[key] = statistics.median(r[key] for r in runs)
        result[f"{key}_all"] = [r[key] for r in runs]
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["minilm", "synthetic-110m"], help="models to measure")
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES), help="selection rules")
    parser.add_argument("--batch", type=int, default=8, help="sequences per batch")
    parser.add_argument("--seq", type=int, default=32, help="tokens per sequence")
    parser.add_argument("--sparsity", type=float, default=1e-3, help="fraction of the entries to select")
    parser.add_argument("--epoch-batches", type=int, default=8, help="batches phase 1 reads (sift: the first only)")
    parser.add_argument("--threads", type=int, default=engine.torch_threads(), help="torch threads")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per measurement (medians are reported)")
    parser.add_argument("--out", type=Path, default=RESULTS / "selection_rules.json", help="where to write the JSON results")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rule", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return

    import torch

    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "settings": {k: getattr(args, k) for k in ("batch", "seq", "sparsity", "epoch_batches", "threads", "repeats")},
        "models": {},
    }
    for model in args.models:
        rows = {}
        for rule in args.rules:
            rows[rule] = run_worker(rule, model, args)
            print(f"  {model:<15} {rule:<7} {rows[rule]['seconds']:7.2f}s  {rows[rule]['memory_mib']:8.1f} MiB  "
                  f"{rows[rule]['selected']} of {rows[rule]['candidates']}", flush=True)
        ratios = {}
        if "grad" in rows:
            for rule in rows:
                if rule != "grad":
                    ratios[f"{rule}_time_vs_grad"] = rows[rule]["seconds"] / rows["grad"]["seconds"]
                    ratios[f"{rule}_memory_vs_grad"] = rows[rule]["memory_mib"] / rows["grad"]["memory_mib"]
        report["models"][model] = {"runs": rows, "ratios": ratios}
        for key, value in ratios.items():
            print(f"  {key:<26} {value:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
