"""SAFT on a quantized frozen base: the selected entries as a sparse side term beside int8 or 4-bit weights.

`quantize(model, scheme)` replaces the weight of every `nn.Linear` (except weights shared with another
module, such as a tied output embedding) by a torchao tensor:

* "int8": weight-only int8, one int8 per entry and one scale per output row (half a bf16 model);
* "nf4": QLoRA's 4-bit NormalFloat (torchao's `NF4Tensor`, as torchtune's QLoRA uses it): two entries per
  byte, one scale per 64 consecutive entries, the scales themselves quantized to int8 (a quarter of bf16).

The layers stay `nn.Linear` with weights of the logical [out, in] shape and the same parameter names, so a
mask or delta addresses the same entries as on the full-precision model.

Why torchao: PEFT's LoRA trains on both (its `TorchaoLoraLinear` for int8; a plain LoRA layer around a
Linear whose weight is an `NF4Tensor`, which dequantizes itself in `F.linear`), so they are the bases on
which QLoRA and SAFT compare on this machine. torchao's other int4 formats need kernels this machine lacks
(`mslk`, or CUDA), and bitsandbytes' 4-bit packs each weight into a flat [n/2, 1] uint8 parameter whose
shape and entries are not the weight's, so masks and deltas could not address it by name and shape.

The quantized weights cannot take trained values in place, so a trained entry acts beside them:

    y = x Q(W)^T + x Delta^T + b,    Delta[r, c] = values[k] - Q(W)[r, c] for selected (r, c), else 0.

`QuantizedSideFunction` computes it without a second product: the quantized forward materialises each
layer's weight in the compute dtype for its matrix product anyway, so the d_t selected entries are written
into that transient copy (Q(W) + Delta, as the full-precision engine writes trained values into its
weights). The backward rebuilds the copy for the input's gradient instead of saving it, and gives `values`
the selected entries of dy^T x (the kernels' sampled dot products); x itself is recomputed there where it
is a product of tensors the graph keeps anyway (`saftune.sparse.replay`), else its used columns are saved.
In fp32 the trained entries are exact; in bf16 they round as a bf16 model's own trained weights do.
Gradients are therefore taken with respect to the *dequantized* weight Q(W) + Delta, in phase 1 as in
phase 2: phase 1 routes each scored quantized layer through `QuantizedLinearFunction`, whose backward
hands the dense dL/dQ(W) to the weight's gradient hook (so the usual accumulators, one-pass or lean, sum it).

Example:
    >>> net = quantize(nn.Sequential(nn.Linear(64, 8)), "nf4")   # doctest: +SKIP
    >>> scheme_of(net[0].weight)                                  # doctest: +SKIP
    'nf4'
"""

from __future__ import annotations

import contextlib
import copy
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from saftune._quiet import quiet_torchao
from saftune.sparse.heap import release_free_heap
from saftune.sparse.kernels import (
    LinearSelection, _columns, _replayed_input, dots_in_place, selected_dots, shared_columns, shared_copy,
)
from saftune.sparse.replay import input_replay

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("int8", "nf4")  # what `quantize` makes and the engine routes
_DESCRIPTION = {
    "int8": "torchao weight-only int8 (Int8WeightOnlyConfig: int8 entries, one scale per output row)",
    "nf4": "torchao NF4 (NF4Tensor: 4-bit NormalFloat entries, one double-quantized scale per 64 entries)",
}
NF4_BLOCK = 64  # entries per NF4 scale, as in QLoRA


class QuantizationError(ValueError):
    """A quantized model or tensor that saftune cannot quantize, score, train or apply a delta to."""


def _torchao():
    """Import torchao quietly (`saftune._quiet`)."""
    try:
        with quiet_torchao():
            import torchao.quantization as quantization
        return quantization
    except ImportError:
        raise QuantizationError("a quantized base (quantize='int8' or 'nf4') needs torchao: pip install 'saftune[quant]'") from None


def is_quantized(tensor: torch.Tensor) -> bool:
    """True for a weight held by a quantization library (torchao, bitsandbytes), routable or not."""
    module = type(tensor).__module__
    return module.startswith("torchao.") or module.startswith("bitsandbytes.")


def scheme_of(tensor: torch.Tensor) -> str | None:
    """"int8" or "nf4" for a tensor saftune routes, None for any other tensor (plain or quantized otherwise)."""
    kind = type(tensor)
    if not kind.__module__.startswith("torchao."):
        return None
    if kind.__name__ == "NF4Tensor":
        return "nf4"
    per_row = tuple(getattr(tensor, "block_size", ())) == (1, tensor.shape[-1]) and getattr(tensor, "act_quant_kwargs", 1) is None
    return "int8" if kind.__name__ == "Int8Tensor" and per_row else None


def check_routable(name: str, tensor: torch.Tensor) -> None:
    """Refuse a quantized tensor the engine cannot score or train, naming what it can."""
    if is_quantized(tensor) and scheme_of(tensor) is None:
        raise QuantizationError(
            f"{name!r} is quantized as {type(tensor).__module__}.{type(tensor).__name__}, which saftune cannot route "
            f"(it trains beside {_DESCRIPTION['int8']}, or {_DESCRIPTION['nf4']}); load the model with "
            "quantize='int8' or quantize='nf4' instead"
        )


def dequantize(weight: torch.Tensor) -> torch.Tensor:
    """The dense weight a quantized one stands for, in its logical dtype (a plain tensor passes through)."""
    if not is_quantized(weight):
        return weight
    return dense_weight(weight, weight.dtype) if scheme_of(weight) == "nf4" else weight.dequantize()


def stored_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """What a tensor stores: itself, or a torchao tensor's inner tensors, data and scales, as it names them
    itself (`__tensor_flatten__`), for checksums, exact copies and bit-exact tests."""
    if not (is_quantized(tensor) and hasattr(tensor, "__tensor_flatten__")):
        return [tensor]
    return [getattr(tensor, name) for name in tensor.__tensor_flatten__()[0]]


def quantize(model: nn.Module, scheme: str = "int8") -> nn.Module:
    """Quantize (in place) the weight of every `nn.Linear` whose weight no other module shares.

    Shared weights (a language model's output layer tied to its input embedding) stay as they are: the
    embedding reads them in full precision. With "nf4", a layer whose entries do not fill whole blocks of
    64 stays in full precision too (logged).

    Args:
        model: any module; its Linear layers may be fp32 or bf16.
        scheme: "int8" (torchao weight-only int8) or "nf4" (torchao's NF4Tensor, QLoRA's 4-bit format).

    Returns:
        The same model.
    """
    if scheme not in QUANTIZATIONS:
        raise QuantizationError(f"unknown quantization {scheme!r}; saftune trains beside: {', '.join(QUANTIZATIONS)}")
    uses: dict[int, int] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                uses[id(p)] = uses.get(id(p), 0) + 1
    chosen = {id(m): m for m in model.modules()
              if type(m) is nn.Linear and uses.get(id(m.weight)) == 1 and not is_quantized(m.weight)}
    if scheme == "nf4":
        unfit = [m for m in chosen.values() if m.weight.numel() % NF4_BLOCK]
        if unfit:
            logger.info("quantize: %d Linear layers stay in full precision (entries not a multiple of %d)", len(unfit), NF4_BLOCK)
        chosen = {i: m for i, m in chosen.items() if m.weight.numel() % NF4_BLOCK == 0}
    if not chosen:
        raise QuantizationError(f"{type(model).__name__} has no unshared nn.Linear layer to quantize")
    ao = _torchao()
    if scheme == "int8":
        ao.quantize_(model, ao.Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: id(m) in chosen)
    else:
        for module in chosen.values():
            module.weight = nn.Parameter(to_nf4(module.weight.detach()), requires_grad=False)
    # The full-precision weights and their fp32 temporaries just freed stay resident in glibc's heap: 2.1 GiB
    # that no tensor held on a 16.28B model quantized layer by layer.
    release_free_heap()
    return model


@torch.no_grad()
def to_nf4(weight: torch.Tensor) -> torch.Tensor:
    """`weight` (entries a multiple of 64) as torchao's NF4Tensor, bit for bit what `torchao.to_nf4` makes.

    torchao quantizes the per-block scales in groups of 256 (QLoRA's size), which must divide the number of
    blocks; a layer with fewer or another count (SmolLM2's 576 x 576 has 5184 blocks) takes the largest
    power of two that does.

    Hand-written here, one step only: torchao finds each entry's nearest level by measuring its distance
    to all 16 levels (19 s for one 5632 x 15360 layer on 2 busy cores, most of an hour for a 20B model);
    `_nearest_levels` picks the same level (`tests/test_quantized.py` checks against torchao) by a table
    lookup for bf16 and by comparing the two levels around the entry otherwise.
    """
    ao = _torchao()
    nf4_module = sys.modules[ao.NF4Tensor.__module__]
    blocks = weight.numel() // NF4_BLOCK
    group = next(size for size in (256, 128, 64, 32, 16, 8, 4, 2, 1) if blocks % size == 0)
    flat = weight.detach().contiguous().reshape(-1)
    # torchao's 16 levels in the weight's dtype, read off a one-block tensor rather than copied here.
    levels = ao.to_nf4(torch.ones(NF4_BLOCK, dtype=weight.dtype), NF4_BLOCK, 1).nf4.to(weight.device)
    scalers, factor, mean = ao.NF4Tensor.double_quantize_scalers(flat, NF4_BLOCK, group)
    absmax = nf4_module.get_block_absmax(flat, NF4_BLOCK)
    codes = torch.empty(flat.numel(), dtype=torch.uint8, device=flat.device)
    step = 1 << 24  # entries per chunk: bounds the int64 temporaries at 128 MiB each
    for start in range(0, flat.numel(), step):
        scaled = (flat[start:start + step].view(-1, NF4_BLOCK) / absmax[start // NF4_BLOCK:(start + step) // NF4_BLOCK, None]).reshape(-1)
        codes[start:start + step] = _nearest_levels(scaled, levels)
    packed = codes[::2] << 4 | codes[1::2]  # two entries per byte, the first in the high half, as torchao packs them
    meta = nf4_module.SubclassTensorArgs(weight.size(), weight.stride(), weight.storage_offset(), weight.dtype,
                                         weight.device, False)
    return ao.NF4Tensor(meta, NF4_BLOCK, blocks, group, scalers, factor, mean, packed, nf4=levels)


def _nearest_levels(scaled: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """The index (uint8) of the level nearest to each entry, as torchao picks it: the first of equally distant
    levels after their distances are rounded to the entries' dtype (always the lower of the two around it).

    A bf16 entry has only 65536 possible values, so for bf16 the answer for each is computed once and looked
    up by the entry's bits.
    """
    if scaled.dtype != torch.bfloat16:
        return _nearest_levels_counted(scaled, levels)
    key = (tuple(levels.tolist()), str(levels.device))
    if key not in _BF16_TABLES:
        bits = torch.arange(1 << 16, dtype=torch.int32, device=levels.device)
        every = bits.to(torch.int16).view(torch.bfloat16)  # the bf16 value of each 16-bit pattern
        _BF16_TABLES[key] = _nearest_levels_counted(every, levels)
    return _BF16_TABLES[key][scaled.view(torch.int16).int().bitwise_and_(0xFFFF)]


_BF16_TABLES: dict[tuple, torch.Tensor] = {}


def _nearest_levels_counted(scaled: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """`_nearest_levels` by counting the levels below each entry (15 comparisons) and comparing the two around it."""
    upper = torch.zeros(scaled.shape, dtype=torch.uint8, device=scaled.device)
    for level in levels:
        upper += scaled > level
    upper = upper.clamp_(1, len(levels) - 1).long()
    lower = upper - 1
    take_upper = (scaled - levels[upper]).abs() < (scaled - levels[lower]).abs()
    return (lower + take_upper).to(torch.uint8)


@torch.no_grad()
def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every quantized Linear weight by its exact dequantized values (a plain tensor), in place.

    A side term attached to the layer is merged into those values, so the model computes what it did.
    """
    for module in model.modules():
        if type(module) is nn.Linear and is_quantized(module.weight):
            dense = dequantize(module.weight.detach()).clone()
            side = detach(module)
            if side is not None:
                dense.view(-1).index_copy_(0, side.indices, (dense.reshape(-1)[side.indices].float()
                                                             + side.values.float() - side.pretrained.float()).to(dense.dtype))
            module.weight = nn.Parameter(dense, requires_grad=False)
    return model


def copy_model(model: nn.Module) -> nn.Module:
    """`copy.deepcopy(model)` that copies quantized weights exactly.

    torchao's NF4Tensor clones itself by dequantizing and quantizing again with its default groups, which
    changes the scales (and fails for groups other than 256); here every quantized parameter is rebuilt
    from copies of its stored tensors instead.

    Example:
        >>> twin = copy_model(quantize(nn.Sequential(nn.Linear(64, 8)), "nf4"))   # doctest: +SKIP
    """
    memo = {}
    for p in model.parameters():
        if is_quantized(p):
            names, meta = p.__tensor_flatten__()
            inner = {n: getattr(p, n).clone() for n in names}
            twin = type(p.data).__tensor_unflatten__(inner, meta, p.size(), p.stride())
            memo[id(p)] = nn.Parameter(twin, requires_grad=p.requires_grad)
    return copy.deepcopy(model, memo)


def quantized_parameter_names(model: nn.Module) -> list[str]:
    """Names of the model's quantized parameters."""
    return [n for n, p in model.named_parameters() if is_quantized(p)]


# ---------------------------------------------------------------------------------------------- the side term
def dense_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Q(W) as a plain [out, in] tensor in `dtype`, bit for bit torchao's own dequantized values.

    int8: entries times their row's scale, in one conversion and one product instead of torchao's int32 and
    fp32 temporaries. nf4: each byte's two entries looked up at once in a 256 x 2 table, then scaled per
    block of 64 in the weight's dtype, as `NF4Tensor.get_original_weight` computes them, without its two
    int64 index tensors (8 bytes per entry each).
    """
    if scheme_of(weight) == "nf4":
        levels = weight.nf4.to(weight.dtype)
        pairs = torch.stack([levels.repeat_interleave(16), levels.repeat(16)], dim=1)  # byte b -> (b >> 4, b & 15)
        scales = weight.dequantize_scalers(weight.quantized_scalers, weight.quantization_factor, weight.scaler_block_size)
        dense = pairs.index_select(0, weight.quantized_data.int()).view(-1, weight.block_size)
        return dense.mul_(scales.view(-1, 1)).view(weight.shape).to(dtype)
    return weight.qdata.to(dtype) * weight.scale.to(dtype).view(-1, 1)


def _quantized_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear on Q(W) without autograd: torchao's own int8 product; nf4 through the lean `dense_weight`."""
    if scheme_of(weight) == "nf4":
        return F.linear(x, dense_weight(weight, x.dtype), bias)
    return F.linear(x, weight, bias)


def effective_weight(weight: torch.Tensor, dtype: torch.dtype, indices: torch.Tensor, values: torch.Tensor,
                     pretrained: torch.Tensor) -> torch.Tensor:
    """Q(W) + Delta for one layer, transient: the d selected entries become Q(W) + (values - pretrained).

    torchao's int8 forward materialises the weight in the compute dtype for its product anyway; writing the d
    trained entries into that copy makes the side term cost d writes instead of a second (sparse) product.
    """
    dense = dense_weight(weight, dtype)
    flat = dense.view(-1)
    change = values.detach().float() - pretrained.float()
    flat.index_copy_(0, indices, (flat.index_select(0, indices).float() + change).to(dtype))
    return dense


class QuantizedSideFunction(torch.autograd.Function):
    """y = x (Q(W) + Delta)^T + b, with d(loss)/d(values) = selected entries of dy^T x.

    Nothing of the weight is saved for the backward pass: it is rebuilt there from the int8 entries, so
    training keeps no dense copy of any layer (PEFT's LoRA on torchao weights keeps one per layer).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, values, pretrained, selection: LinearSelection, indices, recomputing=False,
                replay=None):
        out = F.linear(x, effective_weight(weight, x.dtype, indices, values, pretrained), bias)
        x2d, cols = x.reshape(-1, x.shape[-1]), selection.unique_cols
        if recomputing:  # gradient checkpointing drops what this pass saves: keep a reference, gather in the backward
            saved = x2d
        elif replay is not None:  # recomputed in the backward from its producers' saved tensors (`replay`)
            saved = x2d.new_empty((0, x2d.shape[1]))
        else:  # the used input columns, one copy saved by every projection that reads this input (q, k, v; gate, up)
            saved = shared_copy(x2d, cols, x.dtype, lambda: _columns(x2d, cols))
        ctx.save_for_backward(saved, weight, values, pretrained, indices)
        ctx.selection = selection
        ctx.has_bias = bias is not None
        ctx.recomputing = recomputing
        ctx.replay, ctx.x_shape, ctx.x_dtype = replay, x.shape, x.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        saved, weight, values, pretrained, indices = ctx.saved_tensors
        s = ctx.selection
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_bias = grad_values = None
        if ctx.needs_input_grad[0]:
            dense = effective_weight(weight, grad_out.dtype, indices, values, pretrained)
            grad_x = grad_2d.mm(dense).view(*grad_out.shape[:-1], weight.shape[1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_2d.sum(0)
        if ctx.needs_input_grad[3]:
            whole = ctx.replay is not None or ctx.recomputing
            if whole:  # the input recomputed bit for bit from its producers' saved tensors, or kept (checkpointing)
                saved = saved if ctx.replay is None else _replayed_input(ctx).reshape(-1, weight.shape[1])
            grad_values = dots_in_place(grad_2d, saved, saved.dtype, s.unique_rows, s.row_slot, s.unique_cols, s.col_slot,
                                        columns_saved=not whole)
            if grad_values is None:  # copied to fp32 (gathered and widened in one copy), once for q, k and v
                if whole:
                    x_cols, col_slot = shared_columns(saved, s.unique_cols, s.col_slot)
                else:
                    x_cols, col_slot = shared_copy(saved, None, torch.float32, saved.float), s.col_slot
                grad_values = selected_dots(grad_2d, x_cols, s.unique_rows, s.row_slot, col_slot, s.crow)
        return grad_x, None, grad_bias, grad_values, None, None, None, None, None


@dataclass
class SideTerm:
    """The selected entries of one quantized Linear: where they are, their trained and pretrained values."""

    values: torch.Tensor  # [d_t] fp32 (the engine's value vector while training; fixed when applied from a delta)
    pretrained: torch.Tensor  # [d_t] Q(W) at the entries (or the full-precision base's values, for a delta from it)
    selection: LinearSelection
    indices: torch.Tensor
    # True while the model recomputes activations (gradient checkpointing), as for `kernels.LinearRoute`.
    checkpointing: Callable[[], bool] = lambda: False

    @classmethod
    def build(cls, indices: torch.Tensor, shape: tuple[int, int], values: torch.Tensor, pretrained: torch.Tensor,
              checkpointing: Callable[[], bool] = lambda: False) -> SideTerm:
        return cls(values, pretrained, LinearSelection.from_indices(indices, shape), indices, checkpointing)


def side_forward(module: nn.Linear, side: SideTerm, x: torch.Tensor) -> torch.Tensor:
    """The forward installed on a quantized Linear that carries trained entries."""
    if torch.is_grad_enabled() and (side.values.requires_grad or x.requires_grad):
        recomputing = side.checkpointing()
        # Without checkpointing, the input is recomputed in the backward where it is a product of tensors the
        # graph keeps anyway (a norm's output, SwiGLU's, attention's), as `kernels.LinearRoute` does.
        replay = input_replay(x) if side.values.requires_grad and not recomputing else None
        return QuantizedSideFunction.apply(x, module.weight, module.bias, side.values, side.pretrained, side.selection,
                                           side.indices, recomputing, replay)
    return F.linear(x, effective_weight(module.weight, x.dtype, side.indices, side.values, side.pretrained), module.bias)


def attach(module: nn.Module, side: SideTerm) -> None:
    """Install `side` on a quantized nn.Linear (replacing a side term attached before)."""
    if type(module) is not nn.Linear or not is_quantized(module.weight):
        raise QuantizationError(f"a side term goes on a quantized nn.Linear, not on {type(module).__name__}")
    if "forward" in module.__dict__ and getattr(module, "_saftune_side", None) is None:
        raise QuantizationError(f"{type(module).__name__} already has a forward of someone else's; cannot add a side term")
    module.forward = partial(side_forward, module, side)
    module._saftune_side = side


def detach(module: nn.Module) -> SideTerm | None:
    """Remove the side term of `module`, if any, and return it."""
    side = module.__dict__.pop("_saftune_side", None)
    if side is not None:
        del module.forward
    return side


def attached(module: nn.Module) -> SideTerm | None:
    """The side term on `module`, or None."""
    return module.__dict__.get("_saftune_side")


# ---------------------------------------------------------------------------------------------- phase 1
class QuantizedLinearFunction(torch.autograd.Function):
    """y = F.linear(x, Q(W), b), keeping no dense copy of the weight for the backward pass.

    Under autograd, torchao's int8 forward saves each layer's weight converted to the compute dtype (a
    bf16 model's worth of copies over a whole forward); this function rebuilds it in the backward instead.
    When the weight itself asks for a gradient (phase 1), that gradient is dL/dQ(W) = dy^T x, dense, one
    layer at a time, for the scores' accumulators.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x if weight.requires_grad else x[:0], weight)
        ctx.has_bias = bias is not None
        with torch.no_grad():
            return _quantized_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_2d.mm(dense_weight(weight, grad_out.dtype)).view(*grad_out.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:
            grad_weight = grad_2d.t().mm(x.reshape(-1, x.shape[-1]).to(grad_out.dtype))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_2d.sum(0)
        return grad_x, grad_weight, grad_bias


def frozen_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The forward of a quantized Linear with nothing to train (or, in phase 1, to score)."""
    if not torch.is_grad_enabled():
        return _quantized_linear(x, module.weight, module.bias)
    return QuantizedLinearFunction.apply(x, module.weight, module.bias)


@contextlib.contextmanager
def scoring_routes(model: nn.Module, params):
    """While scoring, route every quantized Linear through `QuantizedLinearFunction`: the weights among
    `params` get dL/dQ(W), and no layer keeps a dense copy of its weight for the backward."""
    chosen = {id(p) for p in params if is_quantized(p)}
    routed = []
    try:
        for name, module in model.named_modules():
            weight = module._parameters.get("weight") if type(module) is nn.Linear else None
            if weight is None or not is_quantized(weight):
                continue
            check_routable(f"{name}.weight", weight)
            if "forward" in module.__dict__:
                raise QuantizationError(f"{name!r} already has a forward of someone else's (is the model sparsified?); "
                                        "select the mask on the plain quantized model")
            module.forward = partial(frozen_forward, module)
            routed.append(module)
            chosen.discard(id(weight))
        if chosen:
            raise QuantizationError("a quantized weight held by something other than an nn.Linear cannot be scored; "
                                    "exclude it from the candidates")
        yield
    finally:
        for module in routed:
            del module.forward


@torch.no_grad()
def requantized_values(weight: torch.Tensor, indices: torch.Tensor, scheme: str = "int8") -> torch.Tensor:
    """Q(W) at `indices` for a full-precision [out, in] weight, quantized as `quantize` does (one layer's copy)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    layer.weight.copy_(weight)
    quantize(nn.Sequential(layer), scheme)
    return dequantize(layer.weight).reshape(-1)[indices]


@torch.no_grad()
def rounding_bound(weight: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """How far quantizing may have moved each entry at `indices` of a quantized weight from its full-precision value.

    int8: half a step of the entry's row scale. nf4: half the widest gap between NF4 levels (1 - 0.7230)
    times the entry's true block scale, plus the double quantization's error on that scale (at most one
    step of its int8 code, counting the clamp at 127) times a level of at most 1.
    """
    if scheme_of(weight) == "int8":
        return 0.5 * weight.scale.reshape(-1).float()[indices // weight.shape[1]]
    levels = weight.nf4.float()
    half_gap = 0.5 * float((levels[1:] - levels[:-1]).max())
    scales = weight.dequantize_scalers(weight.quantized_scalers, weight.quantization_factor,
                                       weight.scaler_block_size).float()
    scale_step = (1.0 / weight.quantization_factor.float()).repeat_interleave(weight.scaler_block_size)
    block = indices // weight.block_size
    scale, step = scales[block].abs(), scale_step[block]
    return half_gap * (scale + step) + step
