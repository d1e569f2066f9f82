"""`ft`: full fine-tuning with cross-entropy; every parameter trains."""

from __future__ import annotations

from dataclasses import dataclass

from saftune.config import option
from saftune.methods.base import Method, MethodConfig, register_method


@dataclass
class FullFineTuneConfig(MethodConfig):
    lr: float = option(1e-5, "peak learning rate of AdamW (CLIP fine-tuning: 1e-5)", low=0.0, low_open=True)


@register_method
class FullFineTune(Method):
    name = "ft"
    config_class = FullFineTuneConfig
    help = "full fine-tuning: every parameter, cross-entropy"

    def training_key(self):
        return {"method": self.name, "config": self.config.to_dict()}
