"""`l1`: full fine-tuning with lambda * ||theta - theta0||_1, the L1 variant of L2-SP (methods/l2sp.py)."""

from __future__ import annotations

from dataclasses import dataclass

from saftune.config import option
from saftune.methods.base import MethodConfig, register_method
from saftune.methods.l2sp import PenaltyToPretrained


@dataclass
class L1Config(MethodConfig):
    strength: float = option(1e-3, "lambda: weight of the L1 distance to the pretrained weights", low=0.0)


@register_method
class L1Penalty(PenaltyToPretrained):
    name = "l1"
    config_class = L1Config
    help = "fine-tuning + lambda * ||theta - theta0||_1"
    norm = "l1"
