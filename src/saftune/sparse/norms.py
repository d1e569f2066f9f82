"""Train selected entries of an RMSNorm's scale without keeping its normalised input.

A decoder's RMSNorm ends in a product, y = weight * n with n = (h * rsqrt(mean(h^2) + eps)).to(dtype).
With the weight frozen, autograd's product keeps only the weight; once the weight takes a gradient it
keeps n as well, a [tokens, hidden] tensor per norm (two per layer) that neither the frozen model nor
LoRA keeps: at 803M parameters in fp32 with seq 512, 132 MiB. n is itself the product of two tensors the
graph keeps anyway (h and the rsqrt), so `SparseScaleFunction` recomputes it in the backward pass
(`saftune.sparse.replay`), bit for bit, and sends the selected entries of d(loss)/d(weight) to the value
vector, computed exactly as autograd computes the dense gradient.

Only modules whose forward this file reproduces bit for bit are routed (`routable`: Llama's, Mistral's,
Qwen's and SmolLM's RMSNorm, checked on probe inputs at `sparsify` time); any other norm keeps the hook
path. The replacement forward also tells the layers that read y how to recompute it, so their inputs
stay recomputed too.

Example:
    >>> from transformers.models.llama.modeling_llama import LlamaRMSNorm
    >>> routable(LlamaRMSNorm(8))
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from saftune.sparse.replay import input_replay, recomputed

_PROBE_DTYPES = (torch.float32, torch.bfloat16)  # a routed norm matches on both (fp32 and bf16 activations)


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float, scale=None) -> torch.Tensor:
    """Hugging Face's RMSNorm, step for step (the same operations in the same dtypes); `scale(weight, n)`
    replaces the final product when given."""
    dtype = hidden.dtype
    hidden = hidden.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    normed = (hidden * torch.rsqrt(variance + eps)).to(dtype)
    return weight * normed if scale is None else scale(weight, normed)


def _epsilon(module: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


@torch.no_grad()
def routable(module: nn.Module) -> bool:
    """Whether `module` is an RMSNorm whose forward `rms_norm` reproduces bit for bit.

    It must hold one 1-D parameter, `weight`, no submodules and a float epsilon (`variance_epsilon` or
    `eps`), and give `rms_norm`'s output exactly on random probe inputs in fp32 and bf16 (Gemma's
    `(1 + weight)` scale, T5's cast order under mixed dtypes and fused kernels do not, and keep the hook path).
    """
    weight = getattr(module, "weight", None)
    eps = _epsilon(module)
    if (eps is None or not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.is_meta
            or [name for name, _ in module.named_parameters()] != ["weight"] or next(module.children(), None) is not None
            or module._forward_hooks or module._forward_pre_hooks):  # hooks would run on the probes
        return False
    generator = torch.Generator().manual_seed(0)
    for dtype in _PROBE_DTYPES:
        probe = torch.randn(2, 3, weight.shape[0], generator=generator).to(device=weight.device, dtype=dtype)
        try:
            theirs = module(probe)
        except Exception:  # a forward that refuses this dtype: not ours to reproduce
            return False
        ours = rms_norm(probe, weight, eps)
        if not isinstance(theirs, torch.Tensor) or theirs.dtype != ours.dtype or not torch.equal(theirs, ours):
            return False
    return True


class SparseScaleFunction(torch.autograd.Function):
    """y = weight * normed, with d(loss)/d(values) = the selected entries of d(loss)/d(weight).

    `replay` recomputes `normed` in the backward pass (None: `normed` is kept, as autograd would keep it).
    """

    @staticmethod
    def forward(ctx, normed, weight, values, indices, replay):
        out = weight * normed
        ctx.replay = replay
        ctx.save_for_backward(weight, indices, normed if replay is None else None)
        ctx.normed_dtype, ctx.normed_shape, ctx.values_dtype = normed.dtype, normed.shape, values.dtype
        if replay is not None:  # the readers of `out` (q/k/v, gate/up) recompute it as the forward did
            ctx.saftune_replay = lambda: weight * replay()
        return out

    @staticmethod
    def backward(ctx, grad_out):
        weight, indices, normed = ctx.saved_tensors
        grad_normed = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_normed = (grad_out * weight).to(ctx.normed_dtype)
        if ctx.needs_input_grad[2]:
            if normed is None:
                normed = recomputed(ctx.replay, ctx.normed_shape, ctx.normed_dtype, "a sparsely trained norm's normalised input")
            # autograd's dense weight gradient (product, sum over the broadcast dims, cast), then its selected entries
            grad_weight = (grad_out * normed).sum_to_size(weight.shape).to(weight.dtype)
            grad_values = grad_weight.index_select(0, indices).to(ctx.values_dtype)
        return grad_normed, None, grad_values, None, None


@dataclass
class ScaleRoute:
    """One RMSNorm scale trained sparsely: its value vector and the selected entries' indices."""

    values: torch.Tensor
    indices: torch.Tensor  # sorted indices into the weight

    def forward(self, module: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The module's forward (`rms_norm`), with the selected entries' gradient sent to `values`."""
        eps = _epsilon(module)
        if not (torch.is_grad_enabled() and self.values.requires_grad):  # eval / no_grad: nothing to save
            return rms_norm(hidden, module.weight, eps)
        return rms_norm(hidden, module.weight, eps, scale=self._scale)

    def _scale(self, weight: torch.Tensor, normed: torch.Tensor) -> torch.Tensor:
        return SparseScaleFunction.apply(normed, weight, self.values, self.indices, input_replay(normed))
