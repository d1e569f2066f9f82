"""`zeroshot`: no training; the prompt head (or the model's own head) as it is."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from saftune.methods.base import Method, MethodConfig, register_method
from saftune.results import write_result_config


@dataclass
class ZeroShotConfig(MethodConfig):
    """No options: nothing trains."""


@register_method
class ZeroShot(Method):
    name = "zeroshot"
    config_class = ZeroShotConfig
    help = "no training: the zero-shot prompt head"
    trains = False
    seed_free = True
    result_kind = "none"  # only the config: nothing trained
    result_files = ()

    def prepare(self, model, context) -> None:
        for p in model.parameters():
            p.requires_grad_(False)

    def trainable_parameters(self, model):
        return []

    def save_result(self, model, directory: Path, info: dict) -> Path:
        Path(directory).mkdir(parents=True, exist_ok=True)
        return write_result_config(directory, self.result_kind, info).parent

    @staticmethod
    def apply_result(model, directory, config, *, merge=False):
        """Nothing to load: the base model is the result."""
