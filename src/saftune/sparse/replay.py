"""Recompute a layer's input from tensors the autograd graph keeps anyway, instead of saving it.

The Linear kernel needs its input x in the backward pass (dL/dW[r, c] = sum_n dy[n, r] x[n, c]), so by
default it keeps x alive from the forward to the backward, as LoRA does for its A matrix. But in a decoder
layer most projection inputs are products whose factors the graph saves for its own backward:

    RMSNorm        x = weight * (h * rsqrt(mean(h^2) + eps)).to(dtype): the inner product's backward keeps h
                   and the rsqrt, the outer one keeps the weight;
    SwiGLU         x = silu(gate) * up: the product's backward keeps both factors;
    attention      x = sdpa(q, k, v).transpose(1, 2).contiguous().reshape(...): attention keeps its output.

Keeping x as well costs a second copy of what is already there. `input_replay` reads the recipe off x's
producer nodes (products, casts, copies and views, a few levels deep, down to saved tensors) and returns a
function that redoes those operations from the saved tensors in the backward pass: the same operations
on the same values, so the result is bit for bit the forward's x. It only applies where nothing
intercepts saved tensors (no `saved_tensors_hooks`: gradient checkpointing, CPU offloading), since
reading a saved factor would then run those hooks.

Example:
    >>> h = torch.randn(4, 8, requires_grad=True)
    >>> w = torch.randn(8)  # a frozen norm weight: the graph keeps it, not the normalised h
    >>> x = w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))
    >>> again = input_replay(x)
    >>> torch.equal(again(), x)
    True
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from saftune.sparse.backward_cache import BackwardCache

# Set False to keep every Linear kernel's input instead (the replay reads the producers' saved tensors in the
# backward pass: a graph whose producers ran their backward already, in an earlier partial backward call
# without retain_graph, cannot be replayed).
REPLAY_INPUTS = True
KEEP_INPUTS = "set saftune.sparse.replay.REPLAY_INPUTS = False before the forward pass to keep layer inputs instead"
_MAX_DEPTH = 4
_ONE_INPUT_OPS = {"ToCopyBackward0", "CloneBackward0", "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0",
                  "AliasBackward0", "TransposeBackward0", "SliceBackward0"}


def input_replay(x: torch.Tensor) -> Callable[[], torch.Tensor] | None:
    """A function recomputing `x` bit for bit from its producers' saved tensors, or None where it cannot."""
    node = x.grad_fn
    if not REPLAY_INPUTS or node is None or torch.compiler.is_compiling() or _hooks_active():
        return None
    replay = _replay(node, _MAX_DEPTH)
    return None if replay is None else _Shared(node, replay)


def recomputed(replay: Callable[[], torch.Tensor], shape: torch.Size, dtype: torch.dtype, what: str) -> torch.Tensor:
    """`replay()` in a backward pass, checked against the forward's `shape` and `dtype`; `what` names the tensor.

    Both errors name the switch that keeps inputs instead of recomputing them.
    """
    try:
        x = replay()
    except RuntimeError as error:
        raise RuntimeError(f"saftune recomputes {what} from tensors its producers saved, and could not (an earlier "
                           f"backward call may have released them); {KEEP_INPUTS} ({error})") from error
    if x.shape != shape or x.dtype != dtype:
        raise RuntimeError(f"saftune recomputed {tuple(x.shape)} {x.dtype} as {what} where the forward had "
                           f"{tuple(shape)} {dtype}; {KEEP_INPUTS}")
    return x


def _hooks_active() -> bool:
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    except (AttributeError, RuntimeError):  # the private query moved: assume hooks, replay nothing
        return True


def _replay(node, depth: int, output: int = 0) -> Callable[[], torch.Tensor] | None:
    """The recipe of `node`'s forward output number `output` from saved tensors, or None."""
    kind = type(node).__name__
    own = getattr(node, "saftune_replay", None)  # a saftune kernel's node that knows how to recompute its output
    if own is not None and output == 0:
        return own
    for name in ("_saved_result", "_saved_output"):  # an op that saves its own output (attention's, exp's, ...)
        saved = getattr(node, name, None) if output == 0 else None
        if isinstance(saved, torch.Tensor) and _describes(node._input_metadata[0], saved):
            return lambda name=name: getattr(node, name)
    if depth == 0:
        return None
    if kind == "MulBackward0":
        factors = []
        for name, (child, number) in zip(("_saved_self", "_saved_other"), node.next_functions):
            if getattr(node, name) is not None:  # saved for the other factor's gradient
                factors.append(lambda name=name: getattr(node, name))
            elif child is not None and (inner := _replay(child, depth - 1, number)) is not None:
                factors.append(inner)
            else:
                return None
        first, second = factors
        return lambda: first() * second()
    # One-input ops: the input's recipe, then the op again (a cast, a copy into contiguous memory, a view).
    if kind not in _ONE_INPUT_OPS or len(node.next_functions) != 1:  # before recursing: this runs in every forward
        return None
    child, number = node.next_functions[0]
    inner = _replay(child, depth - 1, number) if child is not None else None
    if inner is None:
        return None
    meta = node._input_metadata[0]  # the forward output's shape, dtype and device
    if kind == "ToCopyBackward0":
        return lambda: inner().to(device=meta.device, dtype=meta.dtype)
    if kind == "CloneBackward0":
        return lambda: inner().contiguous()
    if kind in ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"):
        return lambda: inner().reshape(meta.shape)
    if kind == "AliasBackward0":
        return inner
    if kind == "TransposeBackward0":
        dims = node._saved_dim0, node._saved_dim1
        return lambda: inner().transpose(*dims)
    if kind == "SliceBackward0":
        index = (slice(None),) * node._saved_dim + (slice(node._saved_start, node._saved_end, node._saved_step),)
        return lambda: inner()[index]
    return None


def _describes(meta, tensor: torch.Tensor) -> bool:
    """Whether a node's output metadata matches `tensor` (a saved tensor taken for that output)."""
    return tuple(meta.shape) == tuple(tensor.shape) and meta.dtype == tensor.dtype and meta.device == tensor.device


_last_replay = BackwardCache()  # (producer node, the tensor it replayed)


class _Shared:
    """A replay that q, k and v (or gate and up) share: the first of them recomputes x, the others reuse it.

    One replayed tensor is kept until the next replay replaces it or the backward pass ends, as
    `kernels.shared_copy` keeps one copy.
    """

    def __init__(self, node, replay: Callable[[], torch.Tensor]):
        self.node, self.replay = node, replay

    def __call__(self) -> torch.Tensor:
        entry = _last_replay.get()
        if entry is not None and entry[0] is self.node:
            return entry[1]
        result = self.replay()
        _last_replay.put((self.node, result))
        return result
