"""`lp`: a linear probe on frozen features; the probe itself is shared with `lpft` (methods/lpft.py).

The probe is fit on features computed once (no augmentation), full batch, with AdamW: the standard
recipe of the LP-FT paper (Kumar et al., 2022), which uses logistic regression. For CLIP-style models
the head starts from the zero-shot head (logit_scale * class embeddings), so the probe begins at the
zero-shot classifier.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from saftune import distributed
from saftune._io import atomic_path
from saftune.config import option
from saftune.methods.base import Method, MethodConfig, register_method
from saftune.models.zero_shot import DualEncoderClassifier
from saftune.results import ResultError, ensure_head, write_result_config

logger = logging.getLogger(__name__)


@torch.no_grad()
def extract_features(model, batches, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [N, width] and labels of every batch, in eval mode.

    Under torchrun each process extracts its share of the batches (`distributed.shard`) and every
    process gets all of them, in another order than a single process's (harmless to a full-batch fit).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # a process without a batch (fewer batches than processes) still joins the gathers, with no rows
    feats = [torch.zeros(0, width, device=device)]
    labels = [torch.zeros(0, dtype=torch.int64, device=device)]
    for batch in distributed.shard(batches):
        feats.append(model.features(batch).float())
        labels.append(batch["labels"])
    model.train(was_training)
    return distributed.gather_rows(torch.cat(feats)), distributed.gather_rows(torch.cat(labels))


def fit_probe(head: torch.nn.Linear, features: torch.Tensor, labels: torch.Tensor, *, steps: int, lr: float,
              weight_decay: float) -> float:
    """Full-batch AdamW on the head's cross-entropy; returns the final training loss."""
    head.weight.requires_grad_(True)
    if head.bias is not None:
        head.bias.requires_grad_(True)
    params = [p for p in head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    features = features.to(head.weight.device, head.weight.dtype)
    labels = labels.to(head.weight.device)
    loss = torch.tensor(float("nan"))
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            loss = F.cross_entropy(head(features), labels)
            loss.backward()
            optimizer.step()
    return float(loss.detach())


@dataclass
class LinearProbeConfig(MethodConfig):
    probe_steps: int = option(300, "full-batch AdamW steps of the probe", low=1)
    probe_lr: float = option(1e-3, "learning rate of the probe", low=0.0, low_open=True)
    probe_weight_decay: float = option(0.0, "weight decay of the probe (towards zero)", low=0.0)


def probe(model, context, config: LinearProbeConfig) -> list[str]:
    """Fit the model's linear head on frozen features; return the head's parameter names."""
    head = model.linear_head()
    features, labels = extract_features(model, context.batches(), width=head.in_features)
    loss = fit_probe(head, features, labels, steps=config.probe_steps, lr=config.probe_lr,
                     weight_decay=config.probe_weight_decay)
    logger.info("linear probe: %d features of dim %d, final loss %.4f", len(labels), features.shape[1], loss)
    return [n for n, p in model.named_parameters() if any(p is q for q in head.parameters())]


@register_method
class LinearProbe(Method):
    name = "lp"
    config_class = LinearProbeConfig
    help = "linear probe on frozen features (head initialised from the zero-shot head)"
    trains = False
    result_kind = "partial_weights"  # only the trained tensors (the head): the rest is the base model's
    result_files = ("weights.safetensors",)

    def prepare(self, model, context) -> None:
        self._head_names = probe(model, context, self.config)
        for p in model.parameters():  # everything stays frozen for the (empty) training loop
            p.requires_grad_(False)
        if isinstance(model, DualEncoderClassifier):
            model.freeze_prompt_side()

    def trainable_parameters(self, model):
        return []

    def num_trainable(self, model) -> int:
        return sum(p.numel() for n, p in model.named_parameters() if n in self._head_names)

    def save_result(self, model, directory: Path, info: dict) -> Path:
        params = dict(model.named_parameters())
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / "weights.safetensors") as tmp:
            save_file({n: params[n].detach().contiguous().cpu() for n in self._head_names}, str(tmp))
        return write_result_config(directory, self.result_kind, {**info, "tensors": sorted(self._head_names)}).parent

    @staticmethod
    def apply_result(model, directory: Path, config: dict, *, merge: bool = False) -> None:
        tensors = load_file(str(Path(directory) / "weights.safetensors"))
        ensure_head(model, tensors)
        missing = [n for n in tensors if n not in dict(model.named_parameters())]
        if missing:
            raise ResultError(f"the saved tensors {missing[:3]} are not parameters of this model")
        model.load_state_dict(tensors, strict=False)
