"""`l2sp`: full fine-tuning with lambda * ||theta - theta0||_2^2 (L2-SP, Li et al., 2018).

`PenaltyToPretrained` is shared with `l1` (methods/l1.py), the same penalty in the L1 norm. Both keep a
copy of the pretrained values of the trained tensors (one extra model in memory). The penalty runs
over the trained tensors as `named_parameters` lists them, so a tensor shared by two modules (the tied
input and output embeddings of a causal LM) counts once.

The distance is one autograd node over all tensors (`distance_to_anchor`): its forward and backward are
`torch._foreach_*` calls over the whole parameter list, and it keeps no per-tensor difference alive
between them (the backward recomputes theta - theta0, which is the gradient it returns anyway).
`benchmarks/penalty_cost.py` measures it against a per-tensor loop.

Example:
    >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    >>> d = distance_to_anchor([w], [torch.zeros(2)], "l2")
    >>> d.backward(); float(d.detach()), w.grad.tolist()
    (5.0, [2.0, -4.0])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from saftune.config import option
from saftune.methods.base import Method, MethodConfig, register_method
from saftune.models.base import classification_loss

NORMS = ("l1", "l2")


class _DistanceToAnchor(torch.autograd.Function):
    """sum_i ||p_i - a_i|| (l1) or sum_i ||p_i - a_i||^2 (l2) over tensor lists, with foreach kernels."""

    @staticmethod
    def forward(ctx, norm: str, anchors: Sequence[torch.Tensor], *params: torch.Tensor) -> torch.Tensor:
        ctx.norm, ctx.anchors = norm, anchors
        ctx.save_for_backward(*params)
        # Summed in fp32 whatever the weights' dtype (fp64 weights: in fp64).
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        with torch.no_grad():
            diffs = torch._foreach_sub(params, anchors)
            norms = torch._foreach_norm(diffs, 1 if norm == "l1" else 2, dtype=None if dtype == torch.float64 else dtype)
        norms = torch.stack([n.to(dtype) for n in norms])
        return norms.sum() if norm == "l1" else norms.square().sum()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        params = ctx.saved_tensors
        grads = torch._foreach_sub(params, ctx.anchors)  # theta - theta0: turned into the gradient in place
        if ctx.norm == "l1":
            torch._foreach_sign_(grads)
            torch._foreach_mul_(grads, grad_output)
        else:
            torch._foreach_mul_(grads, 2 * grad_output)
        return (None, None, *grads)


def distance_to_anchor(params: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor], norm: str) -> torch.Tensor:
    """sum_i ||params_i - anchors_i||_1 (norm "l1") or sum_i ||params_i - anchors_i||_2^2 ("l2"), an fp32 scalar.

    Differentiable in `params` (d/dp: sign(p - a) for l1, 2 (p - a) for l2); `anchors` are constants.

    Args:
        params: the tensors (each at most once: a tied tensor listed twice would count twice).
        anchors: their reference values, same shapes, dtypes and devices.
        norm: "l1" or "l2".

    Example:
        >>> float(distance_to_anchor([torch.tensor([1.0, -2.0])], [torch.tensor([0.5, 0.0])], "l1"))
        2.5
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}; got {norm!r}")
    if len(params) != len(anchors):
        raise ValueError(f"{len(params)} tensors but {len(anchors)} anchors")
    if not params:
        return torch.zeros((), dtype=torch.float32)
    return _DistanceToAnchor.apply(norm, list(anchors), *params)


class PenaltyToPretrained(Method):
    """Fine-tuning + `strength` * the distance of the trained weights to the pretrained ones, in the norm `norm`."""

    norm: ClassVar[str] = "l2"  # "l2": squared L2 distance; "l1": L1 distance

    def prepare(self, model, context) -> None:
        super().prepare(model, context)
        # named_parameters lists a shared (tied) tensor once: it is anchored, and penalised, once.
        self.anchor = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def penalty(self, model) -> torch.Tensor:
        """strength * the distance of the trained tensors to their pretrained values (a scalar with gradient)."""
        params = dict(model.named_parameters())
        distance = distance_to_anchor([params[n] for n in self.anchor], list(self.anchor.values()), self.norm)
        return self.config.strength * distance

    def training_step(self, model, batch):
        return {"ce_loss": classification_loss(model, batch).mean(), f"{self.name}_loss": self.penalty(model)}


@dataclass
class L2SPConfig(MethodConfig):
    strength: float = option(1.0, "lambda: weight of the squared L2 distance to the pretrained weights", low=0.0)


@register_method
class L2SP(PenaltyToPretrained):
    name = "l2sp"
    config_class = L2SPConfig
    help = "fine-tuning + lambda * ||theta - theta0||_2^2 (L2-SP)"
    norm = "l2"
