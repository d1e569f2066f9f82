"""`l2sp`: full fine-tuning with lambda * ||theta - theta0||_2^2 (L2-SP, Li et al., 2018).

`PenaltyToPretrained` is shared with `l1` (methods/l1.py), the same penalty in the L1 norm. Both keep a
copy of the pretrained weights (one extra model in memory).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from saftune.config import option
from saftune.methods.base import Method, MethodConfig, register_method
from saftune.models.base import classification_loss


class PenaltyToPretrained(Method):
    """Fine-tuning + `strength` * the distance of the weights to the pretrained ones, in the norm `norm`."""

    norm: ClassVar[str] = "l2"  # "l2": squared L2 distance; "l1": L1 distance

    def prepare(self, model, context) -> None:
        super().prepare(model, context)
        self.anchor = {n: p.detach().clone() for n, p in model.named_parameters()}

    def penalty(self, model) -> torch.Tensor:
        total = 0.0
        for n, p in model.named_parameters():
            diff = p - self.anchor[n]
            total = total + (diff.square().sum() if self.norm == "l2" else diff.abs().sum())
        return self.config.strength * total

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
