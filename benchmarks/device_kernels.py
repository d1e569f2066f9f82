"""The engine's gradients and phase 1 on an accelerator, checked against the CPU's on a small causal LM.

On CUDA the selected-entry kernels run their dot products as cuSPARSE's sampled product, or, with
`--dots`, as the chunked gather-multiply-sum or one TF32 product (the CPU's path is torch's own
`sampled_addmm` loop), and phase 1 runs its backward there too. On a Llama-shaped model with tied
embeddings (every fast path: q/k/v/o and gate/up/down through the Linear kernel, the tied embedding
through the embedding kernel, RMSNorm through the per-tensor path), with and without gradient
checkpointing, this compares:
    grad-fp32   the selected entries' gradients on the device against the CPU's, both fp32 weights;
    grad-bf16   the same with bf16 weights on the device (fp32 master values) against the CPU's fp32;
    phase1      the one-pass and the lean (block by block) masks on the device: identical sets, as on the
                CPU; and their overlap with the CPU's mask (scores differ in the last bits across devices,
                which can swap entries tied at the threshold).
It exits 1 when a check fails. With `--device cpu` it checks the CPU's chunked path (forced) against
`sampled_addmm` instead, so the script itself runs anywhere.

Usage:
    python benchmarks/device_kernels.py --device cuda    # a few seconds; prints one JSON line per check
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from llm_engine import llama_config, loss_fn  # noqa: E402
from scale import random_mask  # noqa: E402

TOLERANCE = {"grad-fp32": 1e-4, "grad-bf16": 0.05}  # relative error of the gradient vector (L2 norms)


def selected_grads(model, mask, ids, checkpointing: bool) -> list:
    """The selected entries' gradients after one backward of the mean next-token loss, as fp32 on the CPU."""
    import saftune

    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    values = saftune.sparsify(model, mask).trainable_parameters()
    loss_fn(model, ids.to(next(model.parameters()).device)).mean().backward()
    return [v.grad.float().cpu() for v in values]


def relative_error(got: list, want: list) -> float:
    import torch

    got, want = torch.cat([g.reshape(-1) for g in got]), torch.cat([w.reshape(-1) for w in want])
    return float((got - want).norm() / want.norm())


def main(argv=None) -> int:
    import torch
    from transformers import LlamaForCausalLM

    from saftune import select_mask
    from saftune.sparse import kernels

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="256x4", help="hidden x layers of the Llama-shaped model")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--sparsity", type=float, default=1e-2)
    parser.add_argument("--dots", default=kernels._DEVICE_DOTS, choices=["gather", "sddmm", "dense"],
                        help="how the device computes the selected entries' dot products (the CPU's own path is unchanged)")
    args = parser.parse_args(argv)
    kernels._DEVICE_DOTS = args.dots
    hidden, layers = (int(v) for v in args.model.split("x"))
    torch.manual_seed(0)
    reference = LlamaForCausalLM(llama_config(hidden, layers, vocab=args.vocab)).float()
    ids = torch.randint(0, args.vocab, (4, 128), generator=torch.Generator().manual_seed(0))
    mask = random_mask(reference, args.sparsity)
    failed = False

    def report(row: dict) -> None:
        nonlocal failed
        failed |= not row["ok"]
        print(json.dumps(row), flush=True)

    for checkpointing in (False, True):
        want = selected_grads(copy.deepcopy(reference), mask, ids, checkpointing)
        for check, dtype in (("grad-fp32", torch.float32), ("grad-bf16", torch.bfloat16)):
            model = copy.deepcopy(reference).to(args.device, dtype)
            if args.device == "cpu":  # the GPU's path, forced: the chunked gather-multiply-sum
                kernels._sampled_addmm_ok, saved = (lambda a: False), kernels._sampled_addmm_ok
            try:
                got = selected_grads(model, mask, ids, checkpointing)
            finally:
                if args.device == "cpu":
                    kernels._sampled_addmm_ok = saved
            error = relative_error(got, want)
            report({"check": check, "device": args.device, "dots": args.dots, "checkpointing": checkpointing, "relative_error": error,
                    "tolerance": TOLERANCE[check], "ok": error <= TOLERANCE[check]})

    batches = [ids[i : i + 2] for i in range(0, 4, 2)]
    cpu_mask = select_mask(copy.deepcopy(reference), loss_fn, batches, sparsity=args.sparsity, progress=False)
    device_model = copy.deepcopy(reference).to(args.device)
    on_device = [b.to(args.device) for b in batches]
    masks = {lean: select_mask(device_model, loss_fn, on_device, sparsity=args.sparsity, lean=lean, progress=False)
             for lean in (False, True)}

    def entries(m) -> set:
        return {(name, int(i)) for name, idx in m.indices.items() for i in idx}

    one_pass, lean, cpu = entries(masks[False]), entries(masks[True]), entries(cpu_mask)
    overlap = len(one_pass & cpu) / max(1, len(cpu))
    report({"check": "phase1", "device": args.device, "selected": len(one_pass), "lean_equals_one_pass": lean == one_pass,
            "overlap_with_cpu": overlap, "ok": lean == one_pass and overlap >= 0.99})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
