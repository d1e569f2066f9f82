"""`coop`: context optimisation (Zhou et al., 2022): learn the prompt's context vectors, encoders frozen.

Prompts become "X X ... X <class name>." with `n_ctx` placeholder words; a forward hook on the prompt
encoder's token embedding replaces the placeholders' embeddings with learned vectors, only while
prompts are being encoded (so a shared tower, as in sentence encoders, still embeds inputs normally).
The vectors live in a `PromptContext` module, attached with `DualEncoderClassifier.attach_prompt_learner`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from saftune.config import option
from saftune.methods.base import Method, MethodConfig, register_method
from saftune.methods.flyp import require_dual_encoder
from saftune.methods.prompt_context import replace_context, template_ids
from saftune.results import write_result_config

PROMPT_FILE = "prompt.safetensors"


@dataclass
class CoOpConfig(MethodConfig):
    lr: float = option(2e-3, "peak learning rate of the context vectors (CoOp: 0.002)", low=0.0, low_open=True)
    weight_decay: float = option(5e-4, "weight decay (CoOp: 5e-4)", low=0.0)
    n_ctx: int = option(16, "number of learned context tokens", low=1)
    init_std: float = option(0.02, "std of the context vectors' random initialisation", low=0.0)
    placeholder: str = option("X", "the placeholder word whose embeddings are replaced")


class PromptContext(nn.Module):
    """CoOp's prompt learner: context vectors [n_ctx, dim], the same in every class prompt.

    Example:
        >>> PromptContext(torch.zeros(16, 8)).context.shape
        torch.Size([16, 8])
    """

    def __init__(self, context: torch.Tensor):
        super().__init__()
        self.context = nn.Parameter(context.detach().clone())


def attach_prompt(model, context: torch.Tensor, placeholder: str = "X") -> PromptContext:
    """Attach learned context vectors [n_ctx, dim] to a dual encoder as its prompt learner (returned)."""
    n_ctx = context.shape[0]
    template = " ".join([placeholder] * n_ctx) + " {}."
    ids = template_ids(model, template)
    if ids.shape[1] < n_ctx + 1 or not bool((ids[:, 1 : n_ctx + 1] == ids[0, 1]).all()):
        raise ValueError(f"the placeholder {placeholder!r} does not tokenize to one token per word right after the "
                         "start token; choose another `placeholder`")
    learner = PromptContext(context)
    hook = replace_context(model, n_ctx, lambda: learner.context)
    return model.attach_prompt_learner(learner, templates=[template], hooks=[hook])


@register_method
class CoOp(Method):
    name = "coop"
    config_class = CoOpConfig
    help = "learned prompt context vectors, encoders frozen (CoOp)"
    result_kind = "prompt"
    result_files = (PROMPT_FILE,)

    def prepare(self, model, context) -> None:
        require_dual_encoder(model, "coop")
        for p in model.parameters():
            p.requires_grad_(False)
        dim = model.prompt_token_embedding.embedding_dim
        generator = torch.Generator().manual_seed(context.seed)
        init = torch.randn(self.config.n_ctx, dim, generator=generator) * self.config.init_std
        learner = attach_prompt(model, init.to(model.prompt_token_embedding.weight.device), self.config.placeholder)
        learner.requires_grad_(True)

    def save_result(self, model, directory, info):
        from safetensors.torch import save_file

        from saftune._io import atomic_path

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / PROMPT_FILE) as tmp:
            save_file({"context": model.prompt_learner.context.detach().cpu().contiguous()}, str(tmp))
        return write_result_config(directory, self.result_kind, {**info, "placeholder": self.config.placeholder}).parent

    @staticmethod
    def apply_result(model, directory, config, *, merge=False):
        # Nothing to merge: the learned vectors replace prompt words, they have no place in the weights.
        load_prompt(model, directory, config.get("placeholder", "X"))


def load_prompt(model, directory: Path, placeholder: str = "X") -> None:
    """Attach saved CoOp context vectors to `model` (`placeholder`: the word they were trained in place of)."""
    from safetensors.torch import load_file

    require_dual_encoder(model, "coop")
    context = load_file(str(Path(directory) / PROMPT_FILE))["context"]
    attach_prompt(model, context.to(model.prompt_token_embedding.weight.device), placeholder).requires_grad_(False)
