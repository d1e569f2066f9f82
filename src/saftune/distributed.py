"""Data-parallel training over `torch.distributed` (torchrun), with O(d) communication for SAFT.

Every process holds the whole model and runs the same steps. Each global micro-batch is split across
the processes (process r takes examples r, r + W, r + 2W, ...); each scales its loss by its share of
the examples, so the *sum* of the processes' gradients is exactly the gradient of the global batch.
After the backward passes of a step the gradients of the trainable tensors are summed with one
all-reduce per bucket, then every process takes the same optimizer step. A loss that couples the
examples of a batch (FLYP's contrastive loss) is instead computed over the whole global micro-batch in
every process, from rows gathered with `gather_rows`, and weighted 1: each process's backward reaches
only its own rows, so the sum of the gradients is again the global batch's.

Why not `DistributedDataParallel`: DDP reduces the dense gradients of the module's own parameters,
but SAFT's trainable tensors are the value vectors that live *beside* the module (the module's
weights are frozen). Reducing the trainable tensors directly gives SAFT its advantage for free: a
step all-reduces d numbers (about 0.1% of D), full fine-tuning all D.

Phase 1 shards the scoring batches the same way and all-reduces the summed gradients once, so every
process selects the same mask as a single process would.

Launch:
    torchrun --nproc-per-node 2 -m saftune.cli train --method saft ...

Example (a single process: everything is the identity):
    >>> world_size(), rank(), is_main()
    (1, 0, True)
    >>> list(shard(range(5)))
    [0, 1, 2, 3, 4]
    >>> gather_rows(torch.ones(2, 3)).shape
    torch.Size([2, 3])
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# Gradients are all-reduced in flat buckets of at most this many elements: few calls, bounded memory.
BUCKET_ELEMENTS = 1 << 24


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """The process that writes files (logs, checkpoints, results); rank 0."""
    return rank() == 0


# `accelerate launch --cpu` starts several processes only through MPI (`--mpirun_hostfile`), which names them in its
# own variables (Open MPI, MPICH / Intel MPI, MVAPICH2), not torchrun's; accelerate reads those, and so does saftune.
_MPI_VARIABLES = {
    "WORLD_SIZE": ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"),
    "RANK": ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK"),
    "LOCAL_RANK": ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK"),
}


def _launcher_env() -> dict[str, str]:
    """WORLD_SIZE, RANK and LOCAL_RANK as torchrun sets them, or read from MPI's variables when only those are set."""
    if "WORLD_SIZE" in os.environ:
        return {key: os.environ[key] for key in _MPI_VARIABLES if key in os.environ}
    found = {key: next((os.environ[n] for n in names if n in os.environ), None) for key, names in _MPI_VARIABLES.items()}
    return {key: value for key, value in found.items() if value is not None}


def launched() -> bool:
    """True when torchrun, accelerate launch (or MPI) started this process as one of several."""
    return int(_launcher_env().get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str = "auto", timeout_minutes: int = 120) -> torch.device | None:
    """Join the process group torchrun describes in the environment; return this process's device.

    `accelerate launch` sets the same variables (through torchrun, or MPI's with `--cpu --mpirun_hostfile`).
    Returns None (and does nothing) outside such a launch. NCCL on CUDA, gloo on CPU. The generous timeout
    covers the slowest collective wait: a process waiting while the others finish an evaluation.
    """
    if not launched():
        if os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_PORT" in os.environ:
            logger.warning("accelerate launch --cpu started one process, which trains alone: accelerate starts several CPU "
                           "processes only through MPI (--mpirun_hostfile). For N CPU processes use `accelerate launch "
                           "--multi_gpu --num_processes N` (torchrun; gloo on CPU) or `torchrun --nproc-per-node N`.")
        return None
    if "WORLD_SIZE" not in os.environ:  # started by MPI: init_process_group reads torchrun's variables
        missing = [key for key in ("MASTER_ADDR", "MASTER_PORT") if key not in os.environ]
        if missing:
            raise RuntimeError(f"started by MPI without {' and '.join(missing)}: set them to rank 0's address and a free "
                               "port (accelerate launch sets them), or launch with torchrun")
        os.environ.update(_launcher_env())
    use_cuda = torch.cuda.is_available() and not str(device).startswith("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
    logger.info("process %d of %d (%s)", dist.get_rank(), dist.get_world_size(), "cuda" if use_cuda else "cpu")
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def shard(items: Iterable) -> Iterator:
    """This process's share of a sequence that every process iterates alike: items r, r + W, ..."""
    w, r = world_size(), rank()
    for i, item in enumerate(items):
        if i % w == r:
            yield item


def unsharded_index(i: int) -> int:
    """Where this process's i-th item of `shard(items)` stands in `items`: r + W * i."""
    return rank() + world_size() * i


def _device_of(tensors: Sequence[torch.Tensor]) -> torch.device:
    # NCCL only reduces CUDA tensors; gloo reduces CPU (and CUDA) tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return tensors[0].device if tensors else torch.device("cpu")


def all_reduce_(tensors: Sequence[torch.Tensor], bucket_elements: int = BUCKET_ELEMENTS) -> int:
    """Sum `tensors` in place across the processes, in flat buckets; returns the bytes reduced.

    Every process must pass tensors of the same shapes, dtypes and order.
    """
    if not is_distributed() or not tensors:
        return 0
    sent = 0
    bucket: list[torch.Tensor] = []

    def flush() -> None:
        nonlocal sent
        if not bucket:
            return
        flat = torch.cat([t.reshape(-1) for t in bucket]).to(_device_of(bucket))
        dist.all_reduce(flat)
        sent += flat.numel() * flat.element_size()
        offset = 0
        for t in bucket:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        bucket.clear()

    size, dtype = 0, None
    for t in tensors:
        if bucket and (size + t.numel() > bucket_elements or t.dtype != dtype):
            flush()
            size = 0
        bucket.append(t)
        size, dtype = size + t.numel(), t.dtype
    flush()
    return sent


def all_reduce_gradients(params: Sequence[torch.Tensor]) -> int:
    """Sum the `.grad` of the trainable tensors across processes; returns the bytes reduced.

    A tensor without a gradient in every process keeps `grad=None` (the optimizer skips it, as in a
    single process); one with a gradient somewhere gets zeros where it had none, then the sum.
    """
    if not is_distributed():
        return 0
    device = _device_of(params)
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(has_grad)
    grads = []
    for p, flag in zip(params, has_grad.tolist()):
        if flag and p.grad is None:
            p.grad = torch.zeros_like(p)
        if flag:
            grads.append(p.grad)
    return all_reduce_(grads)


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Every process's rows of `local` [n_r, ...], concatenated in rank order; `local` itself in one process.

    For losses that couple the examples of a batch (a contrastive loss takes its negatives from the
    whole global batch). The row counts may differ between processes, zero included (the other
    dimensions and the dtype may not). The gradient flows back only into this process's own rows, the
    others' are constants: each process backpropagates through its own examples, so the sum of the
    processes' gradients of the same global loss is that loss's gradient.
    """
    if not is_distributed():
        return local
    device = _device_of([local])
    counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world_size())]
    dist.all_gather(counts, torch.tensor([len(local)], device=device))
    counts = [int(c) for c in counts]
    if max(counts) == 0:
        return local
    # all_gather needs tensors of one shape: pad every process's rows to the most any process has
    padded = local.new_zeros((max(counts), *local.shape[1:]), device=device)
    padded[: len(local)] = local.detach()
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    rows = [part[:count].to(local.device) for part, count in zip(parts, counts)]
    rows[rank()] = local
    return torch.cat(rows)


def gather_objects(obj) -> list:
    """Every process's `obj` (small picklable values: loss terms, flags), in rank order."""
    if not is_distributed():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def any_process(flag: bool) -> bool:
    """True when `flag` is true in any process (e.g. a Ctrl-C that reached only one of them)."""
    if not is_distributed():
        return flag
    return any(gather_objects(bool(flag)))


def forwards_are_collective(model: torch.nn.Module) -> bool:
    """True when a forward of `model` is a collective (FSDP-sharded units all-gather their weights first):
    every process must then run as many forwards as the others, or they wait for it forever."""
    if not is_distributed():
        return False
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # no FSDP2 in this torch: nothing can be sharded with it
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown(wait: bool = True) -> None:
    """Leave the process group (a gloo group still alive at interpreter exit can abort the process).

    Args:
        wait: first wait for the other processes (not after an error: they may be gone).
    """
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()
