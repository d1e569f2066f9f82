"""SAFT beside a quantized base against QLoRA on the same base and SAFT on the bf16 base (issue: quantized base).

Models as in `llm_engine.py`: SmolLM2-135M-Instruct (`smollm2`) and synthetic Llama-shaped `llama:HxL`,
bf16 weights; the quantized base (--scheme) is torchao's weight-only int8 or NF4 of every unshared
nn.Linear (`saftune.sparse.quantized.quantize`; the tied embedding stays bf16). Batches of `--batch` x
`--seq` random tokens, next-token cross entropy. Below, Q is the scheme (int8 or nf4).

Methods:
    saft-Q      SAFT at sparsity 1e-3 (a random mask of exactly d entries in proportion to tensor sizes, the
                kernels' worst case), the quantized weights' entries trained as a sparse side term;
    qlora       PEFT LoRA r=8 on every projection (q, k, v, o, gate, up, down) of the same quantized base;
    saft-bf16   SAFT with the same mask on the bf16 base;
    limit-Q     forward and backward to the activations on the quantized base, nothing trained: the floor.

Parts (--parts):
    step      memory (a fresh process per method, two steps; growth of the peak RSS over the loaded model, and
              the absolute peak) and step time (one process holding every method's model, steps taken in
              turn: ratios immune to the machine's drift). With --separate, each method's memory and time
              come from its own process (models too large for a copy per method in one process); the
              processes run one after another, so the machine's drift enters the time ratios.
    capacity  quantized-base SAFT end to end on --capacity-model: built layer by layer on the quantized base (the
              bf16 model never exists whole), lean phase 1 on one batch, then one step; the peaks of both phases.

Usage:
    python benchmarks/quantized_base.py --quick
    python benchmarks/quantized_base.py --models smollm2 llama:1536x16 --parts step
    python benchmarks/quantized_base.py --scheme nf4 --models llama:4608x40 --checkpointing-modes on --separate
    python benchmarks/quantized_base.py --scheme nf4 --parts capacity --capacity-model llama:5632x64 --capacity-seq 16
Results: --out (default benchmarks/results/quantized_base.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from llm_engine import MAPPED_ENV, Memory, _timed_steps, batches, build, llama_config, loss_fn, run_worker, trainer  # noqa: E402
from llm_engine import prepare as prepare_base  # noqa: E402
from scale import random_mask  # noqa: E402

from saftune.sparse.quantized import scheme_of  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def methods(scheme: str, skip=()) -> list[str]:
    """The compared methods on a `scheme` base, less those named in `skip` ("limit", "qlora", "saft-bf16")."""
    return [m for m in (f"limit-{scheme}", "qlora", f"saft-{scheme}", "saft-bf16") if m.removesuffix(f"-{scheme}") not in skip]


def quantized(model, scheme: str):
    from saftune.sparse.quantized import quantize

    return quantize(model, scheme)


def build_quantized_layer_by_layer(model: str, scheme: str):
    """A synthetic `llama:HxL` whose Linear layers are made, initialised and quantized one at a time."""
    import torch
    from torch import nn
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from saftune.sparse.quantized import quantize

    hidden, layers = (int(v) for v in model.removeprefix("llama:").split("x"))
    config = llama_config(hidden, layers)
    torch.manual_seed(0)
    with torch.device("meta"):
        lm = LlamaForCausalLM(config).to(torch.bfloat16)
    head = lm.get_output_embeddings()  # tied to the input embedding below: never materialised on its own
    for module in lm.modules():
        if module is not head and any(p.is_meta for p in module.parameters(recurse=False)):
            module.to_empty(device="cpu", recurse=False)
            with torch.no_grad():
                for p in module.parameters(recurse=False):
                    p.fill_(1.0) if "norm" in type(module).__name__.lower() else p.normal_(0.0, 0.02)
            if type(module) is nn.Linear:
                quantize(module, scheme)
    lm.model.rotary_emb = LlamaRotaryEmbedding(config=config)
    lm.tie_weights()
    return lm


def prepare(method: str, model, mask):
    """(train_step, trainable tensors) of `method` on `model` (already quantized for the quantized methods):
    llm_engine's LoRA r=8 on every projection for qlora, its limit, and SAFT with `mask`."""
    kind = "lora" if method == "qlora" else "limit" if method.startswith("limit-") else "saft"
    return trainer(kind, prepare_base(kind, model), mask)


def worker(args) -> dict:
    import torch

    import saftune

    torch.set_num_threads(args.threads)
    memory = Memory("cpu")
    start = time.perf_counter()
    capacity = args.method == "capacity"
    model = build_quantized_layer_by_layer(args.model, args.scheme) if capacity else build(args.model, torch.bfloat16)
    mask = None if capacity else random_mask(model, args.sparsity)  # chosen on the bf16 names: the same quantized
    if not capacity and args.method != "saft-bf16" and args.method != "interleaved":
        quantized(model, args.scheme)
    data = batches(model.config.vocab_size, args.batch, args.seq, max(2, args.warmup + args.steps))
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    result = {"model": args.model, "method": args.method, "checkpointing": args.checkpointing,
              "params": sum(p.numel() for p in model.parameters()), "build_seconds": time.perf_counter() - start,
              "tokens_per_step": args.batch * args.seq, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "threads": args.threads, "model_mib": memory.now(), "scheme": args.scheme,
              "quantized_params": sum(p.numel() for p in model.parameters() if scheme_of(p) == args.scheme)}
    if capacity:  # end to end: lean phase 1 on one batch, then one SAFT step with the mask it chose
        base = memory.now()
        memory.reset_peak()
        start = time.perf_counter()
        mask = saftune.select_mask(model, loss_fn, data[:1], sparsity=args.sparsity, lean=True, progress=False)
        result["phase1"] = {"seconds": time.perf_counter() - start, "peak_gib": memory.peak() / 1024,
                            "memory_mib": memory.peak() - base, "selected": mask.num_selected}
        import gc

        gc.collect()
        memory.reset_peak()
        step, _ = prepare(f"saft-{args.scheme}", model, mask)
        times = _timed_steps(step, data, 0, 1)
        result.update(step_seconds=times[0], phase2_peak_gib=memory.peak() / 1024)
        return result
    if args.method == "interleaved":  # every method's model in one process, steps taken in turn
        steppers = {}
        for method in methods(args.scheme, args.skip_methods):
            copy_ = copy.deepcopy(model)
            if method != "saft-bf16":
                quantized(copy_, args.scheme)
            steppers[method] = prepare(method, copy_, mask)[0]
        times = {m: [] for m in steppers}
        for i in range(args.warmup + args.steps):
            for method, step in steppers.items():
                started = time.perf_counter()
                step(data[i % len(data)])
                if i >= args.warmup:
                    times[method].append(time.perf_counter() - started)
        result.update(step_seconds={m: statistics.median(t) for m, t in times.items()}, step_seconds_each=times)
        return result
    base = memory.now()
    result["model_mib"] = base
    memory.reset_peak()
    step, params = prepare(args.method, model, mask)
    times = _timed_steps(step, data, args.warmup, args.steps)
    result.update(step_seconds=statistics.median(times), memory_mib=memory.peak() - base, peak_mib=memory.peak(),
                  trainable=sum(p.numel() for p in params))
    return result


def run(args, env: dict | None = None, **settings) -> dict:
    """One measurement in a fresh process (its JSON line), or the reason it failed; `env` adds to its environment."""
    options = {key: getattr(args, key) for key in ("batch", "seq", "steps", "warmup", "sparsity", "threads", "scheme",
                                                   "skip_methods")}
    options.update(settings)
    return run_worker(__file__, options, settings, env)


def ratios(rows: dict, timing: dict, scheme: str = "int8") -> dict:
    out, saft = {}, f"saft-{scheme}"
    if all(m in rows and "memory_mib" in rows[m] for m in (saft, "qlora")):
        if rows["qlora"]["memory_mib"] > 0:  # in a warm process (the smoke test) a tiny model may not grow the RSS
            out[f"saft_{scheme}_over_qlora_memory"] = rows[saft]["memory_mib"] / rows["qlora"]["memory_mib"]
        out[f"saft_{scheme}_over_qlora_peak"] = rows[saft]["peak_mib"] / rows["qlora"]["peak_mib"]
    if all(m in rows and "peak_mib" in rows[m] for m in (saft, "saft-bf16")):
        out[f"saft_{scheme}_over_saft_bf16_peak"] = rows[saft]["peak_mib"] / rows["saft-bf16"]["peak_mib"]
    seconds = timing.get("step_seconds", {})
    if saft in seconds:
        for other in (m for m in ("qlora", "saft-bf16", f"limit-{scheme}") if m in seconds):
            out[f"saft_{scheme}_over_{other.replace('-', '_')}_time"] = seconds[saft] / seconds[other]
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="llama:256x4", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="saft-int8", help=argparse.SUPPRESS)
    parser.add_argument("--scheme", default="int8", choices=["int8", "nf4"], help="the quantized base")
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", default=["smollm2", "llama:1536x16"])
    parser.add_argument("--parts", nargs="+", default=["step"], choices=["step", "capacity"])
    parser.add_argument("--checkpointing-modes", nargs="+", default=["off"], choices=["off", "on"])
    parser.add_argument("--separate", action="store_true",
                        help="step: memory and time of each method in its own process (models too large for a copy "
                             "per method)")
    parser.add_argument("--skip-methods", nargs="*", default=[], choices=["limit", "qlora", "saft-bf16"],
                        help="step: leave these methods out (the limit, at sizes where each process takes minutes)")
    parser.add_argument("--capacity-model", default="llama:4096x36")
    parser.add_argument("--capacity-seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--sparsity", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--quick", action="store_true", help="smoke run: a tiny model, short sequences")
    parser.add_argument("--update", action="store_true", help="merge into the existing JSON instead of replacing it")
    parser.add_argument("--out", type=Path, default=RESULTS / "quantized_base.json")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.quick:
        args.models, args.seq, args.steps, args.warmup = ["llama:128x2"], 32, 2, 1
    import torch

    report = json.loads(args.out.read_text()) if args.update and args.out.exists() else {}
    report.setdefault("runs", {})
    report["machine"] = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
                         "threads": args.threads, "platform": platform.platform(), "torch": torch.__version__}
    report["settings"] = {k: getattr(args, k) for k in ("batch", "seq", "steps", "warmup", "sparsity")}
    started = time.perf_counter()
    for model in args.models if "step" in args.parts else []:
        for mode in args.checkpointing_modes:
            key = f"step/{model}/checkpointing-{mode}" + ("" if args.scheme == "int8" else f"/{args.scheme}")
            kept = methods(args.scheme, args.skip_methods)
            if args.separate:  # a whole process per method: its memory, and the median of its own steps
                rows = {m: run(args, model=model, method=m, checkpointing=mode == "on") for m in kept}
                timing = {"separate": True, "step_seconds": {m: r["step_seconds"] for m, r in rows.items()
                                                             if "step_seconds" in r}}
            else:
                rows = {m: run(args, model=model, method=m, checkpointing=mode == "on", steps=1, warmup=1) for m in kept}
                timing = run(args, model=model, method="interleaved", checkpointing=mode == "on")
            report["runs"][key] = {"rows": rows, "interleaved": timing, "ratios": ratios(rows, timing, args.scheme)}
            print(key, json.dumps(report["runs"][key]["ratios"]), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1) + "\n")
    if "capacity" in args.parts:
        key = f"capacity/{args.capacity_model}/{args.scheme}/seq-{args.capacity_seq}"
        report["runs"][key] = run(args, model=args.capacity_model, method="capacity", seq=args.capacity_seq, steps=1, warmup=0,
                                       env=MAPPED_ENV)
    report["seconds"] = time.perf_counter() - started + (report.get("seconds", 0) if args.update else 0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out} in {report['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
