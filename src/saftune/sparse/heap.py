"""Hand freed heap memory back to the system, where glibc would keep it resident.

torch's CPU tensors come from malloc. glibc serves those under its mmap threshold (which rises to 32 MiB
as large tensors are freed) from the heap, and keeps freed heap pages resident until the heap's top is
free. With gradient checkpointing the forward pass frees almost all it allocates, yet each layer's
large temporaries went on top of the heap rather than into the blocks the layer before had freed: on a
113M-parameter Llama-shaped model in fp32 SAFT's heap spanned 260–264 MiB at the end of the forward pass
with 30 MiB of it in use (an allocation trace of three steps; the frozen model's forward and backward,
the same 30 MiB, spanned 205). `malloc_trim(0)` returns every free page in the heap, in 11–13 ms there.
`benchmarks/heap_release.py`, SAFT with and without it in alternating processes (SmolLM2 and that model,
fp32 and bf16, checkpointing on): peak RSS over the loaded model 0.64–0.87x. Its time is the call (6–28 ms)
plus a page fault (~2 µs) for each handed-back page the backward pass touches again: counted, ~3–5% of
an fp32 step and ~0.5% of a bf16 one, below what timing resolves on this machine.

`release_free_heap` is that call; `ReleaseAfterCheckpointedForward` makes it once per checkpointed
training step, when the checkpointed blocks' forward pass has returned and before the backward pass
recomputes them; `release_after_checkpointed_forward(model)` hooks it where it belongs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None under another C library (musl, macOS, Windows), which has none."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_heap() -> bool:
    """Return the heap's free pages to the system (glibc); False where the C library has no such call.

    Example:
        >>> isinstance(release_free_heap(), bool)
        True
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class ReleaseAfterCheckpointedForward:
    """Forward hook for a module that checkpoints its blocks (Hugging Face's `gradient_checkpointing`):
    release the free heap when its training forward pass returns, before the backward pass recomputes.

    Only then is it worth its time: with checkpointing on, the forward pass has freed its activations; in
    grad mode a backward pass follows; on the CPU the memory is malloc's. Without checkpointing the
    activations are still held at that point, so there is little to give back. `releases` counts the calls.

    Example:
        >>> stack = nn.Linear(2, 2).train()
        >>> stack.gradient_checkpointing = True
        >>> release = ReleaseAfterCheckpointedForward()
        >>> handle = stack.register_forward_hook(release)
        >>> _ = stack(torch.ones(1, 2)); release.releases == int(_malloc_trim() is not None)
        True
        >>> with torch.no_grad():
        ...     _ = stack(torch.ones(1, 2))
        >>> release.releases == int(_malloc_trim() is not None)
        True
    """

    def __init__(self):
        self.releases = 0

    def __call__(self, module: nn.Module, inputs, output) -> None:
        if getattr(module, "gradient_checkpointing", False) is True and module.training and torch.is_grad_enabled():
            first = next(module.parameters(), None)
            if first is not None and first.device.type == "cpu":
                self.releases += release_free_heap()


def checkpointing_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of `model` that switch gradient checkpointing (transformers sets a bool
    `gradient_checkpointing` on the stack and on each of its layers)."""
    return [m for m in model.modules() if isinstance(getattr(m, "gradient_checkpointing", None), bool)]


def release_after_checkpointed_forward(model: nn.Module) -> list[RemovableHandle]:
    """Hook one `ReleaseAfterCheckpointedForward` on each outermost checkpointing module of `model`: the
    stack (the root itself when it is the stack), not its layers, whose forward runs again in the backward
    pass. Returns the hooks' handles.

    Example:
        >>> stack = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        >>> stack.gradient_checkpointing = stack[1].gradient_checkpointing = False
        >>> [h.id in stack._forward_hooks for h in release_after_checkpointed_forward(stack)]
        [True]
    """
    names = {id(m): name for name, m in model.named_modules()}
    marked = checkpointing_modules(model)

    def inside(module: nn.Module, outer: nn.Module) -> bool:
        return outer is not module and (names[id(outer)] == "" or names[id(module)].startswith(names[id(outer)] + "."))

    release = ReleaseAfterCheckpointedForward()
    return [m.register_forward_hook(release) for m in marked if not any(inside(m, o) for o in marked)]
