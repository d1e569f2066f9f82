"""Evaluation: ID + OOD accuracy as flat metrics, and the metrics the papers report."""

from saftune.eval.evaluate import evaluate, evaluate_split, predict
from saftune.eval.metrics import average_ood, harmonic_mean, project_logits, top1

__all__ = ["average_ood", "evaluate", "evaluate_split", "harmonic_mean", "predict", "project_logits", "top1"]
