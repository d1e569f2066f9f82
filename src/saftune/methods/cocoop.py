"""`cocoop`: conditional context optimisation (Zhou et al., CVPR 2022): CoOp's context, shifted per input.

A small meta-network pi = Linear(E, E/16) - ReLU - Linear(E/16, width) maps each input's normalised
feature to one vector that is added to every context vector, so each input gets its own prompts and
its own class embeddings: logits[b, c] = scale * cos(f_b, text(c_1 + pi(f_b), ..., c_n + pi(f_b), class c)).
The encoders stay frozen; the context vectors and the meta-network train.

Paper defaults (kept as this method's defaults): 4 context vectors initialised from "a photo of a",
lr 0.002; the paper trains 10 epochs with batch size 1 (set them in the training options: `train.epochs`,
`train.batch_size`). Each step encodes batch x classes prompts, which is why the paper used batch 1:
on many classes (ImageNet's 1000) keep the batch small, and lower `prompt_chunk` if evaluation runs out
of memory.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from saftune.config import option
from saftune.methods.base import Method, MethodConfig, register_method
from saftune.methods.coop import PROMPT_FILE
from saftune.methods.flyp import require_dual_encoder
from saftune.methods.prompt_context import context_embeddings, context_template, replace_context
from saftune.results import write_result_config



@dataclass
class CoCoOpConfig(MethodConfig):
    lr: float = option(2e-3, "peak learning rate of the context vectors and the meta-net (CoCoOp: 0.002)", low=0.0,
                       low_open=True)
    weight_decay: float = option(5e-4, "weight decay (CoCoOp: 5e-4)", low=0.0)
    n_ctx: int = option(4, "number of learned context vectors: the first n_ctx words of ctx_init", low=1)
    ctx_init: str = option("a photo of a", "words the context vectors start from (empty: random vectors)")
    init_std: float = option(0.02, "std of the random context vectors when ctx_init is empty", low=0.0)
    placeholder: str = option("X", "placeholder word of the random context when ctx_init is empty")
    prompt_chunk: int = option(4096, "most prompts (inputs x classes) per text-encoder call; lower it if memory runs out",
                               low=1)


class ConditionalPrompt(nn.Module):
    """CoCoOp's prompt learner: context vectors [n_ctx, width] and the meta-net E -> width.

    Example:
        >>> learner = ConditionalPrompt(torch.zeros(4, 8), feature_dim=32)
        >>> learner.contexts(torch.randn(3, 32)).shape
        torch.Size([3, 4, 8])
    """

    def __init__(self, context: torch.Tensor, feature_dim: int, prompt_chunk: int = 4096):
        super().__init__()
        width = context.shape[1]
        hidden = max(feature_dim // 16, 1)
        self.context = nn.Parameter(context.detach().clone().float())
        self.meta_net = nn.Sequential(OrderedDict(
            linear1=nn.Linear(feature_dim, hidden), relu=nn.ReLU(), linear2=nn.Linear(hidden, width)))
        self.prompt_chunk = prompt_chunk
        self.active: torch.Tensor | None = None  # [P, n_ctx, width] while this learner's prompts are encoded

    def contexts(self, features: torch.Tensor) -> torch.Tensor:
        """[B, n_ctx, width]: every context vector shifted by pi(f_b)."""
        return self.context[None] + self.meta_net(features.to(self.context.dtype))[:, None]

    def class_embeddings(self, model, features: torch.Tensor) -> torch.Tensor:
        """[B, C, E] normalised class embeddings of each input's own prompts."""
        tokens = model.prompt_tokens()
        num_prompts = next(iter(tokens.values())).shape[0]
        classes, templates = len(model.classnames), len(model.templates)
        contexts = self.contexts(features)
        per_call = max(1, self.prompt_chunk // num_prompts)  # inputs whose prompts go through one call
        out = []
        for start in range(0, contexts.shape[0], per_call):
            chunk = contexts[start : start + per_call]
            repeated = {k: v.repeat(chunk.shape[0], *([1] * (v.dim() - 1))) for k, v in tokens.items()}
            self.active = chunk.repeat_interleave(num_prompts, dim=0)  # input-major, like `repeated`
            try:
                prompts = model.embed_prompts(repeated)
            finally:
                self.active = None
            per_class = prompts.view(chunk.shape[0], classes, templates, -1).mean(2)
            out.append(F.normalize(per_class, dim=-1))
        return torch.cat(out)


def attach_conditional_prompt(model, learner: ConditionalPrompt, template: str, n_ctx: int) -> ConditionalPrompt:
    """Attach `learner` to a dual encoder as its prompt learner, with the `template` its context sits in.

    Its `class_embeddings` gives the model each input's own class embeddings (see `attach_prompt_learner`).
    """
    learner = learner.to(model.prompt_token_embedding.weight.device)
    hook = replace_context(model, n_ctx, lambda: learner.active)
    return model.attach_prompt_learner(learner, templates=[template], hooks=[hook])


@register_method
class CoCoOp(Method):
    name = "cocoop"
    config_class = CoCoOpConfig
    result_kind = "cocoop_prompt"
    result_files = (PROMPT_FILE,)
    help = "CoOp's context vectors shifted by a meta-net of each input's feature, encoders frozen (CoCoOp)"

    def prepare(self, model, context) -> None:
        require_dual_encoder(model, "cocoop")
        for p in model.parameters():
            p.requires_grad_(False)
        cfg = self.config
        template = context_template(cfg.ctx_init, cfg.n_ctx, cfg.placeholder)
        init = context_embeddings(model, template, cfg.n_ctx, "cocoop")
        if not cfg.ctx_init.strip():
            generator = torch.Generator().manual_seed(context.seed)
            init = torch.randn(init.shape, generator=generator) * cfg.init_std
        with torch.no_grad():
            feature_dim = model.embed_prompts(model.prompt_tokens()).shape[-1]
        with torch.random.fork_rng(devices=[]):  # the meta-net's initialisation, from the run seed
            torch.manual_seed(context.seed)
            learner = ConditionalPrompt(init, feature_dim, cfg.prompt_chunk)
        attach_conditional_prompt(model, learner, template, cfg.n_ctx).requires_grad_(True)

    def save_result(self, model, directory, info):
        from safetensors.torch import save_file

        from saftune._io import atomic_path

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        learner = model.prompt_learner
        with atomic_path(directory / PROMPT_FILE) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in learner.state_dict().items()}, str(tmp))
        meta = {"prompt_learner": self.name, "template": model.templates[0], "n_ctx": self.config.n_ctx,
                "feature_dim": learner.meta_net.linear1.in_features, "prompt_chunk": self.config.prompt_chunk}
        return write_result_config(directory, self.result_kind, {**info, **meta}).parent

    @staticmethod
    def apply_result(model, directory, config, *, merge=False):
        # Nothing to merge: the learned prompts live beside the weights, not in them.
        CoCoOp.load_prompt_result(model, directory, config)

    @staticmethod
    def load_prompt_result(model, directory: Path, config: dict) -> None:
        """Attach a saved CoCoOp prompt learner to `model` (classes already set)."""
        from safetensors.torch import load_file

        require_dual_encoder(model, "cocoop")
        state = load_file(str(Path(directory) / PROMPT_FILE))
        context_embeddings(model, config["template"], config["n_ctx"], "cocoop")  # checks the template fits
        learner = ConditionalPrompt(state["context"], config["feature_dim"], config.get("prompt_chunk", 4096))
        learner.load_state_dict(state)
        attach_conditional_prompt(model, learner, config["template"], config["n_ctx"]).requires_grad_(False)
