"""`lpft`: linear probe, then full fine-tuning from it (Kumar et al., 2022).

The probe is `lp`'s (methods/lp.py): fit on frozen features, its head the start of full fine-tuning.
"""

from __future__ import annotations

from dataclasses import dataclass

from saftune.config import option
from saftune.methods.base import Method, register_method
from saftune.methods.lp import LinearProbeConfig, probe


@dataclass
class LPFTConfig(LinearProbeConfig):
    lr: float = option(1e-5, "learning rate of the fine-tuning stage", low=0.0, low_open=True)


@register_method
class LinearProbeThenFineTune(Method):
    name = "lpft"
    config_class = LPFTConfig
    help = "linear probe, then full fine-tuning from it (Kumar et al., 2022)"

    def prepare(self, model, context) -> None:
        probe(model, context, self.config)
        super().prepare(model, context)  # then everything trains, the fitted head included
