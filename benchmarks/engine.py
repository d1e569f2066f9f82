"""Memory and step time of the sparse engine vs the naive dense SAFT recipe, full fine-tuning and LoRA.

Each (model, method) runs in a fresh subprocess, so peak memory is not polluted by an earlier run:
after the model and the batch are loaded, the process resets its peak-RSS counter (Linux
/proc/self/clear_refs), then builds the optimizer and trains; "memory" is peak RSS minus the RSS of the
loaded model. Step time is the median over the timed steps after warm-up. Each measurement runs in
`--repeats` fresh processes and the medians are reported (all values are kept in the JSON).

Methods (same model, same batch, same dual-encoder loss: mean-pooled text vs two class prompts):
    ft        full fine-tuning, AdamW on every parameter
    lora      LoRA r=8 on every nn.Linear (PEFT), AdamW on the adapters
    naive     the published SAFT recipe: dense gradients, dense AdamW, masked gradients, reset after each step
    saft      this engine: value vectors only, sparse gradient kernels, O(d) AdamW state
    limit     nothing trained: forward + backward to the activations only (every weight frozen, the input
              embeddings' output requires grad), the floor of a step that trains something in every layer

Phase 1 (mask selection over E batches) is timed against one epoch of full fine-tuning over the same
E batches.

Usage:
    python benchmarks/engine.py                        # MiniLM (real) and a ~110M synthetic transformer
    python benchmarks/engine.py --models minilm --steps 6
Results: benchmarks/results/engine.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
METHODS = ["ft", "lora", "naive", "saft", "limit"]


# ---------------------------------------------------------------------------------------------- worker
def _rss_kib(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # "5" resets the peak RSS (VmHWM) to the current RSS


def _build(model_name: str):
    import torch
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    if model_name == "minilm":
        from saftune.assets import asset_path

        path = asset_path("minilm")
        model, tokenizer = AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        vocab = tokenizer.vocab_size
    elif model_name == "synthetic-110m":
        model = BertModel(BertConfig(), add_pooling_layer=False)  # BERT-base shape, random weights
        vocab = model.config.vocab_size
    else:
        raise SystemExit(f"unknown model {model_name!r}")
    return model, vocab


def _batches(vocab: int, batch: int, seq: int, count: int):
    import torch

    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(1000, vocab, (2, 6), generator=g)
    data = [(torch.randint(1000, vocab, (batch, seq), generator=g), torch.randint(0, 2, (batch,), generator=g)) for _ in range(count)]
    return prompts, data


def _loss_fn(prompts):
    import torch.nn.functional as F

    def embed(model, ids):
        hidden = model(input_ids=ids).last_hidden_state
        return F.normalize(hidden.mean(1), dim=-1)

    def loss_fn(model, batch):
        ids, labels = batch
        logits = 30.0 * embed(model, ids) @ embed(model, prompts).T
        return F.cross_entropy(logits, labels, reduction="none")

    return loss_fn



def wrap_model(method: str, model):
    """What a method does to the model before the memory baseline: LoRA r=8 on every nn.Linear (PEFT);
    `limit` freezes every weight and makes the input embeddings' output require grad (forward plus
    backward to the activations only: the floor for any method that trains something in every layer)."""
    import torch

    if method == "lora":
        from peft import LoraConfig, get_peft_model

        targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets))
    elif method == "limit":
        for p in model.parameters():
            p.requires_grad_(False)
        model.get_input_embeddings().register_forward_hook(lambda module, inputs, output: output.requires_grad_())
    return model


def make_train_step(method: str, model, loss_fn, mask=None):
    """(train_step(batch), trainable tensors) for ft, lora, limit, naive or saft; AdamW(lr 5e-6, wd 0.1)."""
    import torch

    import saftune

    step_fn = None
    if method == "ft":
        params = list(model.parameters())
    elif method in ("lora", "limit"):
        params = [p for p in model.parameters() if p.requires_grad]
    elif method == "saft":
        params = saftune.sparsify(model, mask).trainable_parameters()
    elif method == "naive":
        keep = {n: mask.boolean(n) for n, _ in model.named_parameters()}
        pretrained = {n: p.detach().clone() for n, p in model.named_parameters()}
        params = list(model.parameters())

        def step_fn():  # mask the dense gradients, step, then reset every unselected entry
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if p.grad is not None:
                        p.grad.mul_(keep[n])
                optimizer.step()
                for n, p in model.named_parameters():
                    p.copy_(torch.where(keep[n], p, pretrained[n]))
    else:
        raise SystemExit(f"unknown method {method!r}")
    optimizer = torch.optim.AdamW(params, lr=5e-6, weight_decay=0.1) if params else None
    step_fn = step_fn or (optimizer.step if optimizer else (lambda: None))

    def train_step(batch):
        if optimizer:
            optimizer.zero_grad(set_to_none=True)
        loss_fn(model, batch).float().mean().backward()
        step_fn()

    return train_step, params


def worker(args) -> dict:
    import torch

    import saftune

    torch.set_num_threads(args.threads)
    model, vocab = _build(args.model)
    prompts, data = _batches(vocab, args.batch, args.seq, max(args.steps, args.epoch_batches))
    loss_fn = _loss_fn(prompts)
    num_params = sum(p.numel() for p in model.parameters())
    result = {"model": args.model, "method": args.method, "params": num_params}

    if args.method == "phase1":
        model.eval()
        _reset_peak()
        base = _rss_kib()
        start = time.perf_counter()
        mask = saftune.select_mask(model, loss_fn, data[: args.epoch_batches], sparsity=args.sparsity, progress=False)
        result["seconds"] = time.perf_counter() - start
        result["memory_mib"] = (_rss_kib("VmHWM") - base) / 1024
        mask.save(args.mask)
        return result

    model = wrap_model(args.method, model)
    model.train()
    base = _rss_kib()
    _reset_peak()
    mask = saftune.SparseMask.load(args.mask) if args.method in ("saft", "naive") else None
    train_step, params = make_train_step(args.method, model, loss_fn, mask)

    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        train_step(data[i % len(data)])
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    result["step_seconds"] = statistics.median(times)
    result["memory_mib"] = (_rss_kib("VmHWM") - base) / 1024
    result["trainable"] = sum(p.numel() for p in params)
    if args.method == "ft":  # one epoch over the phase-1 batches, for the phase-1 comparison
        start = time.perf_counter()
        for batch in data[: args.epoch_batches]:
            train_step(batch)
        result["epoch_seconds"] = time.perf_counter() - start
    return result


# ---------------------------------------------------------------------------------------------- driver
def run_worker(method: str, model: str, args, mask: Path) -> dict:
    """Run one measurement `args.repeats` times, each in a fresh process; report the medians.

    Peak RSS varies by several percent between identical runs (allocator and thread-pool state), so a
    single run can land on either side of a target; the median of fresh processes is stable.
    """
    cmd = [sys.executable, __file__, "--worker", "--method", method, "--model", model, "--mask", str(mask)]
    for key in ("batch", "seq", "steps", "warmup", "sparsity", "threads", "epoch_batches"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    runs = []
    for _ in range(1 if method == "phase1" else args.repeats):  # phase 1 also writes the mask: once
        out = subprocess.run(cmd, check=False, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if out.returncode != 0:
            raise SystemExit(f"{model}/{method} failed:\n{out.stderr[-3000:]}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    result = dict(runs[0])
    for key in ("step_seconds", "memory_mib", "epoch_seconds", "seconds"):
        if key in result:
            values = [r[key] for r in runs]
            result[key] = statistics.median(values)
            result[f"{key}_all"] = values
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["minilm", "synthetic-110m"], help="models to measure")
    parser.add_argument("--batch", type=int, default=8, help="sequences per batch")
    parser.add_argument("--seq", type=int, default=32, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--sparsity", type=float, default=1e-3, help="SAFT sparsity")
    parser.add_argument("--epoch-batches", type=int, default=8, help="batches in the phase-1 'epoch'")
    parser.add_argument("--threads", type=int, default=torch_threads(), help="torch threads")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per measurement (medians are reported)")
    parser.add_argument("--out", type=Path, default=RESULTS / "engine.json", help="where to write the JSON results")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--mask", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return

    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "settings": {k: getattr(args, k) for k in ("batch", "seq", "steps", "warmup", "sparsity", "threads", "epoch_batches",
                                                    "repeats")},
        "models": {},
    }
    for model in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            mask = Path(tmp) / "mask.safetensors"
            rows = {"phase1": run_worker("phase1", model, args, mask)}
            for method in METHODS:
                rows[method] = run_worker(method, model, args, mask)
                print(f"  {model:<15} {method:<6} step {rows[method]['step_seconds']:.3f}s  memory {rows[method]['memory_mib']:8.1f} MiB", flush=True)
        ft, lora, saft, naive = rows["ft"], rows["lora"], rows["saft"], rows["naive"]
        ratios = {
            "saft_memory_vs_ft": saft["memory_mib"] / ft["memory_mib"],
            "saft_memory_vs_lora": saft["memory_mib"] / lora["memory_mib"],
            "saft_memory_vs_naive": saft["memory_mib"] / naive["memory_mib"],
            "saft_time_vs_ft": saft["step_seconds"] / ft["step_seconds"],
            "saft_time_vs_lora": saft["step_seconds"] / lora["step_seconds"],
            "saft_time_vs_naive": saft["step_seconds"] / naive["step_seconds"],
            "saft_time_vs_limit": saft["step_seconds"] / rows["limit"]["step_seconds"],
            "lora_time_vs_limit": lora["step_seconds"] / rows["limit"]["step_seconds"],
            "phase1_time_vs_ft_epoch": rows["phase1"]["seconds"] / ft["epoch_seconds"],
        }
        report["models"][model] = {"runs": rows, "ratios": ratios}
        print(f"\n{model}: {ft['params'] / 1e6:.1f}M parameters, SAFT trains {saft['trainable']} values")
        print(f"  {'method':<7} {'step (s)':>9} {'memory (MiB)':>13} {'mem range':>11} {'trainable':>11}")
        for method in METHODS:
            r = rows[method]
            spread = f"{min(r['memory_mib_all']):.0f}-{max(r['memory_mib_all']):.0f}"
            print(f"  {method:<7} {r['step_seconds']:>9.3f} {r['memory_mib']:>13.1f} {spread:>11} {r['trainable']:>11d}")
        print(f"  phase 1: {rows['phase1']['seconds']:.2f}s for {args.epoch_batches} batches "
              f"(one FT epoch {ft['epoch_seconds']:.2f}s), phase-1 memory {rows['phase1']['memory_mib']:.1f} MiB")
        for key, value in ratios.items():
            print(f"  {key:<26} {value:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


def torch_threads() -> int:
    return max(1, min(os.cpu_count() or 1, 16))


if __name__ == "__main__":
    main()
