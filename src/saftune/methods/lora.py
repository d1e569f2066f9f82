"""`lora`: low-rank adapters through the PEFT library (`LoraConfig`), merged for deployment.

Targets default to every linear projection outside the classification head or LM output head:
`nn.Linear`, GPT-2's `transformers.pytorch_utils.Conv1D` (a linear layer storing its weight as
[in, out]; PEFT adapts it with `fan_in_fan_out=True`, which is set when the targets are Conv1D), and
every `nn.MultiheadAttention` (open_clip's fused attention) as a whole, which PEFT supports.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from saftune._quiet import quiet_torchao
from saftune.config import option
from saftune.methods.base import Method, MethodConfig, register_method
from saftune.results import write_result_config


@dataclass
class LoRAConfig(MethodConfig):
    lr: float = option(1e-4, "peak learning rate (adapters start at zero: larger steps than full FT)", low=0.0, low_open=True)
    rank: int = option(8, "rank r of the adapters", low=1)
    alpha: float = option(16.0, "LoRA scaling alpha (the update is scaled by alpha / r)", low=0.0, low_open=True)
    dropout: float = option(0.0, "dropout on the adapters' input", low=0.0, high=1.0)
    targets: list[str] | None = option(None, "module names to adapt (suffix match); default: every Linear and "
                                       "MultiheadAttention outside the head")


def _is_conv1d(module: nn.Module) -> bool:
    """GPT-2's linear layer (`transformers.pytorch_utils.Conv1D`, weight [in, out])."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for non-HF models
        return False
    return isinstance(module, Conv1D)


def default_targets(model) -> list[str]:
    """Full names of every Linear / Conv1D / MultiheadAttention outside the head scope (MHA children excluded).

    Example:
        >>> from saftune.models.tiny_lm import tiny_causal_lm
        >>> [t.removeprefix("lm.transformer.h.") for t in default_targets(tiny_causal_lm("gpt2"))[:4]]
        ['0.attn.c_attn', '0.attn.c_proj', '0.mlp.c_fc', '0.mlp.c_proj']
    """
    import fnmatch

    head_patterns = model.scopes.get("head", [])
    names, inside_mha = [], []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside_mha):
            continue
        if any(fnmatch.fnmatchcase(f"{name}.weight", p) for p in head_patterns):
            continue
        if isinstance(module, nn.MultiheadAttention):
            names.append(name)
            inside_mha.append(name)
        elif (isinstance(module, nn.Linear) or _is_conv1d(module)) and name != "head":
            names.append(name)
    if not names:
        raise ValueError(f"{type(model).__name__} has no Linear, Conv1D or MultiheadAttention module for LoRA")
    return names


def fan_in_fan_out(model, targets: list[str]) -> bool:
    """True when targeted layers store their weight as [in, out] (GPT-2's Conv1D): PEFT's `fan_in_fan_out`.

    Targets are suffixes of module names, as PEFT matches them. A target list mixing Conv1D and nn.Linear
    layers still works: PEFT sets the layout of each layer from its type (and logs a warning for those
    whose type disagrees with the config).

    Example:
        >>> from saftune.models.tiny_lm import tiny_causal_lm
        >>> fan_in_fan_out(tiny_causal_lm("gpt2"), ["c_attn"]), fan_in_fan_out(tiny_causal_lm("llama"), ["q_proj"])
        (True, False)
    """
    return any(_is_conv1d(m) for n, m in model.named_modules() if any(n == t or n.endswith("." + t) for t in targets))


def _lora_config(rank, alpha, dropout, targets, fan_in_fan_out=False):
    with quiet_torchao():  # PEFT imports torchao when it is installed
        from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                      fan_in_fan_out=fan_in_fan_out)


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer into its base layer and remove the adapters (in place)."""
    with quiet_torchao():
        from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer) and name:
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model


@register_method
class LoRA(Method):
    name = "lora"
    config_class = LoRAConfig
    help = "low-rank adapters (PEFT LoraConfig) on the linear projections and attention layers"
    interpolates_linearly = False  # mixing A and B does not mix the weight updates linearly
    result_kind = "lora"
    result_files = ("adapter_config.json", "adapter_model.safetensors")

    def prepare(self, model, context) -> None:
        with quiet_torchao():
            from peft import inject_adapter_in_model

        targets = self.config.targets or default_targets(model)
        self.peft_config = _lora_config(self.config.rank, self.config.alpha, self.config.dropout, targets,
                                        fan_in_fan_out(model, targets))
        inject_adapter_in_model(self.peft_config, model)
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)

    def save_result(self, model, directory, info):
        with quiet_torchao():
            from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        from saftune._io import atomic_path, write_json

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / "adapter_model.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()}, str(tmp))
        config = self.peft_config.to_dict()
        config["target_modules"] = sorted(config["target_modules"]) if config.get("target_modules") else None
        write_json(directory / "adapter_config.json", {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()})
        return write_result_config(directory, self.result_kind, info).parent

    @staticmethod
    def apply_result(model, directory, config, *, merge=False):
        load_lora(model, directory, merge=merge)


def load_lora(model, directory: Path, merge: bool = False) -> nn.Module:
    """Attach a saved adapter to `model` (and merge it when `merge`)."""
    import json

    with quiet_torchao():
        from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    directory = Path(directory)
    saved = json.loads((directory / "adapter_config.json").read_text())
    config = LoraConfig(r=saved["r"], lora_alpha=saved["lora_alpha"], lora_dropout=saved.get("lora_dropout", 0.0),
                        target_modules=saved["target_modules"], bias=saved.get("bias", "none"),
                        fan_in_fan_out=saved.get("fan_in_fan_out", False))
    inject_adapter_in_model(config, model)
    result = set_peft_model_state_dict(model, load_file(str(directory / "adapter_model.safetensors")))
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter tensors {unexpected[:3]} do not fit this model")
    with torch.no_grad():
        for p in model.parameters():
            p.requires_grad_(False)
    return merge_lora(model) if merge else model
