"""`flyp`: fine-tune like you pretrain (Goyal et al., 2023): CLIP's contrastive loss on (image, class prompt).

Each example is paired with a prompt of its own class; the loss is CLIP's symmetric cross-entropy over
the batch's image-prompt similarity matrix. Needs a dual encoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

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

    def prepare(self, model, context) -> None:
        require_dual_encoder(model, "flyp")
        super().prepare(model, context)

    def training_step(self, model, batch):
        features = model.features(batch)
        labels = batch["labels"].tolist()
        # one prompt per example; templates cycle over the batch positions
        texts = [model.templates[i % len(model.templates)].format(model.classnames[y]) for i, y in enumerate(labels)]
        tokens = {k: v.to(features.device) for k, v in model.tokenize_prompts(texts).items()}
        prompts = model.embed_prompts(tokens)
        logits = model.logit_scale * features @ prompts.T
        targets = torch.arange(len(labels), device=features.device)
        return {"flyp_loss": (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2}
