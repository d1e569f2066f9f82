"""The sparse engine on causal LMs: step time and memory, and phase 1 one pass vs block by block.

Models: SmolLM2-135M-Instruct (the real model of the LLM track, `--models smollm2`) and synthetic
Llama-shaped models `llama:HxL` (random weights; hidden H, L layers, SwiGLU MLP of width 8H/3 rounded
to 64, H/64 query heads and about a third as many key/value heads (grouped-query attention: the largest
divisor of the head count up to a third, 3 of 9 as in SmolLM2),
RMSNorm, rotary positions, SmolLM2's 49152-token vocabulary with tied input and output embeddings).
Batches of `--batch` sequences of `--seq` random tokens (default 1 x 512); the loss is next-token cross
entropy over every position. Every measurement runs in a fresh process, which resets its peak RSS
after the model and the batches are loaded; memory = peak RSS growth over the loaded model, two ways
(`--memory-ways`):
    rss     with glibc's default allocator, as a user's process runs: its peak also holds memory that
            glibc kept after tensors were freed;
    mapped  with every block of 1 MiB or more mapped on its own and returned when freed
            (MALLOC_MMAP_THRESHOLD_=1 MiB): the peak of what the tensors held, what the method needs.
The limit's memory over LoRA's is reported beside SAFT's: no method can go below the limit.

Parts (--parts):
    step    per model, dtype (fp32, bf16) and gradient checkpointing (off, on): memory (a fresh process
            per method and memory way, two steps) and step time (one process holding a copy of the model per method,
            their steps taken in turn, --warmup rounds then the median of --steps rounds; SAFT / limit also
            as the median of each round's own ratio, "paired", which a drift between rounds cancels; SAFT
            without its heap release there, which would hand the next method's free pages back too and
            charge it the page faults: benchmarks/heap_release.py times the release apart) of
              ft     full fine-tuning, AdamW (with bf16 weights: bf16 weights and optimizer state);
              lora   PEFT LoRA r=8 on every linear projection (q, k, v, o, gate, up, down; fp32 adapters);
              saft   the engine at sparsity 1e-3 with a random mask of exactly d entries spread over the
                     tensors in proportion to their sizes (the kernels' worst case), fp32 master values;
              saft-kept  (with --kept-inputs) the same, keeping every projection's input for the backward
                     instead of recomputing it from its producers' saved tensors (`saftune.sparse.replay`);
              saft-norms-hooked  (with --per-tensor-norms) the same, with RMSNorm scales on the per-tensor
                     path instead of their kernel (`saftune.sparse.norms`), which keeps each norm's input;
              saft-heap-kept  (with --heap-variants; memory only) the same without the engine's release of
                     glibc's free heap pages after a checkpointed forward pass (`saftune.sparse.heap`);
              limit-heap-released, lora-heap-released  (with --heap-variants; memory only) the limit and
                     LoRA with that same release added, which neither does by itself;
              limit  forward and backward to the activations, nothing trained: the floor of any method.
    capacity  SAFT end to end (lean phase 1 on one batch, then one step) on --capacity-model with bf16
            weights at --capacity-seq tokens: the absolute peak of each phase, what must fit the machine.
    phase1  per model, dtype and checkpointing, in one process each: phase 1 (`select_mask`, grad score)
            over --batches batches, then --steps SAFT steps with the mask it chose; peak memory of each
            phase apart (the peak is reset between them), for the one-pass phase 1 and the lean one
            (`lean=True`). Phase 1 runs in eval mode, where transformers does not checkpoint: the
            setting applies to phase 2. Another process times one full fine-tuning epoch over the same
            batches (without checkpointing, the faster), the reference for phase 1's time; with
            --checkpointed-epoch, another one with checkpointing: the lean phase 1 keeps only the blocks'
            boundaries and recomputes each block's forward, as a checkpointed epoch does.

Usage:
    python benchmarks/llm_engine.py --quick                                  # smoke run, ~1 min
    python benchmarks/llm_engine.py --models smollm2 llama:768x12 --parts step phase1
Results: --out (default benchmarks/results/llm_engine.json; --update merges into it) and the same name .png
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
from engine import _reset_peak, _rss_kib  # noqa: E402
from scale import random_mask  # noqa: E402

RESULTS = Path(__file__).parent / "results"
VOCAB = 49152
STEP_METHODS = ["limit", "lora", "saft", "ft"]
# saft-kept: the engine keeping every projection input (no replay); saft-norms-hooked: RMSNorm scales on the
# per-tensor (hook) path instead of their kernel, which keeps each norm's normalised input; saft-heap-kept:
# without the release of glibc's free heap pages after a checkpointed forward pass
SAFT_METHODS = ("saft", "saft-kept", "saft-norms-hooked", "saft-heap-kept")
HEAP_VARIANTS = ("saft-heap-kept", "limit-heap-released", "lora-heap-released")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------------------------------------- models
def llama_config(hidden: int, layers: int, vocab: int = VOCAB):
    from transformers import LlamaConfig

    heads = max(1, hidden // 64)
    kv_heads = max(k for k in range(1, max(1, heads // 3) + 1) if heads % k == 0)  # about a third, dividing heads
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=64 * round(8 * hidden / 3 / 64),
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       head_dim=hidden // heads, max_position_embeddings=2048, tie_word_embeddings=True,
                       rms_norm_eps=1e-5)


def build(model: str, dtype, device: str = "cpu"):
    """The causal LM `model` ("smollm2" or "llama:HxL") with `dtype` weights on `device`.

    A synthetic one is built in `dtype` directly on `device`: initialising a 7B model on the CPU and
    copying it over would cost more than the GPU's whole measurement.
    """
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    if model == "smollm2":
        from saftune.models.causal_lm import load_causal_lm, smollm2_gguf

        return load_causal_lm(smollm2_gguf(), dtype="bfloat16" if dtype == torch.bfloat16 else "float32").lm.to(device)
    if not model.startswith("llama:"):
        raise SystemExit(f"unknown model {model!r}: smollm2 or llama:HxL")
    hidden, layers = (int(v) for v in model.removeprefix("llama:").split("x"))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return LlamaForCausalLM(llama_config(hidden, layers))
    finally:
        torch.set_default_dtype(previous)


def synchronize() -> None:
    """Wait for the GPU's queued work (its kernels run asynchronously), so that a timer reads the step's time."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def batches(vocab: int, batch: int, seq: int, count: int):
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(count)]


def loss_fn(model, ids):
    """Next-token cross entropy per sequence: [B]."""
    import torch.nn.functional as F

    logits = model(input_ids=ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none").mean(1)


# ---------------------------------------------------------------------------------------------- worker
class Memory:
    """Resident memory on the CPU (RSS, MiB), or allocated CUDA memory on a GPU."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def now(self) -> float:
        import torch

        return torch.cuda.memory_allocated() / 2**20 if self.cuda else _rss_kib() / 1024

    def reset_peak(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            _reset_peak()

    def peak(self) -> float:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        return _rss_kib("VmHWM") / 1024


def prepare(method: str, model):
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS))
    if method == "limit":
        for p in model.parameters():
            p.requires_grad_(False)
        model.get_input_embeddings().register_forward_hook(lambda module, inputs, output: output.requires_grad_())
    if method == "ft":
        for p in model.parameters():
            p.requires_grad_(True)
    return model


def trainer(method: str, model, mask=None, release_heap: bool = True):
    """train_step(batch) and the trainable tensors; AdamW (lr 1e-5, no weight decay).

    `release_heap=False` turns the engine's heap release off for SAFT (always off for saft-heap-kept).
    """
    import torch

    import saftune

    if method in SAFT_METHODS:
        from saftune.sparse import engine

        routable = engine.routable
        if method == "saft-norms-hooked":
            engine.routable = lambda module: False  # no norm takes the scale kernel: the per-tensor path
        try:
            release = release_heap and method != "saft-heap-kept"
            params = saftune.sparsify(model, mask, release_heap=release).trainable_parameters()
        finally:
            engine.routable = routable
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0) if params else None

    def step(batch):
        if method in SAFT_METHODS:  # the switch is read in each forward pass: set it for this model's
            from saftune.sparse import replay

            replay.REPLAY_INPUTS = method != "saft-kept"
        if optimizer:
            optimizer.zero_grad(set_to_none=True)
        loss_fn(model, batch).float().mean().backward()
        if optimizer:
            optimizer.step()

    return step, params


def _timed_steps(step, data, warmup: int, steps: int) -> list[float]:
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        step(data[i % len(data)])
        synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def interleaved(model, data, args) -> dict:
    """Step times of every method side by side: one copy of the model each, their steps taken in turn.

    The machine's speed drifts (up to 3x from hour to hour here); taking the methods' steps round by round
    in one process exposes them to the same drift, so their ratios hold even where the times do not.
    """
    import copy

    steppers = {}
    methods = step_methods(args)
    for i, method in enumerate(methods):
        copy_ = model if i == len(methods) - 1 else copy.deepcopy(model)  # the last takes the original: one copy fewer
        mask = random_mask(copy_, args.sparsity) if method in SAFT_METHODS else None
        # Without the heap release: glibc's heap is the process's, so SAFT's release would also hand back the
        # pages the next method's step reuses, and that step would pay their page faults.
        steppers[method] = trainer(method, prepare(method, copy_), mask, release_heap=False)[0]
    times: dict[str, list[float]] = {m: [] for m in steppers}
    for i in range(args.warmup + args.steps):
        for method, step in steppers.items():
            synchronize()
            start = time.perf_counter()
            step(data[i % len(data)])
            synchronize()
            if i >= args.warmup:
                times[method].append(time.perf_counter() - start)
    return {"step_seconds": {m: statistics.median(t) for m, t in times.items()}, "step_seconds_each": times}


def worker(args) -> dict:
    import torch

    import saftune

    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    memory = Memory(args.device)
    start = time.perf_counter()
    model = build(args.model, dtype, args.device)
    data = [b.to(args.device) for b in batches(model.config.vocab_size, args.batch, args.seq,
                                                 max(args.batches, args.warmup + args.steps))]
    result = {"model": args.model, "method": args.method, "dtype": args.dtype, "checkpointing": args.checkpointing,
              "params": sum(p.numel() for p in model.parameters()), "build_seconds": time.perf_counter() - start,
              "tokens_per_step": args.batch * args.seq, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "threads": args.threads, "device": args.device,
              "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # no dropout in these models; train mode turns checkpointing on
    base = memory.now()
    result["model_mib"] = base

    if args.method in ("phase1-onepass", "phase1-lean"):
        memory.reset_peak()
        start = time.perf_counter()
        mask = saftune.select_mask(model, loss_fn, data[: args.batches], sparsity=args.sparsity,
                                   lean=args.method == "phase1-lean", progress=False)
        phase1 = {"seconds": time.perf_counter() - start, "memory_mib": memory.peak() - base,
                  "batches": args.batches, "selected": mask.num_selected}
        import gc

        gc.collect()
        memory.reset_peak()
        step, params = trainer("saft", model, mask)
        times = _timed_steps(step, data, args.warmup, args.steps)
        result.update(phase1=phase1, step_seconds=statistics.median(times), step_seconds_each=times,
                      memory_mib=memory.peak() - base, peak_mib=memory.peak(),
                      trainable=sum(p.numel() for p in params))
        return result
    if args.method == "ft-epoch":  # the reference for phase 1's time: one fine-tuning epoch over the same batches
        model = prepare("ft", model)
        step, params = trainer("ft", model)
        step(data[0])  # AdamW's state exists from here on, as within any epoch
        start = time.perf_counter()
        for batch in data[: args.batches]:
            step(batch)
        result.update(epoch_seconds=time.perf_counter() - start, batches=args.batches)
        return result

    if args.method == "interleaved":
        result.update(interleaved(model, data, args))
        return result
    mask = random_mask(model, args.sparsity) if args.method in SAFT_METHODS else None
    method = args.method.removesuffix("-heap-released")  # the limit or LoRA, with SAFT's heap release added
    model = prepare(method, model)
    base = memory.now()
    memory.reset_peak()
    step, params = trainer(method, model, mask)
    if method != args.method:
        from saftune.sparse.heap import release_after_checkpointed_forward

        release_after_checkpointed_forward(model)  # the engine's own hook, on the stack that checkpoints
    times = _timed_steps(step, data, args.warmup, args.steps)
    result.update(step_seconds=statistics.median(times), step_seconds_each=times,
                  memory_mib=memory.peak() - base, peak_mib=memory.peak(),
                  trainable=sum(p.numel() for p in params))
    return result


# ---------------------------------------------------------------------------------------------- driver
def run(args, env: dict | None = None, **settings) -> dict:
    """One measurement in a fresh process (its JSON line), or the reason it failed; `env` adds to its environment."""
    options = {key: getattr(args, key) for key in ("batch", "seq", "steps", "warmup", "sparsity", "threads", "batches", "device",
                                                   "skip_methods", "kept_inputs", "per_tensor_norms", "heap_variants")}
    options.update(settings)
    return run_worker(__file__, options, settings, env)


# Capacity workers and the "mapped" memory rows fix glibc's mmap threshold at 1 MiB: every larger block is its
# own mapping, given back to the system when freed. By default the threshold rises to 32 MiB as big tensors
# are freed, and freed intermediates below it stay in the heap: building a 16.28B model layer by layer into
# int8 left about 2.1 GiB resident that no tensor held (malloc_trim gave it back).
MAPPED_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}


def run_worker(script: str, options: dict, settings: dict, env: dict | None = None) -> dict:
    """`script --worker` with `options` as flags in a fresh process: its last JSON line, or why it failed."""
    cmd = [sys.executable, script, "--worker"]
    for key, value in options.items():
        flag = f"--{key.replace('_', '-')}"
        if isinstance(value, list):
            cmd += [flag, *map(str, value)]
        elif isinstance(value, bool):
            cmd += [flag] if value else []
        else:
            cmd += [flag, str(value)]
    started = time.perf_counter()
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})})
    if out.returncode != 0:
        return {**settings, "failed": f"exit {out.returncode}: {out.stderr[-1500:]}"}
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = time.perf_counter() - started
    if env:
        result["env"] = env
    print(json.dumps({k: v for k, v in result.items() if k != "step_seconds_each"}), flush=True)
    return result


def step_methods(args) -> list[str]:
    methods = [m for m in STEP_METHODS if m not in args.skip_methods]
    return methods + (["saft-kept"] if args.kept_inputs else []) + (["saft-norms-hooked"] if args.per_tensor_norms else [])


def step_ratios(rows: list[dict], timing: dict | None = None) -> dict:
    by = {r["method"]: r for r in rows if "step_seconds" in r}
    out = {}
    if "saft" in by and "limit" in by:
        out["saft_over_limit_time"] = by["saft"]["step_seconds"] / by["limit"]["step_seconds"]
    each = (timing or {}).get("step_seconds_each", {})
    if "saft" in each and "limit" in each:  # round by round (the two steps of a round a few seconds apart), then the median
        out["saft_over_limit_time_paired"] = statistics.median(s / t for s, t in zip(each["saft"], each["limit"], strict=True))
    if "saft" in by and "lora" in by:
        out["saft_over_lora_time"] = by["saft"]["step_seconds"] / by["lora"]["step_seconds"]
        if "memory_mib" in by["saft"] and "memory_mib" in by["lora"]:
            out["saft_over_lora_memory"] = by["saft"]["memory_mib"] / by["lora"]["memory_mib"]
        if "memory_mapped_mib" in by["saft"] and "memory_mapped_mib" in by["lora"]:
            out["saft_over_lora_memory_mapped"] = by["saft"]["memory_mapped_mib"] / by["lora"]["memory_mapped_mib"]
    if "limit" in by and "lora" in by:  # the floor of the ratio above: the limit trains nothing
        if "memory_mib" in by["limit"] and "memory_mib" in by["lora"]:
            out["limit_over_lora_memory"] = by["limit"]["memory_mib"] / by["lora"]["memory_mib"]
        if "memory_mapped_mib" in by["limit"] and "memory_mapped_mib" in by["lora"]:
            out["limit_over_lora_memory_mapped"] = by["limit"]["memory_mapped_mib"] / by["lora"]["memory_mapped_mib"]
    if "saft" in by and "saft-kept" in by:  # what recomputing the projection inputs saves, and costs
        out["saft_over_saft_kept_time"] = by["saft"]["step_seconds"] / by["saft-kept"]["step_seconds"]
        for key in ("memory_mib", "memory_mapped_mib"):
            if key in by["saft"] and key in by["saft-kept"] and "lora" in by and key in by["lora"]:
                out[f"saft_kept_over_lora_{key.removesuffix('_mib')}"] = by["saft-kept"][key] / by["lora"][key]
    if "saft" in by and "saft-norms-hooked" in by:  # what the norms' scale kernel saves, and costs
        out["saft_over_saft_norms_hooked_time"] = by["saft"]["step_seconds"] / by["saft-norms-hooked"]["step_seconds"]
        each = (timing or {}).get("step_seconds_each", {})
        if "saft-norms-hooked" in each:
            out["saft_over_saft_norms_hooked_time_paired"] = statistics.median(
                a / b for a, b in zip(each["saft"], each["saft-norms-hooked"], strict=True))
        for key in ("memory_mib", "memory_mapped_mib"):
            if key in by["saft"] and key in by["saft-norms-hooked"]:
                out[f"saft_norms_hooked_minus_saft_{key}"] = by["saft-norms-hooked"][key] - by["saft"][key]
    # What the heap release saves SAFT, and the ratios were the limit and LoRA to release as SAFT does.
    pairs = [("saft-heap-kept", "lora"), ("saft", "lora-heap-released"), ("limit-heap-released", "lora-heap-released")]
    for a, b in pairs:
        if "memory_mib" in by.get(a, {}) and "memory_mib" in by.get(b, {}):
            out[f"{a.replace('-', '_')}_over_{b.replace('-', '_')}_memory"] = by[a]["memory_mib"] / by[b]["memory_mib"]
    if "saft" in by and "ft" in by:
        out["saft_over_ft_time"] = by["saft"]["step_seconds"] / by["ft"]["step_seconds"]
        if "memory_mib" in by["saft"] and "memory_mib" in by["ft"]:
            out["saft_over_ft_memory"] = by["saft"]["memory_mib"] / by["ft"]["memory_mib"]
    return out


def phase1_ratios(rows: dict) -> dict:
    out = {}
    for kind in ("onepass", "lean"):
        r = rows.get(f"phase1-{kind}")
        if r and "phase1" in r:
            if r["memory_mib"] > 0:  # in a warm process a tiny model's step may not grow the RSS at all
                out[f"{kind}_phase1_over_phase2_memory"] = r["phase1"]["memory_mib"] / r["memory_mib"]
            out[f"{kind}_phase1_over_phase2_peak"] = (r["model_mib"] + r["phase1"]["memory_mib"]) / (r["model_mib"] + r["memory_mib"])
            if rows.get("ft-epoch", {}).get("epoch_seconds"):
                out[f"{kind}_phase1_over_ft_epoch_time"] = r["phase1"]["seconds"] / rows["ft-epoch"]["epoch_seconds"]
            if rows.get("ft-epoch-checkpointed", {}).get("epoch_seconds"):
                out[f"{kind}_phase1_over_checkpointed_ft_epoch_time"] = (
                    r["phase1"]["seconds"] / rows["ft-epoch-checkpointed"]["epoch_seconds"])
    return out


def plot(report: dict, path: Path) -> None:
    """Left: training memory per method and setting (step time for interleaved timings, which measure no memory);
    right: phase 1's memory, one pass and lean, against phase 2's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = {k.removeprefix("step/"): v for k, v in report["runs"].items() if k.startswith("step/")}
    phase1 = {k.removeprefix("phase1/"): v for k, v in report["runs"].items() if k.startswith("phase1/")}
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    shown = STEP_METHODS + [m for m in SAFT_METHODS[1:] if any(r.get("method") == m for v in steps.values() for r in v["rows"])]
    width = 0.8 / len(shown)
    # Interleaved timings (one process per setting) measure no memory: their bars show the step time instead.
    measured = any("memory_mib" in r for v in steps.values() for r in v["rows"])
    key, scale = ("memory_mib", 1024) if measured else ("step_seconds", 1)
    for j, method in enumerate(shown):
        values = [next((r[key] / scale for r in v["rows"] if r.get("method") == method and key in r), 0)
                  for v in steps.values()]
        left.bar([i + j * width for i in range(len(steps))], values, width, label=method)
        mapped = [next((r["memory_mapped_mib"] / 1024 for r in v["rows"] if r.get("method") == method
                        and "memory_mapped_mib" in r), None) for v in steps.values()]
        points = [(i + j * width, m) for i, m in enumerate(mapped) if m is not None]
        if points:
            left.scatter(*zip(*points), marker="_", s=120, color="black", zorder=3,
                         label="what tensors held (mapped)" if j == 0 else None)
    left.set_xticks([i + 0.4 - width / 2 for i in range(len(steps))],
                    [k.replace("/checkpointing-", "\nckpt ").replace("/", "\n") for k in steps], fontsize=6)
    left.set_ylabel("training memory over the loaded model (GiB): RSS (bars)" if measured else "median step time (s)")
    left.set_title("one step (batch x seq tokens)")
    left.legend()
    kinds = [("phase1-onepass", "phase 1, one pass"), ("phase1-lean", "phase 1, lean"), ("phase2", "phase 2 (SAFT)")]
    for j, (kind, label) in enumerate(kinds):
        values = []
        for v in phase1.values():
            row = v["rows"].get("phase1-lean" if kind == "phase2" else kind, {})
            values.append((row.get("memory_mib", 0) if kind == "phase2" else row.get("phase1", {}).get("memory_mib", 0)) / 1024)
        right.bar([i + j * 0.27 for i in range(len(phase1))], values, 0.27, label=label)
    right.set_xticks([i + 0.27 for i in range(len(phase1))],
                     [k.replace("/checkpointing-", "\nphase 2 ckpt ").replace("/", " ") for k in phase1], fontsize=7)
    right.set_ylabel("memory over the loaded model (GiB)")
    right.set_title("phase 1 against phase 2, same model")
    if phase1:
        right.legend()
    else:
        right.text(0.5, 0.5, "phase 1 not in this run", ha="center", transform=right.transAxes)
    machine = report.get("machine", {})
    fig.suptitle(f"saftune engine on causal LMs ({machine.get('device', 'cpu')}, {machine.get('cpu_capability', '')}, "
                 f"{machine.get('threads', '')} threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="llama:256x4", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="saft", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", default=["smollm2", "llama:768x12"])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--parts", nargs="+", default=["step", "phase1"], choices=["step", "phase1", "capacity"])
    parser.add_argument("--capacity-model", default="llama:4096x36", help="capacity: the model SAFT trains end to end")
    parser.add_argument("--capacity-seq", type=int, default=512, help="capacity: tokens per sequence")
    parser.add_argument("--checkpointing-modes", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--separate", action="store_true",
                        help="step: time each method in its own process (models too large for a copy per method)")
    parser.add_argument("--memory-ways", nargs="*", default=["rss", "mapped"], choices=["rss", "mapped"],
                        help="step: rss (glibc's default allocator) and/or mapped (blocks >= 1 MiB mapped apart: "
                             "what the tensors held), or none (timing only); rss is always taken with --separate "
                             "(the timing process)")
    parser.add_argument("--kept-inputs", action="store_true",
                        help="step: also SAFT keeping every projection input (saft-kept), to show what recomputing them saves")
    parser.add_argument("--per-tensor-norms", action="store_true",
                        help="step: also SAFT with RMSNorm scales on the per-tensor path (saft-norms-hooked)")
    parser.add_argument("--heap-variants", action="store_true",
                        help="step: also the memory of SAFT without its heap release (saft-heap-kept), and of the "
                             "limit and LoRA with it (limit-heap-released, lora-heap-released)")
    parser.add_argument("--skip-methods", nargs="*", default=[], choices=STEP_METHODS,
                        help="step: leave these methods out (full FT beyond what it can train)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batches", type=int, default=4, help="batches phase 1 scores (and the reference epoch trains on)")
    parser.add_argument("--sparsity", type=float, default=1e-3)
    parser.add_argument("--checkpointed-epoch", action="store_true",
                        help="phase1: also time a fine-tuning epoch with gradient checkpointing (the lean phase 1's recomputation)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (memory is then CUDA's allocated memory)")
    parser.add_argument("--quick", action="store_true", help="smoke run: a tiny model, short sequences")
    parser.add_argument("--update", action="store_true", help="merge into the existing JSON instead of replacing it")
    parser.add_argument("--out", type=Path, default=RESULTS / "llm_engine.json")
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot from --out")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.plot_only:
        plot(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
        return
    if args.quick:
        args.models, args.seq, args.steps, args.warmup, args.batches = ["llama:128x4"], 64, 2, 1, 2
    import torch

    report = json.loads(args.out.read_text()) if args.update and args.out.exists() else {}
    report.setdefault("runs", {})
    report["machine"] = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
                         "threads": args.threads, "platform": platform.platform(), "torch": torch.__version__,
                         "device": args.device}
    report["settings"] = {k: getattr(args, k) for k in ("batch", "seq", "steps", "warmup", "batches", "sparsity")}
    started = time.perf_counter()
    for model in args.models if {"step", "phase1"} & set(args.parts) else []:
        for dtype in args.dtypes:
            if "step" in args.parts:
                for mode in args.checkpointing_modes:
                    key = f"step/{model}/{dtype}/checkpointing-{mode}"
                    methods = step_methods(args)
                    if args.separate:  # models too large for a copy per method in one process: time each alone
                        rows = [run(args, model=model, method=m, dtype=dtype, checkpointing=mode == "on") for m in methods]
                        timing = {"separate": True, "step_seconds": {r["method"]: r["step_seconds"] for r in rows
                                                                     if "step_seconds" in r}}
                    else:
                        # memory: a fresh process per method (two steps: AdamW's state exists after the first)
                        rows = [run(args, model=model, method=m, dtype=dtype, checkpointing=mode == "on", steps=1, warmup=1)
                                for m in methods] if "rss" in args.memory_ways else [{"method": m} for m in methods]
                        # time: all methods in one process, step by step in turn
                        timing = run(args, model=model, method="interleaved", dtype=dtype, checkpointing=mode == "on")
                    if "mapped" in args.memory_ways:
                        for r in rows:
                            mapped = run(args, model=model, method=r["method"], dtype=dtype, checkpointing=mode == "on",
                                         steps=1, warmup=1, env=MAPPED_ENV)
                            if "memory_mib" in mapped:
                                r["memory_mapped_mib"] = mapped["memory_mib"]
                    if args.heap_variants and not args.separate:  # RSS only; the release's time is heap_release.py's
                        rows += [run(args, model=model, method=m, dtype=dtype, checkpointing=mode == "on", steps=1, warmup=1)
                                 for m in HEAP_VARIANTS]
                    for r in rows:
                        if r["method"] in timing.get("step_seconds", {}):
                            if "step_seconds" in r:
                                r["step_seconds_alone"] = r["step_seconds"]
                            r["step_seconds"] = timing["step_seconds"][r["method"]]
                    report["runs"][key] = {"rows": rows, "interleaved": timing, "ratios": step_ratios(rows, timing)}
                    print(key, json.dumps(report["runs"][key]["ratios"]), flush=True)
            if "phase1" in args.parts:
                epoch = run(args, model=model, method="ft-epoch", dtype=dtype)  # without checkpointing: the faster epoch
                # With checkpointing: an epoch that recomputes each block's forward, as the lean phase 1 must
                # (it keeps only the blocks' boundaries), the same work in the same order.
                checkpointed = run(args, model=model, method="ft-epoch", dtype=dtype, checkpointing=True) \
                    if args.checkpointed_epoch else None
                for mode in args.checkpointing_modes:  # phase 1 runs in eval mode: checkpointing applies to phase 2
                    key = f"phase1/{model}/{dtype}/checkpointing-{mode}"
                    rows = {m: run(args, model=model, method=m, dtype=dtype, checkpointing=mode == "on")
                            for m in ("phase1-onepass", "phase1-lean")}
                    rows["ft-epoch"] = epoch
                    if checkpointed:
                        rows["ft-epoch-checkpointed"] = checkpointed
                    report["runs"][key] = {"rows": rows, "ratios": phase1_ratios(rows)}
                    print(key, json.dumps(report["runs"][key]["ratios"]), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1) + "\n")
    if "capacity" in args.parts:  # lean phase 1 on one batch, then one SAFT step, bf16 weights: the absolute peaks
        key = f"capacity/{args.capacity_model}/bf16/seq-{args.capacity_seq}"
        row = run(args, model=args.capacity_model, method="phase1-lean", dtype="bf16", seq=args.capacity_seq,
                  batches=1, steps=1, warmup=0, env=MAPPED_ENV)
        if "phase1" in row:
            row["phase1_peak_gib"] = (row["model_mib"] + row["phase1"]["memory_mib"]) / 1024
            row["phase2_peak_gib"] = row["peak_mib"] / 1024
        report["runs"][key] = {"rows": {"phase1-lean": row}}
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    report["seconds"] = time.perf_counter() - started + (report.get("seconds", 0) if args.update else 0)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out} in {report['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
