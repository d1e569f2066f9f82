"""SAFT on a quantized frozen base: the selected entries as a sparse side term beside int8 weights.

`quantize(model, "int8")` replaces the weight of every `nn.Linear` (except weights shared with another
module, such as a tied output embedding) by torchao's weight-only int8 tensor: one int8 per entry and
one scale per output row, so the base takes a quarter of its fp32 memory (half of bf16). The layers stay
`nn.Linear` with weights of the logical [out, in] shape and the same parameter names, so a mask or delta
addresses the same entries as on the full-precision model.

Why torchao int8: PEFT's LoRA takes torchao-quantized layers (its `TorchaoLoraLinear`, the QLoRA to
compare with) but only int8 ones; torchao's int4 needs kernels this machine lacks (`mslk`), and
bitsandbytes' 4-bit runs on this CPU only through a fallback (its CPU kernels come from a hub package)
and packs each weight into a flat uint8 vector, whose entries are not the weight's entries.

The quantized weights cannot take trained values in place, so a trained entry acts beside them:

    y = x Q(W)^T + x Delta^T + b,    Delta[r, c] = values[k] - Q(W)[r, c] for selected (r, c), else 0.

`QuantizedSideFunction` computes it without a second product: torchao's int8 forward materialises each
layer's weight in the compute dtype for its matrix product anyway, so the d_t selected entries are written
into that transient copy (Q(W) + Delta, as the full-precision engine writes trained values into its
weights). The backward rebuilds the copy for the input's gradient instead of saving it, and gives `values`
the selected entries of dy^T x (the kernels' sampled dot products). In fp32 the trained entries are exact;
in bf16 they round as a bf16 model's own trained weights do. Gradients are therefore taken with respect
to the *dequantized* weight Q(W) + Delta, in phase 1 as in phase 2: phase 1 routes each scored
quantized layer through `QuantizedLinearFunction`, whose backward hands the dense dL/dQ(W) to the
weight's gradient hook (so the usual accumulators, one-pass or lean, sum it).

Example:
    >>> net = quantize(nn.Sequential(nn.Linear(8, 4)), "int8")   # doctest: +SKIP
    >>> is_quantized(net[0].weight)                               # doctest: +SKIP
    True
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from saftune.sparse.kernels import LinearSelection, _columns, sampled_dots

QUANTIZATIONS = ("int8",)  # what `quantize` makes and the engine routes
_DESCRIPTION = {"int8": "torchao weight-only int8 (Int8WeightOnlyConfig: int8 entries, one scale per output row)"}


class QuantizationError(ValueError):
    """A quantized model or tensor that saftune cannot quantize, score, train or apply a delta to."""


def _torchao():
    """Import torchao quietly: it logs a line for each optional CUDA extension it cannot load on a CPU machine."""
    # torch's pytree also warns, once, about enums torchao registers; neither message concerns the user.
    loggers = [logging.getLogger(name) for name in ("torchao", "torchao.kernel.intmm", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            import torchao.quantization as quantization
        return quantization
    except ImportError:
        raise QuantizationError("quantize='int8' needs torchao: pip install 'saftune[quant]'") from None
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def is_quantized(tensor: torch.Tensor) -> bool:
    """True for a weight held by a quantization library (torchao, bitsandbytes), routable or not."""
    module = type(tensor).__module__
    return module.startswith("torchao.") or module.startswith("bitsandbytes.")


def check_routable(name: str, tensor: torch.Tensor) -> None:
    """Refuse a quantized tensor the engine cannot score or train, naming what it can."""
    if not is_quantized(tensor):
        return
    per_row = tuple(getattr(tensor, "block_size", ())) == (1, tensor.shape[-1]) and getattr(tensor, "act_quant_kwargs", 1) is None
    if type(tensor).__name__ != "Int8Tensor" or not type(tensor).__module__.startswith("torchao.") or not per_row:
        raise QuantizationError(
            f"{name!r} is quantized as {type(tensor).__module__}.{type(tensor).__name__}, which saftune cannot route "
            f"(it trains beside {_DESCRIPTION['int8']}); load the model with quantize='int8' instead"
        )


def dequantize(weight: torch.Tensor) -> torch.Tensor:
    """The dense weight a quantized one stands for, in its logical dtype (a plain tensor passes through)."""
    return weight.dequantize() if is_quantized(weight) else weight


def quantize(model: nn.Module, scheme: str = "int8") -> nn.Module:
    """Quantize (in place) the weight of every `nn.Linear` whose weight no other module shares.

    Shared weights (a language model's output layer tied to its input embedding) stay as they are: the
    embedding reads them in full precision.

    Args:
        model: any module; its Linear layers may be fp32 or bf16.
        scheme: "int8" (torchao weight-only int8).

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
    chosen = {id(m) for m in model.modules()
              if type(m) is nn.Linear and uses.get(id(m.weight)) == 1 and not is_quantized(m.weight)}
    if not chosen:
        raise QuantizationError(f"{type(model).__name__} has no unshared nn.Linear layer to quantize")
    ao = _torchao()
    ao.quantize_(model, ao.Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: id(m) in chosen)
    _release_freed_memory()
    return model


def _release_freed_memory() -> None:
    """Ask glibc to hand freed heap pages back to the system (nothing to do with another C library).

    Quantizing frees every layer's full-precision weight and its fp32 temporaries. Those under glibc's
    mmap threshold (which rises to 32 MiB as large tensors are freed) stay in the heap and stay resident:
    2.1 GiB that no tensor held on a 16.28B model quantized layer by layer.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


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


def quantized_parameter_names(model: nn.Module) -> list[str]:
    """Names of the model's quantized parameters."""
    return [n for n, p in model.named_parameters() if is_quantized(p)]


# ---------------------------------------------------------------------------------------------- the side term
def dense_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Q(W) as a plain [out, in] tensor in `dtype`: int8 entries times their row's scale (torchao's dequantize,
    bit for bit, in one conversion and one product instead of its int32 and fp32 temporaries)."""
    return weight.qdata.to(dtype) * weight.scale.to(dtype).view(-1, 1)


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
    def forward(ctx, x, weight, bias, values, pretrained, selection: LinearSelection, indices):
        out = F.linear(x, effective_weight(weight, x.dtype, indices, values, pretrained), bias)
        # The used input columns, in the input's dtype, as the Linear kernel saves them.
        x_columns = _columns(x.reshape(-1, x.shape[-1]), selection.unique_cols)
        ctx.save_for_backward(x_columns, weight, values, pretrained, indices)
        ctx.selection = selection
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x_columns, weight, values, pretrained, indices = ctx.saved_tensors
        s = ctx.selection
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_bias = grad_values = None
        if ctx.needs_input_grad[0]:
            dense = effective_weight(weight, grad_out.dtype, indices, values, pretrained)
            grad_x = grad_2d.mm(dense).view(*grad_out.shape[:-1], weight.shape[1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_2d.sum(0)
        if ctx.needs_input_grad[3]:
            grad_rows = _columns(grad_2d, s.unique_rows, torch.float32)
            grad_values = sampled_dots(grad_rows, x_columns.float(), s.row_slot, s.col_slot, s.crow)
        return grad_x, None, grad_bias, grad_values, None, None, None


@dataclass
class SideTerm:
    """The selected entries of one quantized Linear: where they are, their trained and pretrained values."""

    values: torch.Tensor  # [d_t] fp32 (the engine's value vector while training; fixed when applied from a delta)
    pretrained: torch.Tensor  # [d_t] Q(W) at the entries (or the full-precision base's values, for a delta from it)
    selection: LinearSelection
    indices: torch.Tensor

    @classmethod
    def build(cls, indices: torch.Tensor, shape: tuple[int, int], values: torch.Tensor, pretrained: torch.Tensor) -> SideTerm:
        return cls(values, pretrained, LinearSelection.from_indices(indices, shape), indices)


def side_forward(module: nn.Linear, side: SideTerm, x: torch.Tensor) -> torch.Tensor:
    """The forward installed on a quantized Linear that carries trained entries."""
    if torch.is_grad_enabled() and (side.values.requires_grad or x.requires_grad):
        return QuantizedSideFunction.apply(x, module.weight, module.bias, side.values, side.pretrained, side.selection,
                                           side.indices)
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
            return F.linear(x, weight, bias)

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
        return F.linear(x, module.weight, module.bias)
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
def requantized_values(weight: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Q(W) at `indices` for a full-precision [out, in] weight, quantized as `quantize` does (one layer's copy)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    layer.weight.copy_(weight)
    ao = _torchao()
    ao.quantize_(layer, ao.Int8WeightOnlyConfig())
    return layer.weight.dequantize().reshape(-1)[indices]
