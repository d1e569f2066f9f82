"""`l1` and `l2sp`: full fine-tuning with a penalty towards the pretrained weights.

L2-SP (Li et al., 2018): lambda * ||theta - theta0||_2^2; the L1 variant lambda * ||theta - theta0||_1.
Both keep a copy of the pretrained weights (one extra model in memory).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saftune.config import option
from saftune.methods.base import Method, MethodConfig, register_method
from saftune.models.base import classification_loss


@dataclass
class L2SPConfig(MethodConfig):
    strength: float = option(1.0, "lambda: weight of the squared L2 distance to the pretrained weights", low=0.0)


@dataclass
class L1Config(MethodConfig):
    strength: float = option(1e-3, "lambda: weight of the L1 distance to the pretrained weights", low=0.0)


class _PenaltyToPretrained(Method):
    norm: str = "l2"

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


@register_method
class L1Penalty(_PenaltyToPretrained):
    name = "l1"
    config_class = L1Config
    help = "fine-tuning + lambda * ||theta - theta0||_1"
    norm = "l1"


@register_method
class L2SP(_PenaltyToPretrained):
    name = "l2sp"
    config_class = L2SPConfig
    help = "fine-tuning + lambda * ||theta - theta0||_2^2 (L2-SP)"
    norm = "l2"
