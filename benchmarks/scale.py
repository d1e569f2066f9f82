"""SAFT at scale: step time and memory against model size and sparsity, phase-1 cost, and the largest
model each method trains in a memory budget.

Models are synthetic BERT-shaped encoders (random weights; hidden h, L layers, 4h MLP, h/64 heads, BERT's
30522-token vocabulary, BERT's dropout), trained with the dual-encoder loss of benchmarks/engine.py. As
there, every measurement runs in a fresh subprocess: after the model and the batches are loaded the
process resets its peak RSS, then builds the method (optimizer, sparsify, ...) and trains. Per run:
    step_seconds  median over the timed steps (after --warmup untimed ones)
    memory_mib    peak RSS growth over the loaded model (what training adds; the engine benchmark's measure)
    peak_mib      the process's absolute peak RSS (what has to fit in the machine)

SAFT's mask is drawn at random, tensor by tensor in proportion to size, with exactly floor(sparsity * D)
entries: phase 1 (a `grad` score needs a fp32 accumulator per parameter) is timed on its own below, and a
random mask spreads the entries over the most rows and columns, the slowest case for the sparse kernels.

Parts (--parts, all by default):
    size       limit / ft / lora / naive / saft at sparsity 1e-3 from ~11M to ~2.6B parameters, and limit /
               lora / saft again with bf16 weights (-bf16).
               limit = forward + backward to the activations only (nothing trained); lora = LoRA r=8 on
               every nn.Linear (PEFT; with bf16 weights its adapters stay fp32, PEFT's default); naive = the
               published dense SAFT recipe; saft-bf16 = bf16 weights with fp32 master values
               (`sparsify(model.to(torch.bfloat16), mask)`). A method is skipped where its predicted peak
               passes --skip-gib (the reason is in the JSON).
    sparsity   SAFT step time and memory at sparsity 1e-4 ... 1e-1 on --mid-size.
    phase1     mask selection (`select_mask`, grad score) time against the number of batches, with one
               full fine-tuning epoch over the same batches as the reference, on --mid-size.
    capacity   peak RSS = a + b * parameters fitted per method on the size part; the largest model under
               --budget-gib predicted from it, then checked by one run (one step) of SAFT-bf16 and of
               full FT at ~95% of their predicted limits (--no-verify skips the runs).
    target     the step-time targets on the largest model that fits: SAFT's largest trainable model has
               bf16 weights, so limit-bf16 / lora-bf16 / saft-bf16 run on a model at 90% of the smaller
               of LoRA-bf16's and SAFT-bf16's predicted limits (needs the capacity fits: run it with
               capacity, or later with --update).

Usage:
    python benchmarks/scale.py                     # everything: about an hour on 2 quiet CPU cores
    python benchmarks/scale.py --quick             # smoke run on ~1M-parameter models (~2 min)
    python benchmarks/scale.py --parts size --sizes 256x4 768x12
    python benchmarks/scale.py --parts target --update --repeats 1   # add the target part to the saved JSON
Results: benchmarks/results/scale.json and benchmarks/results/scale.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from engine import _batches, _loss_fn, _reset_peak, _rss_kib, make_train_step, wrap_model

RESULTS = Path(__file__).parent / "results"
VOCAB = 30522
METHODS = ["limit", "ft", "lora", "naive", "saft", "limit-bf16", "lora-bf16", "saft-bf16"]
DEFAULT_SIZES = ["256x4", "512x8", "768x12", "1024x24", "1536x24", "2048x20", "2560x32"]
# Rough absolute peak RSS per parameter (weights + what training adds), only to skip runs that cannot fit.
BYTES_PER_PARAM = {"limit": 4.3, "ft": 16.5, "lora": 4.5, "naive": 21.5, "saft": 4.4, "limit-bf16": 2.2, "lora-bf16": 2.4,
                   "saft-bf16": 2.3, "phase1": 12.5}
OVERHEAD_GIB = 1.0  # interpreter, libraries, activations of a 4 x 32 batch
TARGETS = {"saft_time_vs_lora": 0.85, "saft_time_vs_ft": 0.55, "saft_memory_vs_lora": 0.9,
           "saft_bf16_time_vs_lora_bf16": 0.85, "saft_bf16_memory_vs_lora_bf16": 0.9}
QUICK = {"sizes": ["128x2", "256x2"], "vocab": 6000, "mid_size": "256x2", "sparsities": [1e-3, 1e-2],
         "phase1_batches": [1, 2], "steps": 2, "warmup": 1, "repeats": 1, "verify": False}


def parse_size(text: str) -> tuple[int, int]:
    """'768x12' -> (hidden 768, 12 layers)."""
    hidden, layers = text.lower().split("x")
    return int(hidden), int(layers)


def param_count(hidden: int, layers: int, vocab: int = VOCAB) -> int:
    """Parameters of `build_model(hidden, layers, vocab)`, without building it."""
    per_layer = 12 * hidden * hidden + 13 * hidden  # q, k, v, out (h x h + h), MLP (2 x 4h x h + 5h), 2 LayerNorms
    return layers * per_layer + (vocab + 512 + 2) * hidden + 2 * hidden


def shape_for(params: float, vocab: int = VOCAB) -> str:
    """A BERT-like shape with at most `params` parameters: hidden a multiple of 256 near 32 layers' worth."""
    hidden = max(256, int(math.sqrt(params / (12 * 32)) // 256 * 256))
    per_layer = param_count(hidden, 1, vocab) - param_count(hidden, 0, vocab)
    layers = max(1, int((params - param_count(hidden, 0, vocab)) // per_layer))
    return f"{hidden}x{layers}"


def predicted_gib(method: str, params: int) -> float:
    return BYTES_PER_PARAM[method] * params / 2**30 + OVERHEAD_GIB


# ---------------------------------------------------------------------------------------------- worker
def build_model(hidden: int, layers: int, vocab: int, dtype):
    """A randomly initialised BertModel built directly in `dtype` (a bf16 model never exists in fp32)."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=max(1, hidden // 64), intermediate_size=4 * hidden)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return BertModel(config, add_pooling_layer=False)
    finally:
        torch.set_default_dtype(previous)


def random_mask(model, sparsity: float, seed: int = 0):
    """Exactly floor(sparsity * D) entries, spread over the tensors in proportion to their sizes, drawn
    uniformly within each tensor (without the D-sized score tensors that `select_mask` would build)."""
    import torch

    from saftune import SparseMask
    from saftune.sparse.select import per_tensor_budget, selected_count

    params = dict(model.named_parameters())
    sizes = [p.numel() for p in params.values()]
    budget = per_tensor_budget(sizes, selected_count(sparsity, sum(sizes)))
    g = torch.Generator().manual_seed(seed)
    indices = {}
    for (name, p), k in zip(params.items(), budget, strict=True):
        n = p.numel()
        if k == 0:
            continue
        if 4 * k >= n:
            indices[name] = torch.randperm(n, generator=g)[:k]
            continue
        chosen = torch.empty(0, dtype=torch.int64)
        while chosen.numel() < k:  # oversample, deduplicate, top up
            draw = torch.randint(0, n, (2 * (k - chosen.numel()) + 16,), generator=g)
            chosen = torch.unique(torch.cat([chosen, draw]))
        indices[name] = chosen[torch.randperm(chosen.numel(), generator=g)[:k]]
    return SparseMask(indices, {n: tuple(p.shape) for n, p in params.items()},
                      {"score": "random-per-tensor", "sparsity": sparsity, "seed": seed})


def worker(args) -> dict:
    import torch

    import saftune

    torch.set_num_threads(args.threads)
    hidden, layers = parse_size(args.size)
    dtype = torch.bfloat16 if args.method.endswith("-bf16") else torch.float32
    start = time.perf_counter()
    model = build_model(hidden, layers, args.vocab, dtype)
    build_seconds = time.perf_counter() - start
    steps = args.warmup + args.steps
    prompts, data = _batches(args.vocab, args.batch, args.seq, max(steps, args.batches))
    loss_fn = _loss_fn(prompts)
    result = {"size": args.size, "method": args.method, "params": sum(p.numel() for p in model.parameters()),
              "dtype": str(dtype).replace("torch.", ""), "build_seconds": build_seconds}

    if args.method == "phase1":
        model.eval()
        base = _rss_kib()
        _reset_peak()
        start = time.perf_counter()
        mask = saftune.select_mask(model, loss_fn, data[: args.batches], sparsity=args.sparsity, progress=False)
        result.update(seconds=time.perf_counter() - start, batches=args.batches, selected=mask.num_selected,
                      memory_mib=(_rss_kib("VmHWM") - base) / 1024, peak_mib=_rss_kib("VmHWM") / 1024)
        return result

    method = args.method.removesuffix("-bf16")
    mask = random_mask(model, args.sparsity) if method in ("saft", "naive") else None
    model = wrap_model(method, model)
    model.train()
    base = _rss_kib()
    _reset_peak()
    train_step, params = make_train_step(method, model, loss_fn, mask)
    times = []
    for i in range(steps):
        start = time.perf_counter()
        train_step(data[i % len(data)])
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    result.update(step_seconds=statistics.median(times), step_seconds_each=times, model_mib=base / 1024,
                  memory_mib=(_rss_kib("VmHWM") - base) / 1024, peak_mib=_rss_kib("VmHWM") / 1024,
                  trainable=sum(p.numel() for p in params), sparsity=args.sparsity if mask is not None else None)
    return result


# ---------------------------------------------------------------------------------------------- driver
def run(method: str, size: str, args, *, repeats: int = 1, **overrides) -> dict:
    """One measurement in `repeats` fresh processes; medians of the timings and memories (all kept)."""
    settings = {key: getattr(args, key) for key in ("batch", "seq", "steps", "warmup", "sparsity", "threads", "vocab", "batches")}
    settings.update(overrides)
    cmd = [sys.executable, __file__, "--worker", "--method", method, "--size", size]
    for key, value in settings.items():
        cmd += [f"--{key}", str(value)]
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        out = subprocess.run(cmd, check=False, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if out.returncode != 0:  # e.g. killed for memory: recorded, the sweep goes on
            return {"size": size, "method": method, "failed": f"exit {out.returncode}: {out.stderr[-1500:]}"}
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        runs[-1]["wall_seconds"] = time.perf_counter() - started
    result = dict(runs[0])
    for key in ("step_seconds", "memory_mib", "peak_mib", "seconds", "wall_seconds"):
        if key in result and len(runs) > 1:
            result[key] = statistics.median(r[key] for r in runs)
            result[f"{key}_all"] = [r[key] for r in runs]
    return result


def _ok(r: dict | None) -> bool:
    return bool(r) and "step_seconds" in r


def ratios(row: dict) -> dict:
    """SAFT against LoRA, full FT and the limit, and LoRA against the limit: fp32 weights, then bf16 (`_bf16` keys)."""
    out = {}
    for suffix, key in (("", ""), ("-bf16", "_bf16")):
        saft, lora, ft, limit = (row.get(m + suffix) for m in ("saft", "lora", "ft", "limit"))
        if _ok(saft) and _ok(lora):
            out[f"saft{key}_time_vs_lora{key}"] = saft["step_seconds"] / lora["step_seconds"]
            out[f"saft{key}_memory_vs_lora{key}"] = saft["memory_mib"] / lora["memory_mib"]
            out[f"saft{key}_peak_vs_lora{key}"] = saft["peak_mib"] / lora["peak_mib"]
        if _ok(saft) and _ok(ft):
            out[f"saft{key}_time_vs_ft{key}"] = saft["step_seconds"] / ft["step_seconds"]
            out[f"saft{key}_memory_vs_ft{key}"] = saft["memory_mib"] / ft["memory_mib"]
        if _ok(saft) and _ok(limit):
            out[f"saft{key}_time_vs_limit{key}"] = saft["step_seconds"] / limit["step_seconds"]
        if _ok(lora) and _ok(limit):
            # The best SAFT/LoRA time any engine can reach: a step cannot cost less than the limit.
            out[f"limit{key}_time_vs_lora{key}"] = limit["step_seconds"] / lora["step_seconds"]
    return out


def part_size(args, report) -> None:
    rows = report.setdefault("size", [])
    for size in args.sizes:
        params = param_count(*parse_size(size), args.vocab)
        row = {"size": size, "params": params}
        for method in args.methods:
            if predicted_gib(method, params) > args.skip_gib:
                row[method] = {"skipped": f"predicted peak {predicted_gib(method, params):.1f} GiB > --skip-gib {args.skip_gib}"}
                continue
            row[method] = run(method, size, args, repeats=args.repeats)
        row["ratios"] = ratios(row)
        row["targets_met"] = {k: row["ratios"][k] <= bound for k, bound in TARGETS.items() if k in row["ratios"]}
        rows.append(row)
        print(f"\n{size} ({params / 1e6:.1f}M parameters)")
        for method in args.methods:
            r = row[method]
            if _ok(r):
                print(f"  {method:<10} step {r['step_seconds']:8.3f}s  memory {r['memory_mib']:9.1f} MiB  "
                      f"peak {r['peak_mib'] / 1024:6.2f} GiB  trainable {r['trainable']}")
            else:
                print(f"  {method:<10} {r.get('skipped') or r.get('failed', '')[:200]}")
        for key, value in row["ratios"].items():
            bound = TARGETS.get(key)
            mark = "" if bound is None else f"  (target <= {bound}: {'met' if value <= bound else 'NOT met'})"
            print(f"  {key:<22} {value:.3f}{mark}", flush=True)


def part_sparsity(args, report) -> None:
    rows = []
    for sparsity in args.sparsities:
        r = run("saft", args.mid_size, args, repeats=args.repeats, sparsity=sparsity)
        rows.append(r)
        if _ok(r):
            print(f"sparsity {sparsity:g} on {args.mid_size}: step {r['step_seconds']:.3f}s  memory {r['memory_mib']:.1f} MiB  "
                  f"trainable {r['trainable']}", flush=True)
    reference = {m: next((row[m] for row in report.get("size", []) if row["size"] == args.mid_size and _ok(row.get(m))), None)
                 for m in ("lora", "ft", "limit")}
    for method, r in reference.items():
        if r is None:
            reference[method] = run(method, args.mid_size, args, repeats=args.repeats)
    report["sparsity"] = {"size": args.mid_size, "rows": rows, "reference": reference}


def part_phase1(args, report) -> None:
    most = max(args.phase1_batches)
    ft = run("ft", args.mid_size, args, steps=most, warmup=1)
    rows = []
    for batches in args.phase1_batches:
        r = run("phase1", args.mid_size, args, batches=batches)
        if "seconds" in r and _ok(ft):
            r["ft_epoch_seconds"] = sum(ft["step_seconds_each"][:batches])
            r["phase1_vs_ft_epoch"] = r["seconds"] / r["ft_epoch_seconds"]
            print(f"phase 1 over {batches:>3} batches: {r['seconds']:7.2f}s, one FT epoch {r['ft_epoch_seconds']:7.2f}s "
                  f"(ratio {r['phase1_vs_ft_epoch']:.2f}), phase-1 memory {r['memory_mib']:.0f} MiB", flush=True)
        rows.append(r)
    report["phase1"] = {"size": args.mid_size, "rows": rows, "ft": ft}


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of y = a + b x."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return my - slope * mx, slope


def part_capacity(args, report) -> None:
    budget_mib = args.budget_gib * 1024
    fits = {}
    for method in args.methods:
        points = [(row["params"], row[method]["peak_mib"]) for row in report.get("size", []) if _ok(row.get(method))]
        if len(points) < 2:
            continue
        intercept, slope = fit_line(points)
        fits[method] = {"intercept_mib": intercept, "bytes_per_param": slope * 2**20, "fitted_params": [p for p, _ in points],
                        "predicted_max_params": int((budget_mib - intercept) / slope)}
    capacity = {"budget_gib": args.budget_gib, "fits": fits, "verified": {}}
    for method in ("saft-bf16", "ft"):
        if not (args.verify and method in fits):
            continue
        size = shape_for(0.95 * fits[method]["predicted_max_params"], args.vocab)
        params = param_count(*parse_size(size), args.vocab)
        r = run(method, size, args, steps=1, warmup=0)  # the peak is reached in the first step
        r["predicted_peak_mib"] = fits[method]["intercept_mib"] + fits[method]["bytes_per_param"] * params / 2**20
        r["within_budget"] = _ok(r) and r["peak_mib"] <= budget_mib
        capacity["verified"][method] = r
        print(f"verify {method} at {size} ({params / 1e9:.2f}B): " + (
            f"peak {r['peak_mib'] / 1024:.2f} GiB (predicted {r['predicted_peak_mib'] / 1024:.2f}), step {r['step_seconds']:.1f}s"
            if _ok(r) else r.get("failed", "")[:300]), flush=True)
    if "saft-bf16" in fits and "ft" in fits:
        capacity["saft_bf16_over_ft_predicted"] = fits["saft-bf16"]["predicted_max_params"] / fits["ft"]["predicted_max_params"]
    verified = capacity["verified"]
    if all(_ok(verified.get(m)) and verified[m]["within_budget"] for m in ("saft-bf16", "ft")):
        capacity["saft_bf16_over_ft_verified"] = verified["saft-bf16"]["params"] / verified["ft"]["params"]
    report["capacity"] = capacity
    print(f"\nlargest model in {args.budget_gib} GiB (linear fit of peak RSS):")
    for method, f in fits.items():
        print(f"  {method:<10} {f['bytes_per_param']:6.2f} B/param + {f['intercept_mib'] / 1024:5.2f} GiB -> "
              f"{f['predicted_max_params'] / 1e9:6.2f}B parameters")
    for key in ("saft_bf16_over_ft_predicted", "saft_bf16_over_ft_verified"):
        if key in capacity:
            print(f"  {key}: {capacity[key]:.1f}x (target >= 4: {'met' if capacity[key] >= 4 else 'NOT met'})")


def part_target(args, report) -> None:
    fits = report.get("capacity", {}).get("fits", {})
    if not all(m in fits for m in ("lora-bf16", "saft-bf16")):
        print("target: needs the capacity fits of lora-bf16 and saft-bf16 (run the size and capacity parts first)")
        return
    largest = min(fits[m]["predicted_max_params"] for m in ("lora-bf16", "saft-bf16"))
    size = shape_for(0.9 * largest, args.vocab)
    row = {"size": size, "params": param_count(*parse_size(size), args.vocab)}
    for method in ("limit-bf16", "lora-bf16", "saft-bf16"):
        row[method] = run(method, size, args, repeats=args.repeats)
    row["ratios"] = ratios(row)
    row["targets_met"] = {k: row["ratios"][k] <= bound for k, bound in TARGETS.items() if k in row["ratios"]}
    report["target"] = row
    print(f"\ntarget: largest model both LoRA-bf16 and SAFT-bf16 fit in {args.budget_gib} GiB: {largest / 1e9:.2f}B; "
          f"measured at {size} ({row['params'] / 1e9:.2f}B)")
    for method in ("limit-bf16", "lora-bf16", "saft-bf16"):
        r = row[method]
        print(f"  {method:<10} " + (f"step {r['step_seconds']:8.3f}s  memory {r['memory_mib']:9.1f} MiB  peak {r['peak_mib'] / 1024:6.2f} GiB"
                                     if _ok(r) else r.get("failed", "")[:300]))
    for key, value in row["ratios"].items():
        bound = TARGETS.get(key)
        mark = "" if bound is None else f"  (target <= {bound}: {'met' if value <= bound else 'NOT met'})"
        print(f"  {key:<30} {value:.3f}{mark}", flush=True)


def plot(report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(12, 8.5))
    rows = report.get("size", [])
    fits = report.get("capacity", {}).get("fits", {})
    for i, method in enumerate(METHODS):
        pts = [(row["params"], row[method]) for row in rows if _ok(row.get(method))]
        if not pts:
            continue
        xs = [p for p, _ in pts]
        ax[0, 0].plot(xs, [r["step_seconds"] for _, r in pts], "o-", color=f"C{i}", label=method)
        ax[0, 1].plot(xs, [r["peak_mib"] / 1024 for _, r in pts], "o", color=f"C{i}", label=method)
        if method in fits:
            f = fits[method]
            top = max(f["predicted_max_params"], *xs)
            grid = [min(xs) * (top / min(xs)) ** (k / 50) for k in range(51)]
            ax[0, 1].plot(grid, [(f["intercept_mib"] + f["bytes_per_param"] * x / 2**20) / 1024 for x in grid], "-",
                          color=f"C{i}", alpha=0.5)
        check = report.get("capacity", {}).get("verified", {}).get(method)
        if _ok(check):
            ax[0, 1].plot([check["params"]], [check["peak_mib"] / 1024], "*", ms=14, color=f"C{i}")
    if "budget_gib" in report.get("capacity", {}):
        ax[0, 1].axhline(report["capacity"]["budget_gib"], color="k", ls="--", lw=1, label="budget")
    ax[0, 0].set(xscale="log", yscale="log", xlabel="parameters", ylabel="step time (s)",
                 title=f"step time, batch {report['settings']['batch']} x {report['settings']['seq']}, sparsity 1e-3")
    ax[0, 1].set(xscale="log", yscale="log", xlabel="parameters", ylabel="peak RSS (GiB)",
                 title="peak memory, linear fits, verification runs (*)")
    for a in ax[0]:
        a.legend(fontsize=8)
    sweep = report.get("sparsity")
    if sweep:
        ok = [r for r in sweep["rows"] if _ok(r)]
        a = ax[1, 0]
        a.plot([r["sparsity"] for r in ok], [r["step_seconds"] for r in ok], "o-", color="C4", label="SAFT step time")
        for method, r in sweep["reference"].items():
            if _ok(r):
                a.axhline(r["step_seconds"], ls=":", color=f"C{METHODS.index(method)}", label=f"{method} step time")
        a.set(xscale="log", xlabel="sparsity", ylabel="step time (s)", title=f"sparsity sweep on {sweep['size']}")
        twin = a.twinx()
        twin.plot([r["sparsity"] for r in ok], [r["memory_mib"] for r in ok], "s--", color="C3", label="SAFT memory")
        twin.set_ylabel("training memory over the model (MiB)", color="C3")
        a.legend(fontsize=8, loc="upper left")
    phase1 = report.get("phase1")
    if phase1:
        ok = [r for r in phase1["rows"] if "ft_epoch_seconds" in r]
        a = ax[1, 1]
        a.plot([r["batches"] for r in ok], [r["seconds"] for r in ok], "o-", label="phase 1 (mask selection)")
        a.plot([r["batches"] for r in ok], [r["ft_epoch_seconds"] for r in ok], "s--", label="one FT epoch")
        a.set(xscale="log", yscale="log", xlabel="batches", ylabel="seconds", title=f"phase 1 vs one FT epoch, {phase1['size']}")
        a.legend(fontsize=8)
    fig.suptitle(f"saftune scale benchmark: {report['machine']}, {report['settings']['threads']} threads", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["size", "sparsity", "phase1", "capacity", "target"],
                        choices=["size", "sparsity", "phase1", "capacity", "target"])
    parser.add_argument("--update", action="store_true", help="add the parts to the results already in --out")
    parser.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES, help="HIDDENxLAYERS shapes of the size part")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--mid-size", default="1024x24", help="model of the sparsity and phase-1 parts")
    parser.add_argument("--sparsities", nargs="+", type=float, default=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1])
    parser.add_argument("--phase1-batches", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    parser.add_argument("--batch", type=int, default=4, help="sequences per batch")
    parser.add_argument("--seq", type=int, default=32, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per measurement (medians reported)")
    parser.add_argument("--sparsity", type=float, default=1e-3)
    parser.add_argument("--batches", type=int, default=1, help="phase-1 batches (worker)")
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--threads", type=int, default=max(1, min(os.cpu_count() or 1, 16)))
    parser.add_argument("--skip-gib", type=float, default=20.0, help="skip a run whose predicted peak RSS passes this")
    parser.add_argument("--budget-gib", type=float, default=22.0, help="capacity budget (a 24 GiB machine, minus the OS)")
    parser.add_argument("--no-verify", dest="verify", action="store_false", help="capacity: predict only, no check runs")
    parser.add_argument("--quick", action="store_true", help="tiny models, few steps: a smoke run")
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.worker:
        print(json.dumps(worker(args)))
        return

    previous = json.loads(args.out.read_text()) if args.update and args.out.exists() else {}
    report = {**previous, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
              "settings": {k: getattr(args, k) for k in ("sizes", "methods", "mid_size", "sparsities", "phase1_batches", "batch",
                                                          "seq", "steps", "warmup", "repeats", "sparsity", "vocab", "threads",
                                                          "skip_gib", "budget_gib", "verify")},
              "targets": TARGETS}
    if previous:  # the settings the earlier parts ran with stay in the JSON
        report["settings"] = previous["settings"]
        report.setdefault("update_settings", []).append({"parts": args.parts, "repeats": args.repeats, "steps": args.steps})
    started = time.perf_counter() - 60 * previous.get("minutes", 0.0)
    for part in args.parts:
        {"size": part_size, "sparsity": part_sparsity, "phase1": part_phase1, "capacity": part_capacity,
         "target": part_target}[part](args, report)
        report["minutes"] = (time.perf_counter() - started) / 60
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")  # after every part: a long run keeps what it has
    plot(report, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')} ({report['minutes']:.1f} min)")


if __name__ == "__main__":
    main()
