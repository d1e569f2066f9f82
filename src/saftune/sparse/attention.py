"""The sparse Linear kernel for `nn.MultiheadAttention`'s projections (open_clip's attention).

`nn.MultiheadAttention` never calls its projections as modules: `F.multi_head_attention_forward` calls
`F.linear` on `in_proj_weight` (or views of it, or `q/k/v_proj_weight`) and on `out_proj.weight`. A
`TorchFunctionMode` cannot see those inner calls (torch hands the whole `multi_head_attention_forward`
to the mode, with the mode switched off inside), and re-implementing the attention would drift from
torch's masks and layouts. Instead this module runs torch's own code with one name changed: private
copies of `MultiheadAttention.forward`, `multi_head_attention_forward` and the in-projection helpers
whose global `linear` is `_routed_linear`. That function sends a weight saftune trains (or a row
block of it, as the cross-attention paths slice `in_proj_weight`) to its `LinearRoute` (the kernels'
`SparseLinearFunction`) and every other call to `F.linear`. Nothing in torch is patched; which weights
route where is a context variable set for the duration of one attention call, so threads and nested
models do not interfere.

After each call the routes that were expected to run are checked: if a future torch stopped calling
`linear` there, training would fail loudly instead of silently leaving the projections untrained.
"""

from __future__ import annotations

import types
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import activation

from saftune.sparse.kernels import LinearRoute

# (routes by weight id, ids of the routes that ran) for the attention call in progress.
_ACTIVE: ContextVar[tuple[dict[int, LinearRoute], set[int]] | None] = ContextVar("saftune_attention_routes", default=None)


def _routed_linear(input, weight, bias=None):  # noqa: A002 - torch's own parameter name, called positionally and by keyword
    active = _ACTIVE.get()
    if active is not None:
        routes, used = active
        key = id(weight) if id(weight) in routes else id(weight._base) if weight._base is not None else None
        if key in routes:
            used.add(key)
            return routes[key].apply(input, weight, bias)
    return F.linear(input, weight, bias)


def _rebind(function, namespace: dict):
    """A copy of `function` that looks its global names up in `namespace`."""
    copy = types.FunctionType(function.__code__, namespace, function.__name__, function.__defaults__, function.__closure__)
    copy.__kwdefaults__ = function.__kwdefaults__
    return copy


def _routed_attention_forward():
    """`nn.MultiheadAttention.forward`, running torch's code with `linear` routed."""
    functional = types.ModuleType("saftune_routed_functional")
    functional.__dict__.update(vars(F))
    functional.linear = _routed_linear
    for name in ("_in_projection_packed", "_in_projection", "multi_head_attention_forward"):
        setattr(functional, name, _rebind(getattr(F, name), functional.__dict__))
    return _rebind(nn.MultiheadAttention.forward, {**vars(activation), "F": functional})


_ROUTED_FORWARD = _routed_attention_forward()


def attention_forward(module: nn.MultiheadAttention, routes: dict[int, LinearRoute], *args, **kwargs):
    """`module.forward` once some of its projections are trained sparsely (installed by `sparsify`)."""
    if not (torch.is_grad_enabled() and any(r.values.requires_grad for r in routes.values())):
        return nn.MultiheadAttention.forward(module, *args, **kwargs)  # nothing to train: torch's path, fast path included
    # The fused fast path (eval mode, nothing requiring grad) skips the projections' F.linear: turn it off for this
    # call (a process-wide flag, so only when the module could take it: never in training mode).
    fast_path = not module.training and torch.backends.mha.get_fastpath_enabled()
    used: set[int] = set()
    token = _ACTIVE.set((routes, used))
    try:
        if fast_path:
            torch.backends.mha.set_fastpath_enabled(False)
        result = _ROUTED_FORWARD(module, *args, **kwargs)
    finally:
        if fast_path:
            torch.backends.mha.set_fastpath_enabled(True)
        _ACTIVE.reset(token)
    if used != set(routes):
        raise RuntimeError(
            f"nn.MultiheadAttention ran without using {len(set(routes) - used)} trained projection(s): this torch version "
            "computes attention differently from what saftune expects. Sparsify with kernels='off' (gradient hooks)."
        )
    return result
