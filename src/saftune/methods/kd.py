"""`kd`: feature distillation: fine-tune while keeping features close to the frozen pretrained model's.

penalty = weight * mean ||f(x) - f0(x)||^2 over the batch's input features ("image") and, for dual
encoders, over the class embeddings ("text"). The teacher is a frozen copy of the pretrained model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from saftune.config import option
from saftune.methods.base import Method, MethodConfig, register_method
from saftune.models.zero_shot import DualEncoderClassifier


@dataclass
class FeatureDistillationConfig(MethodConfig):
    strength: float = option(1.0, "weight of the feature-distance penalty", low=0.0)
    targets: list[str] = option(help="features to distil: image (inputs) and/or text (class embeddings)",
                                choices=("image", "text"), default_factory=lambda: ["image", "text"])


@register_method
class FeatureDistillation(Method):
    name = "kd"
    config_class = FeatureDistillationConfig
    help = "fine-tuning + distance to the pretrained model's features (feature distillation)"

    def prepare(self, model, context) -> None:
        self.teacher = copy.deepcopy(model).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        super().prepare(model, context)

    def training_step(self, model, batch):
        if isinstance(model, DualEncoderClassifier):
            features = model.features(batch)
            logits = model.logits_from_features(features)
        else:  # heads differ per model family: a second pass gives the features
            logits, features = model(batch), model.features(batch)
        terms = {"ce_loss": torch.nn.functional.cross_entropy(logits.float(), batch["labels"])}
        penalty = features.new_zeros((), dtype=torch.float32)
        if "image" in self.config.targets:
            with torch.no_grad():
                teacher_features = self.teacher.features(batch)
            penalty = penalty + (features.float() - teacher_features.float()).square().sum(-1).mean()
        if "text" in self.config.targets and isinstance(model, DualEncoderClassifier) and model.head is None:
            with torch.no_grad():
                teacher_classes = self.teacher.class_embeddings()
            penalty = penalty + (model.class_embeddings() - teacher_classes).square().sum(-1).mean()
        terms["kd_loss"] = self.config.strength * penalty
        return terms
