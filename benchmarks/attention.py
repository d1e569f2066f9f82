"""SAFT step time on an nn.MultiheadAttention transformer (open_clip's text tower shape), with and without
the attention projection kernel.

open_clip builds its towers from `nn.MultiheadAttention`, whose projections are not `nn.Linear` calls. With
the attention kernel (`saftune.sparse.attention`) their selected gradient entries are computed like any
Linear's; without it (the hook path, all sparsify had before) a dense weight gradient is formed for
`in_proj_weight` and `out_proj.weight` and then gathered. Methods, on the same model and batches:
    limit           nothing trained: forward + backward to the activations (the floor of a step)
    ft              full fine-tuning (AdamW on every parameter)
    saft            sparsify(model, mask), attention projections on the kernel
    saft-hook-attn  the same with attention projections on the dense-gradient hook path
The mask is random per tensor (benchmarks/scale.py `random_mask`), sparsity 1e-3. Methods are interleaved
over --rounds in one process (only time is measured) and the median step time per method is reported.

Usage:
    python benchmarks/attention.py                      # width 512, 12 layers, 8 x 77 tokens (about 1 min)
    python benchmarks/attention.py --width 256 --layers 2 --rounds 1 --steps 2
Results: benchmarks/results/attention.json
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

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from scale import random_mask

import saftune
from saftune.sparse import engine

RESULTS = Path(__file__).parent / "results"
METHODS = ["limit", "ft", "saft", "saft-hook-attn"]


class TextTower(nn.Module):
    """Token + position embeddings -> nn.TransformerEncoder (MultiheadAttention inside) -> LayerNorm."""

    def __init__(self, vocab: int, width: int, layers: int, context: int):
        super().__init__()
        self.token = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.randn(context, width) * 0.01)
        layer = nn.TransformerEncoderLayer(width, width // 64, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, ids):
        return self.norm(self.encoder(self.token(ids) + self.position[: ids.shape[1]]))


def _loss(model, ids, labels, prompts):
    text = F.normalize(model(ids).mean(1), dim=-1)
    classes = F.normalize(model(prompts).mean(1), dim=-1)
    return F.cross_entropy(30.0 * text @ classes.T, labels)


def measure(method: str, args, data, prompts) -> float:
    torch.manual_seed(0)
    model = TextTower(args.vocab, args.width, args.layers, args.context).train()
    if method == "limit":
        for p in model.parameters():
            p.requires_grad_(False)
        model.token.register_forward_hook(lambda module, inputs, output: output.requires_grad_())
        params = []
    elif method == "ft":
        params = list(model.parameters())
    else:
        mask = random_mask(model, args.sparsity)
        if method == "saft-hook-attn":  # what sparsify did before the attention kernel existed
            original, engine._attention_projections = engine._attention_projections, lambda model: {}
        try:
            params = saftune.sparsify(model, mask).trainable_parameters()
        finally:
            if method == "saft-hook-attn":
                engine._attention_projections = original
    optimizer = torch.optim.AdamW(params, lr=1e-5) if params else None
    times = []
    for i in range(args.warmup + args.steps):
        ids, labels = data[i % len(data)]
        start = time.perf_counter()
        if optimizer:
            optimizer.zero_grad(set_to_none=True)
        _loss(model, ids, labels, prompts).backward()
        if optimizer:
            optimizer.step()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=49408, help="CLIP's BPE vocabulary")
    parser.add_argument("--context", type=int, default=77)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--sparsity", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method and round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians over rounds)")
    parser.add_argument("--threads", type=int, default=max(1, min(os.cpu_count() or 1, 16)))
    parser.add_argument("--out", type=Path, default=RESULTS / "attention.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, args.vocab, (args.batch, args.context), generator=g), torch.randint(0, 2, (args.batch,), generator=g))
            for _ in range(4)]
    prompts = torch.randint(0, args.vocab, (2, 8), generator=g)
    runs = {m: [] for m in METHODS}
    for round_ in range(args.rounds):
        for method in METHODS:
            runs[method].append(measure(method, args, data, prompts))
            print(f"round {round_ + 1}: {method:<15} {runs[method][-1]:.3f} s/step", flush=True)
    step = {m: statistics.median(v) for m, v in runs.items()}
    ratios = {
        "saft_time_vs_limit": step["saft"] / step["limit"],
        "saft_hook_attn_time_vs_limit": step["saft-hook-attn"] / step["limit"],
        "saft_time_vs_saft_hook_attn": step["saft"] / step["saft-hook-attn"],
        "saft_time_vs_ft": step["saft"] / step["ft"],
    }
    print(f"\nwidth {args.width}, {args.layers} layers, {args.batch} x {args.context} tokens, sparsity {args.sparsity}")
    for method in METHODS:
        print(f"  {method:<15} {step[method]:.3f} s/step  (rounds: {', '.join(f'{t:.3f}' for t in runs[method])})")
    for key, value in ratios.items():
        print(f"  {key:<30} {value:.3f}")
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
              "settings": {k: v for k, v in vars(args).items() if k != "out"}, "step_seconds": step, "runs": runs, "ratios": ratios}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
