"""A one-entry cache that lasts one backward pass.

A decoder layer's q, k and v projections read one input, and so do gate and up: their kernels' backward
calls come one after another, so the first one's recomputed input (`saftune.sparse.replay`) or widened
copy (`saftune.sparse.kernels.shared_copy`) serves the others. Such an entry must not outlive the
backward pass that made it: kept through the optimizer step into the next forward, it would add a
layer's input (and its copy) to the forward's peak, which is the step's peak without checkpointing.

Example:
    >>> cache = BackwardCache()
    >>> x = torch.ones(3, requires_grad=True)
    >>> class Twice(torch.autograd.Function):
    ...     @staticmethod
    ...     def forward(ctx, a):
    ...         return a * 2
    ...     @staticmethod
    ...     def backward(ctx, grad):
    ...         cache.put("made in this backward")
    ...         return grad * 2
    >>> Twice.apply(x).sum().backward()
    >>> cache.get() is None  # dropped when that backward pass ended
    True
"""

from __future__ import annotations

import threading

import torch


def _graph_task() -> int:
    """The id of the backward pass running in this thread, -1 outside one."""
    try:
        return torch._C._current_graph_task_id()
    except AttributeError:  # the private query moved: entries then last until replaced, as outside a backward
        return -1


class BackwardCache:
    """One entry per thread; an entry put during a backward pass is dropped when that pass ends."""

    def __init__(self):
        self._entries: dict[int, tuple[int, object]] = {}  # thread -> (backward pass id or -1, entry)

    def get(self):
        """The entry this thread put last, or None."""
        slot = self._entries.get(threading.get_ident())
        return None if slot is None else slot[1]

    def put(self, entry) -> None:
        """Keep `entry` (replacing the last one) until the next `put`, or the end of the current backward pass."""
        thread, task = threading.get_ident(), _graph_task()
        previous = self._entries.get(thread)
        self._entries[thread] = (task, entry)
        if task != -1 and (previous is None or previous[0] != task):  # once per backward pass
            # Autograd runs queued callbacks when the pass ends, possibly in another thread (a device's):
            # the callback names the thread whose entry it drops.
            torch.autograd.Variable._execution_engine.queue_callback(lambda: self._drop(thread, task))

    def _drop(self, thread: int, task: int) -> None:
        slot = self._entries.get(thread)
        if slot is not None and slot[0] == task:
            del self._entries[thread]
