"""`flyp`: fine-tune like you pretrain (Goyal et al., 2023): CLIP's contrastive loss on (image, class prompt).

Each example is paired with a prompt of its own class; the loss is CLIP's symmetric cross-entropy over
the batch's image-prompt similarity matrix. Needs a dual encoder. Under torchrun the matrix is the
whole global micro-batch's (the rows are gathered from every process), as in a single process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from saftune import distributed
from saftune.config import option
from saftune.methods.base import Method, MethodConfig, register_method
from saftune.models.zero_shot import DualEncoderClassifier


@dataclass
class FLYPConfig(MethodConfig):
    lr: float = option(1e-5, "peak learning rate", low=0.0, low_open=True)


def require_dual_encoder(model, method: str) -> None:
    if not isinstance(model, DualEncoderClassifier):
        raise ValueError(f"{method} needs a CLIP-style dual encoder (hf-clip, open-clip, sentence, minilm); "
                         f"got {type(model).__name__}")


@register_method
class FLYP(Method):
    name = "flyp"
    config_class = FLYPConfig
    help = "contrastive fine-tuning: each example against a prompt of its class (FLYP)"
    couples_batch = True  # the negatives are the batch's other examples

    def prepare(self, model, context) -> None:
        require_dual_encoder(model, "flyp")
        super().prepare(model, context)

    def training_step(self, model, batch):
        pairs = _pairs(model, batch) if batch is not None else _no_pairs(model)
        # The negatives are the whole global micro-batch: every process computes the same loss over it
        # (see `Method.couples_batch`) and backpropagates into its own rows only ...
        features, prompts = distributed.gather_rows(pairs).unbind(1)
        # ... and into the scale every row shares in one process only
        scale = model.logit_scale if distributed.is_main() else model.logit_scale.detach()
        logits = scale * features @ prompts.T
        targets = torch.arange(len(logits), device=logits.device)
        return {"flyp_loss": (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2}


def _pairs(model, batch: dict) -> torch.Tensor:
    """[B, 2, E]: each example's features and the embedding of a prompt of its class."""
    # Templates cycle over the positions in the global micro-batch: any number of processes picks the same prompts.
    texts = [model.templates[distributed.unsharded_index(i) % len(model.templates)].format(model.classnames[y])
             for i, y in enumerate(batch["labels"].tolist())]
    features = model.features(batch)
    tokens = {k: v.to(features.device) for k, v in model.tokenize_prompts(texts).items()}
    return torch.stack([features, model.embed_prompts(tokens)], dim=1)


@torch.no_grad()
def _no_pairs(model) -> torch.Tensor:
    """[0, 2, E]: the rows of an empty share under torchrun, which must still join the gather."""
    device = next(model.parameters()).device
    tokens = model.tokenize_prompts([model.templates[0].format(model.classnames[0])])
    one = model.embed_prompts({k: v.to(device) for k, v in tokens.items()})  # gives E and the dtype
    return one.new_zeros((0, 2, one.shape[1]))
