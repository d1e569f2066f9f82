"""`maple`: multi-modal prompt learning (Khattak et al., CVPR 2023): deep prompts in both CLIP towers.

In each of the first J transformer layers, n learned prompt tokens sit in both towers:

* text: layer 0's prompts replace the token embeddings of the first n words of "a photo of a {}."
  (and start as those embeddings); in layers 1..J-1 learned tokens replace the hidden states at the
  same positions (they start random, std 0.02);
* image: the vision prompts are linear coupling functions of the text prompts, V_i = F_i(T_i) with
  F_i = Linear(text width, vision width), one per layer. Layer 0's are appended after the patch tokens
  (after the position embeddings, before the pre-LayerNorm); in layers 1..J-1 they replace those tokens.

The encoders stay frozen; the text prompts and the coupling functions train. Paper defaults (kept as
this method's defaults): J = 9, n = 2, lr 0.0035; the paper trains 5 epochs with batch size 4 (set them
in the training options). transformers' CLIPModel (`hf-clip:`) only: forward hooks on its embeddings
and encoder layers insert the prompts. open_clip's towers are not supported yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from saftune.config import option
from saftune.methods.base import Method, MethodConfig, register_method
from saftune.methods.coop import PROMPT_FILE
from saftune.methods.prompt_context import context_embeddings, context_template, replace_context
from saftune.results import write_result_config



@dataclass
class MaPLeConfig(MethodConfig):
    lr: float = option(3.5e-3, "peak learning rate of the prompts and coupling functions (MaPLe: 0.0035)", low=0.0,
                       low_open=True)
    weight_decay: float = option(5e-4, "weight decay (MaPLe: 5e-4)", low=0.0)
    depth: int = option(9, "prompt depth J: layers of each tower with learned prompts (MaPLe: 9)", low=1)
    n_ctx: int = option(2, "prompt tokens per layer and tower; layer 0's text prompts are the first n_ctx words of "
                        "ctx_init", low=1)
    ctx_init: str = option("a photo of a", "the prompt template's words before the class name (empty: random)")
    init_std: float = option(0.02, "std of the randomly initialised prompts", low=0.0)
    placeholder: str = option("X", "placeholder word of the random context when ctx_init is empty")


class DeepPrompts(nn.Module):
    """MaPLe's prompts: text prompts per layer [J, n_ctx, text width] and J couplings text -> vision.

    Example:
        >>> prompts = DeepPrompts(torch.zeros(2, 8), depth=3, vision_width=16)
        >>> [tuple(prompts.text(i).shape) for i in range(3)], tuple(prompts.vision(2).shape)
        ([(2, 8), (2, 8), (2, 8)], (2, 16))
    """

    def __init__(self, first: torch.Tensor, depth: int, vision_width: int, init_std: float = 0.02):
        super().__init__()
        n_ctx, width = first.shape
        self.first = nn.Parameter(first.detach().clone().float())
        self.deeper = nn.Parameter(torch.randn(depth - 1, n_ctx, width) * init_std)
        self.couplings = nn.ModuleList(nn.Linear(width, vision_width) for _ in range(depth))

    @property
    def depth(self) -> int:
        return len(self.couplings)

    def text(self, layer: int) -> torch.Tensor:
        """The text prompts of `layer` (0-based) [n_ctx, text width]."""
        return self.first if layer == 0 else self.deeper[layer - 1]

    def vision(self, layer: int) -> torch.Tensor:
        """The vision prompts of `layer`: its coupling function of the text prompts [n_ctx, vision width]."""
        return self.couplings[layer](self.text(layer))


def require_hf_clip(model) -> None:
    """MaPLe inserts prompts into transformers' CLIP towers; anything else is refused with the reason."""
    clip = getattr(model, "clip", None)
    if clip is None or not (hasattr(clip, "text_model") and hasattr(clip, "vision_model")):
        if type(model).__name__ == "OpenCLIPClassifier":
            raise ValueError("maple is not supported on open-clip models yet: its towers run nn.MultiheadAttention "
                             "blocks whose inputs the prompts would have to be spliced into; use an hf-clip: model")
        raise ValueError(f"maple needs a CLIP model with an image and a text tower (hf-clip:...); got {type(model).__name__}")


def _replace_hidden(args: tuple, kwargs: dict, replace) -> tuple[tuple, dict]:
    """Apply `replace` to an encoder layer's hidden states, passed positionally or by keyword."""
    if args:
        return (replace(args[0]), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": replace(kwargs["hidden_states"])}


def attach_deep_prompts(model, prompts: DeepPrompts, template: str) -> DeepPrompts:
    """Attach `prompts` to an hf-clip classifier as its prompt learner, with the `template` layer 0's sit in."""
    clip = model.clip
    text_layers, vision_layers = clip.text_model.encoder.layers, clip.vision_model.encoder.layers
    if prompts.depth > min(len(text_layers), len(vision_layers)):
        raise ValueError(f"maple: depth {prompts.depth} is more than the model's {len(text_layers)} text and "
                         f"{len(vision_layers)} vision layers; lower `depth`")
    prompts = prompts.to(model.prompt_token_embedding.weight.device)
    n_ctx = prompts.first.shape[0]
    handles = [replace_context(model, n_ctx, lambda: prompts.first)]

    def append_vision_prompts(module, args, output):  # layer 0: after the patch tokens, before the pre-LayerNorm
        extra = prompts.vision(0).to(output.dtype)
        return torch.cat([output, extra.expand(output.shape[0], -1, -1)], dim=1)

    handles.append(clip.vision_model.embeddings.register_forward_hook(append_vision_prompts))
    for layer in range(1, prompts.depth):
        def text_hook(module, args, kwargs, layer=layer):
            if not model.encoding_prompts:
                return None

            def replace(hidden):
                hidden = hidden.clone()
                hidden[:, 1 : n_ctx + 1] = prompts.text(layer).to(hidden.dtype)
                return hidden

            return _replace_hidden(args, kwargs, replace)

        def vision_hook(module, args, kwargs, layer=layer):
            def replace(hidden):
                return torch.cat([hidden[:, :-n_ctx], prompts.vision(layer).to(hidden.dtype).expand(hidden.shape[0], -1, -1)],
                                 dim=1)

            return _replace_hidden(args, kwargs, replace)

        handles.append(text_layers[layer].register_forward_pre_hook(text_hook, with_kwargs=True))
        handles.append(vision_layers[layer].register_forward_pre_hook(vision_hook, with_kwargs=True))
    return model.attach_prompt_learner(prompts, templates=[template], hooks=handles)


@register_method
class MaPLe(Method):
    name = "maple"
    config_class = MaPLeConfig
    result_kind = "maple_prompt"
    result_files = (PROMPT_FILE,)
    help = "deep prompts in both CLIP towers, vision prompts coupled to text prompts, encoders frozen (MaPLe)"

    def prepare(self, model, context) -> None:
        require_hf_clip(model)
        for p in model.parameters():
            p.requires_grad_(False)
        cfg = self.config
        template = context_template(cfg.ctx_init, cfg.n_ctx, cfg.placeholder)
        first = context_embeddings(model, template, cfg.n_ctx, "maple")
        with torch.random.fork_rng(devices=[]):  # the prompts' and couplings' initialisation, from the run seed
            torch.manual_seed(context.seed)
            if not cfg.ctx_init.strip():
                first = torch.randn(first.shape) * cfg.init_std
            prompts = DeepPrompts(first, cfg.depth, model.clip.config.vision_config.hidden_size, cfg.init_std)
        attach_deep_prompts(model, prompts, template).requires_grad_(True)

    def save_result(self, model, directory, info):
        from safetensors.torch import save_file

        from saftune._io import atomic_path

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / PROMPT_FILE) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in model.prompt_learner.state_dict().items()}, str(tmp))
        meta = {"prompt_learner": self.name, "template": model.templates[0], "n_ctx": self.config.n_ctx,
                "depth": self.config.depth}
        return write_result_config(directory, self.result_kind, {**info, **meta}).parent

    @staticmethod
    def apply_result(model, directory, config, *, merge=False):
        # Nothing to merge: the learned prompts live beside the weights, not in them.
        MaPLe.load_prompt_result(model, directory, config)

    @staticmethod
    def load_prompt_result(model, directory: Path, config: dict) -> None:
        """Attach saved MaPLe prompts to `model` (classes already set)."""
        from safetensors.torch import load_file

        require_hf_clip(model)
        state = load_file(str(Path(directory) / PROMPT_FILE))
        context_embeddings(model, config["template"], config["n_ctx"], "maple")  # checks the template fits
        prompts = DeepPrompts(state["first"], config["depth"], state["couplings.0.weight"].shape[0])
        prompts.load_state_dict(state)
        attach_deep_prompts(model, prompts, config["template"]).requires_grad_(False)
