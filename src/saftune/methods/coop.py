"""`coop`: context optimisation (Zhou et al., 2022): learn the prompt's context vectors, encoders frozen.

Prompts become "X X ... X <class name>." with `n_ctx` placeholder words; a forward hook on the prompt
encoder's token embedding replaces the placeholders' embeddings with learned vectors, only while
prompts are being encoded (so a shared tower, as in sentence encoders, still embeds inputs normally).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from saftune.config import option
from saftune.methods.base import Method, MethodConfig, register_method
from saftune.methods.flyp import require_dual_encoder
from saftune.methods.results import write_result_config

PROMPT_FILE = "prompt.safetensors"


@dataclass
class CoOpConfig(MethodConfig):
    lr: float = option(2e-3, "peak learning rate of the context vectors (CoOp: 0.002)", low=0.0, low_open=True)
    weight_decay: float = option(5e-4, "weight decay (CoOp: 5e-4)", low=0.0)
    n_ctx: int = option(16, "number of learned context tokens", low=1)
    init_std: float = option(0.02, "std of the context vectors' random initialisation", low=0.0)
    placeholder: str = option("X", "the placeholder word whose embeddings are replaced")


def attach_prompt(model, context: torch.Tensor, placeholder: str = "X") -> nn.Parameter:
    """Install learned context vectors [n_ctx, dim] on a dual encoder (returns the parameter)."""
    n_ctx = context.shape[0]
    model.fixed_templates = [" ".join([placeholder] * n_ctx) + " {}."]
    model.set_classes(model.classnames, model.fixed_templates)
    ids = model.prompt_tokens()["input_ids"]
    if ids.shape[1] < n_ctx + 1 or not bool((ids[:, 1 : n_ctx + 1] == ids[0, 1]).all()):
        raise ValueError(f"the placeholder {placeholder!r} does not tokenize to one token per word right after the "
                         "start token; choose another `placeholder`")
    model.coop_context = nn.Parameter(context.clone())

    def replace_context(module, args, output):
        if not model.encoding_prompts:
            return output
        output = output.clone()
        output[:, 1 : n_ctx + 1] = model.coop_context.to(output.dtype)
        return output

    model._coop_hook = model.prompt_token_embedding.register_forward_hook(replace_context)
    return model.coop_context


@register_method
class CoOp(Method):
    name = "coop"
    config_class = CoOpConfig
    help = "learned prompt context vectors, encoders frozen (CoOp)"

    def prepare(self, model, context) -> None:
        require_dual_encoder(model, "coop")
        for p in model.parameters():
            p.requires_grad_(False)
        dim = model.prompt_token_embedding.embedding_dim
        generator = torch.Generator().manual_seed(context.seed)
        init = torch.randn(self.config.n_ctx, dim, generator=generator) * self.config.init_std
        param = attach_prompt(model, init.to(model.prompt_token_embedding.weight.device), self.config.placeholder)
        param.requires_grad_(True)

    def save_result(self, model, directory, info):
        from safetensors.torch import save_file

        from saftune._io import atomic_path

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / PROMPT_FILE) as tmp:
            save_file({"context": model.coop_context.detach().cpu().contiguous()}, str(tmp))
        return write_result_config(directory, "prompt", {**info, "placeholder": self.config.placeholder}).parent


def load_prompt(model, directory: Path) -> None:
    """Attach saved CoOp context vectors to `model`."""
    import json

    from safetensors.torch import load_file

    directory = Path(directory)
    config = json.loads((directory / "saftune_config.json").read_text())
    learner = config.get("prompt_learner")  # CoCoOp and MaPLe save prompt results too, and load their own
    if learner:
        from saftune.methods.base import method_class

        method_class(learner).load_prompt_result(model, directory, config)
        return
    require_dual_encoder(model, "coop")
    context = load_file(str(directory / PROMPT_FILE))["context"]
    attach_prompt(model, context.to(model.prompt_token_embedding.weight.device), config.get("placeholder", "X"))
    model.coop_context.requires_grad_(False)
