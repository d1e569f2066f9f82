"""SAFT's step on a GPU with each way of computing the selected entries' gradients, against the limit.

Off the CPU the engine's dot products (one per selected entry, over the batch's tokens) run either as
chunked gather-multiply-sum, `chunk` elements of gathered rows at a time (each chunk costs five kernel
launches), as torch's `sampled_addmm` (cuSPARSE's sampled dense-dense product), or as one TF32 matrix
product of the used rows and columns with the entries picked from it ("dense"). This times one SAFT
step under each, in one process, round by round against the limit (forward + backward to the
activations, nothing trained), with and without gradient checkpointing, on causal LMs with bf16
weights (fp32 master values): the figures that choose the engine's default on CUDA.

Usage (on a CUDA machine):
    python benchmarks/device_dots.py --models llama:576x30 llama:4096x36 --out dots.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from llm_engine import batches, build, prepare, synchronize, trainer  # noqa: E402
from scale import random_mask  # noqa: E402

VARIANTS = {"gather-4M": ("gather", 1 << 22), "gather-64M": ("gather", 1 << 26), "sddmm": ("sddmm", 1 << 22),
            "dense": ("dense", 1 << 22)}


def use(variant: str) -> None:
    from saftune.sparse import kernels

    kernels._DEVICE_DOTS, kernels._DEVICE_CHUNK_ELEMENTS = VARIANTS[variant]


def profile(saft_step, batch, model_name: str, args, failed: dict) -> None:
    """torch.profiler's table of one SAFT step under each variant, the kernels taking the most device time first."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for name in VARIANTS:
        if name in failed:
            continue
        use(name)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            saft_step(batch)
            synchronize()
        key = "cuda_time_total" if args.device == "cuda" else "cpu_time_total"
        path = args.out.with_name(f"{args.out.stem}_profile_{model_name.replace(':', '-')}_{name}.txt")
        path.write_text(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60) + "\n")


def compare(model_name: str, batch: int, args) -> list[dict]:
    import torch

    base = build(model_name, torch.bfloat16, args.device)
    data = [b.to(args.device) for b in batches(base.config.vocab_size, batch, args.seq, 4)]
    limit = prepare("limit", copy.deepcopy(base))
    limit_step = trainer("limit", limit)[0]
    saft_step = trainer("saft", base, random_mask(base, args.sparsity))[0]
    rows = []
    for checkpointing in (False, True):
        for model in (limit, base):
            if checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_disable()
            model.train()
        times: dict[str, list[float]] = {name: [] for name in ["limit", *VARIANTS]}
        peaks: dict[str, float] = {}
        failed: dict[str, str] = {}
        for i in range(args.warmup + args.steps):
            for name in [n for n in times if n not in failed]:
                if name != "limit":
                    use(name)
                synchronize()
                before = torch.cuda.memory_allocated() if args.device == "cuda" else 0
                if args.device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                try:
                    (limit_step if name == "limit" else saft_step)(data[i % len(data)])
                    synchronize()
                except RuntimeError as error:  # a variant the device cannot run: recorded, left out from here on
                    failed[name] = str(error)[:500]
                    continue
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - start)
                if args.device == "cuda":
                    peaks[name] = (torch.cuda.max_memory_allocated() - before) / 2**20
        if args.profile and not checkpointing:
            profile(saft_step, data[0], model_name, args, failed)
        median = {name: statistics.median(t) for name, t in times.items() if t and name not in failed}
        row = {"model": model_name, "params": sum(p.numel() for p in base.parameters()), "checkpointing": checkpointing,
               "tokens_per_step": batch * args.seq, "step_seconds": median, "step_peak_mib": peaks,
               "saft_over_limit_time": {name: median[name] / median["limit"] for name in VARIANTS if name in median},
               "failed": failed}
        print(json.dumps(row), flush=True)
        rows.append(row)
    del base, limit, limit_step, saft_step, data
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["llama:576x30", "llama:4096x36"])
    parser.add_argument("--batch", nargs="+", type=int, default=[8, 4], help="sequences per step, one per model")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--sparsity", type=float, default=1e-3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--profile", action="store_true", help="write a profiler table of one SAFT step per variant")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "device_dots.json")
    args = parser.parse_args(argv)
    if len(args.batch) != len(args.models):
        parser.error(f"--batch takes one size per model: {len(args.models)} models, {len(args.batch)} sizes")
    report = {"machine": {"device": args.device, "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
                          "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()},
              "variants": {k: {"dots": v[0], "chunk_elements": v[1]} for k, v in VARIANTS.items()}, "rows": []}
    for model_name, batch in zip(args.models, args.batch, strict=True):
        report["rows"] += compare(model_name, batch, args)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
