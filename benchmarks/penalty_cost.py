"""Per-step cost of the L1 / L2-SP penalty: a per-tensor autograd loop vs `distance_to_anchor` (foreach ops).

Times forward + backward of the penalty alone (no model forward) on a random Llama of SmolLM2-135M's
shape (30 layers, hidden 576, tied embeddings: 272 tensors, 135M values) and on a small one, after the
weights moved away from the anchor. Prints a table; writes nothing.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/penalty_cost.py [--repeats 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch


def loop_penalty(params, anchors, norm: str) -> torch.Tensor:
    """The per-tensor loop saftune used before: one autograd graph per tensor, differences kept for backward."""
    total = 0.0
    for p, a in zip(params, anchors):
        diff = p - a
        total = total + (diff.square().sum() if norm == "l2" else diff.abs().sum())
    return total


def smollm2_shaped(layers: int, hidden: int, intermediate: int, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def time_it(fn, params, repeats: int, device) -> float:
    best = float("inf")
    for _ in range(repeats + 1):  # the first call warms up
        for p in params:
            p.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    from saftune.methods.l2sp import distance_to_anchor

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    shapes = {"smollm2-135m-shaped": (30, 576, 1536, 49152), "small (4 layers, hidden 144)": (4, 144, 288, 4096)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}; best of {args.repeats}")
    print(f"{'model':32} {'tensors':>7} {'values':>11} {'norm':>4} {'loop ms':>9} {'foreach ms':>10} {'speed-up':>8}")
    for label, shape in shapes.items():
        model = smollm2_shaped(*shape).to(device)
        params = [p for _, p in model.named_parameters()]
        anchors = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p), alpha=1e-3)
        for norm in ("l2", "l1"):
            loop = time_it(lambda: loop_penalty(params, anchors, norm), params, args.repeats, device)  # noqa: B023
            grads = [p.grad.clone() for p in params]
            fast = time_it(lambda: distance_to_anchor(params, anchors, norm), params, args.repeats, device)  # noqa: B023
            same = all(torch.allclose(p.grad, g, rtol=1e-5, atol=1e-6) for p, g in zip(params, grads))
            print(f"{label:32} {len(params):7d} {sum(p.numel() for p in params):11,d} {norm:>4} {1e3 * loop:9.1f} "
                  f"{1e3 * fast:10.1f} {loop / fast:7.2f}x{'' if same else '  GRADIENTS DIFFER'}")


if __name__ == "__main__":
    main()
