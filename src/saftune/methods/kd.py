"""`kd`: distillation to the frozen pretrained model: fine-tune while staying close to what it computed.

The teacher is a frozen copy of the pretrained model (eval mode, no gradients). What "close" means
depends on the model:

* encoders and CLIP-style dual encoders (feature distillation): penalty = strength * mean ||f(x) - f0(x)||^2
  over the batch's input features ("image") and, for dual encoders, over the class embeddings ("text");
* causal LMs (logit distillation, as Lin et al. compare it): penalty = strength * KL(p0 || p), the KL
  divergence from the teacher's next-token distribution p0 to the student's p at every answer position
  (the positions the SFT loss scores), averaged per example over its answer tokens, then over the batch
  (the SFT loss's weighting). Vocabulary logits are formed only at those positions, for both models.

Example:
    >>> from saftune.methods import create_method
    >>> create_method("kd", strength="0.5").config.strength
    0.5
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from saftune.config import option
from saftune.methods.base import Method, MethodConfig, register_method
from saftune.models.causal_lm import CausalLM
from saftune.models.zero_shot import DualEncoderClassifier


@dataclass
class DistillationConfig(MethodConfig):
    strength: float = option(1.0, "weight of the distillation penalty: feature distance (encoders, CLIP) or "
                             "next-token KL (causal LMs)", low=0.0)
    targets: list[str] = option(help="encoders and CLIP: features to distil, image (inputs) and/or text (class "
                                "embeddings); causal LMs ignore it", choices=("image", "text"),
                                default_factory=lambda: ["image", "text"])



def per_example_mean(values: torch.Tensor, rows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Mean of `values` [N] per batch row (`rows` [N]) -> [batch_size]; every row must have a value.

    Example:
        >>> per_example_mean(torch.tensor([1.0, 3.0, 5.0]), torch.tensor([0, 0, 1]), 2)
        tensor([2., 5.])
    """
    totals = values.new_zeros(batch_size).index_add(0, rows, values)
    counts = torch.bincount(rows, minlength=batch_size).to(values.dtype)
    if bool((counts == 0).any()):
        raise ValueError("a batch row has no answer token: build batches with CausalLM.collate (or encode_sft)")
    return totals / counts


def next_token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per position: sum_v p0(v) * (log p0(v) - log p(v)), from logits [N, V] -> [N].

    Zero exactly when the logits are equal; its gradient in the student's logits is p - p0.

    Example:
        >>> logits = torch.tensor([[0.0, 1.0, 2.0]])
        >>> next_token_kl(logits, logits).tolist()
        [0.0]
    """
    student = F.log_softmax(student_logits.float(), dim=-1)
    teacher = F.log_softmax(teacher_logits.float(), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)


@register_method
class Distillation(Method):
    name = "kd"
    config_class = DistillationConfig
    help = ("fine-tuning + distance to the pretrained model: its features (encoders, CLIP) or its next-token "
            "distribution (causal LMs: KL at the answer tokens)")

    def prepare(self, model, context) -> None:
        self.teacher = copy.deepcopy(model).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        super().prepare(model, context)

    def training_step(self, model, batch):
        if isinstance(model, CausalLM):
            return self._logit_distillation(model, batch)
        return self._feature_distillation(model, batch)

    def _logit_distillation(self, model: CausalLM, batch: dict) -> dict[str, torch.Tensor]:
        """SFT loss + strength * KL(teacher || student) at the answer positions, from one student forward pass."""
        ids, mask, targets = batch["input_ids"], batch["attention_mask"], batch["targets"]
        logits, chosen, rows = model.answer_logits(ids, mask, targets)
        with torch.no_grad():
            teacher_logits, _, _ = self.teacher.answer_logits(ids, mask, targets)
        size = ids.shape[0]
        nll = per_example_mean(F.cross_entropy(logits, chosen, reduction="none"), rows, size)
        kl = per_example_mean(next_token_kl(logits, teacher_logits), rows, size)
        return {"ce_loss": nll.mean(), "kd_loss": self.config.strength * kl.mean()}

    def _feature_distillation(self, model, batch: dict) -> dict[str, torch.Tensor]:
        """Cross-entropy + strength * squared distance of the features (and class embeddings) to the teacher's."""
        if isinstance(model, DualEncoderClassifier):
            features = model.features(batch)
            logits = model.logits_from_features(features)
        else:  # heads differ per model family: a second pass gives the features
            logits, features = model(batch), model.features(batch)
        terms = {"ce_loss": F.cross_entropy(logits.float(), batch["labels"])}
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

