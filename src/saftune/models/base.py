"""`Classifier`: the one interface methods, trainer and evaluation use for every model family.

A classifier turns raw examples (text, image paths, image arrays) into a batch (`collate`), a batch into
logits over the current task's classes (`forward`) and into features (`features`). `set_classes`
switches the task (class names + prompt templates): for dual encoders it rebuilds the zero-shot head;
for models with a trained head it checks the class count. For evaluation, `prepare(examples)` does the
per-example work once (text models tokenize the whole split) and tells each example's length, so the
evaluator can batch examples of similar length together (`PreparedExamples`).

Parameters are grouped into named *scopes* (glob patterns over parameter names): "image" (the input
encoder: the image tower of CLIP, the text encoder of a sentence model applied to the input), "text"
(the prompt encoder), "head" (a classification head). SAFT's scope option and the feature-distillation
method use them.

Example:
    >>> import torch
    >>> batch = {"labels": torch.tensor([0, 1])}
    >>> logits = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    >>> classification_loss_from_logits(logits, batch).shape
    torch.Size([2])
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def collate_images(examples: Sequence, labels, transform) -> dict:
    """Images (paths, PIL images or arrays) -> {"pixel_values" [B, 3, H, W], "labels" [B] if given}."""
    batch = {"pixel_values": torch.stack([transform(x) for x in examples])}
    if labels is not None:
        batch["labels"] = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    return batch


class PreparedExamples:
    """Examples ready to be batched in any order: `batch(indices)` builds what `collate` would.

    `lengths` is each example's cost (tokens) when examples differ in size, None when they do not
    (images of one resolution); the evaluator sorts by it so that batches hold similar lengths and
    carry little padding. The base class keeps the raw examples and calls `collate` per batch.

    Example:
        >>> prepared = PreparedExamples(["a", "b", "c"], lambda xs: {"n": len(xs), "first": xs[0]})
        >>> prepared.batch([2, 0]), prepared.lengths
        ({'n': 2, 'first': 'c'}, None)
    """

    def __init__(self, examples: Sequence, collate, lengths: Sequence[int] | None = None):
        self.examples = examples
        self.collate = collate
        self.lengths = lengths

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, indices: Sequence[int]) -> dict:
        """The evaluation batch of the examples at `indices`, in that order."""
        return self.collate([self.examples[i] for i in indices])


def classification_loss_from_logits(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Per-example cross-entropy against `batch["labels"]`."""
    return F.cross_entropy(logits.float(), batch["labels"], reduction="none")


def classification_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """`loss_fn(model, batch) -> [B]` for `select_mask` and the trainer: per-example cross-entropy.

    A `Classifier` supplies its own task loss (`Classifier.loss`): cross-entropy over its classes, or, for
    a causal LM, the negative log-likelihood of the answer tokens. So every method trains any family.
    """
    if isinstance(model, Classifier):
        return model.loss(batch)
    return classification_loss_from_logits(model(batch), batch)


class Classifier(nn.Module):
    """Base class of every model saftune trains.

    Subclasses set `modality` ("text" | "image"), `scopes` and implement `collate`, `features`,
    `forward` and `set_classes`.
    """

    modality: str = "text"
    scopes: dict[str, list[str]] = {}

    def __init__(self):
        super().__init__()
        self.classnames: list[str] = []
        self.templates: list[str] = ["{}"]

    # -- data -----------------------------------------------------------------------------------
    def collate(self, examples: Sequence, labels: Sequence[int] | None = None, *, train: bool = False) -> dict:
        """Raw examples (and labels) -> a batch dict of tensors; `train` enables augmentation."""
        raise NotImplementedError

    def prepare(self, examples: Sequence) -> PreparedExamples:
        """Examples made ready for evaluation batches (default: `collate` per batch; texts report characters).

        Text models override it to tokenize every example once and report token counts.
        """
        # Texts without a tokenizer-aware `prepare`: characters are a fair proxy of their length.
        lengths = [len(x) for x in examples] if self.modality == "text" else None
        return PreparedExamples(examples, self.collate, lengths)

    # -- model ----------------------------------------------------------------------------------
    def check_training_split(self, split) -> None:
        """Refuse a training split this model cannot learn from (`saftune.data.base.check_split`), before any work."""
        from saftune.data.base import check_split

        check_split(split, self.classnames, role="training")

    def features(self, batch: dict) -> torch.Tensor:
        """Input features [B, E] (normalised for dual encoders)."""
        raise NotImplementedError

    def set_classes(self, classnames: Sequence[str], templates: Sequence[str] | None = None) -> None:
        """Switch to a task: class names in label order and prompt templates with one "{}" each."""
        if not classnames:
            raise ValueError("set_classes needs at least one class name")
        for t in templates or ["{}"]:
            if t.count("{}") != 1:
                raise ValueError(f"prompt template {t!r} must contain exactly one '{{}}' for the class name")
        self.classnames = list(classnames)
        self.templates = list(templates or ["{}"])

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def loss(self, batch: dict) -> torch.Tensor:
        """Per-example training loss [B] of a batch from `collate` (cross-entropy over the classes)."""
        return classification_loss_from_logits(self(batch), batch)

    def linear_head(self) -> nn.Linear:
        """The linear layer mapping `features(batch)` to logits (what a linear probe trains)."""
        raise ValueError(f"{type(self).__name__} has no linear head on its features; linear probing is not available")

    # -- parameters -----------------------------------------------------------------------------
    def scope_patterns(self, scope: str) -> list[str] | None:
        """Glob patterns of a scope ("all" -> None, meaning every parameter)."""
        if scope == "all":
            return None
        if scope not in self.scopes:
            raise ValueError(f"scope {scope!r} is not defined for {type(self).__name__}; choose from all, {', '.join(self.scopes)}")
        return self.scopes[scope]

    def scope_parameters(self, scope: str) -> dict[str, nn.Parameter]:
        """name -> parameter for the parameters in a scope."""
        patterns = self.scope_patterns(scope)
        return {
            n: p for n, p in self.named_parameters()
            if patterns is None or any(fnmatch.fnmatchcase(n, pat) for pat in patterns)
        }

    def describe(self) -> dict:
        """JSON-able facts recorded with results (type, parameter count, classes)."""
        return {
            "type": type(self).__name__,
            "parameters": sum(p.numel() for p in self.parameters()),
            "classes": len(self.classnames),
        }
