"""Metrics the papers report: top-1 accuracy, average OOD accuracy, base/new harmonic mean.

Example:
    >>> import torch
    >>> top1(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]))
    0.5
    >>> round(harmonic_mean(0.8, 0.6), 4)
    0.6857
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of examples whose highest logit is the label."""
    if labels.numel() == 0:
        raise ValueError("top1 of an empty split is undefined")
    return float((logits.argmax(-1) == labels).float().mean())


def harmonic_mean(base: float, new: float) -> float:
    """2 * base * new / (base + new): the base-to-new summary (0 when both are 0)."""
    return 2 * base * new / (base + new) if base + new > 0 else 0.0


def average_ood(metrics: Mapping[str, float]) -> float:
    """Mean of the `ood/<name>` accuracies (each OOD set counts once, whatever its size)."""
    values = [v for k, v in metrics.items() if k.startswith("ood/")]
    if not values:
        raise ValueError("no ood/<name> entries to average")
    return sum(values) / len(values)


def project_logits(logits: torch.Tensor, class_subset) -> torch.Tensor:
    """Keep the logits of a class subset, in subset order (ImageNet-A/R: 200 of the 1000 classes)."""
    return logits if class_subset is None else logits[:, torch.as_tensor(class_subset, device=logits.device)]
