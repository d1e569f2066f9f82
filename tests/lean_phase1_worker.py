"""Phase 1 on a tiny Llama one pass and block by block; run by tests/test_blockwise.py under torchrun.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/lean_phase1_worker.py OUT

Each process scores every second of 5 batches (3 and 2: with chunks of one batch the processes have
different numbers of chunks). Rank 0 writes OUT/masks.safetensors: the flat indices of every mask.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(out: Path) -> None:
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    from saftune import distributed, select_mask
    from saftune.models.tiny_lm import tiny_causal_lm

    torch.set_num_threads(1)
    distributed.init_from_env("cpu")
    lm = tiny_causal_lm("llama", layers=3, seed=0)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (3, 10), generator=generator) for _ in range(5)]

    def loss_fn(model, ids):
        logits = model.lm(input_ids=ids, use_cache=False).logits.float()
        return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(1)

    masks = {"onepass": select_mask(lm, loss_fn, batches, sparsity=0.02),
             "lean": select_mask(lm, loss_fn, batches, sparsity=0.02, lean=True),
             "lean-chunked": select_mask(lm, loss_fn, batches, sparsity=0.02, lean=True, chunk_batches=1)}
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_file({f"{kind}/{name}": idx.contiguous() for kind, mask in masks.items() for name, idx in mask.indices.items()},
                  str(out / "masks.safetensors"))
    distributed.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
