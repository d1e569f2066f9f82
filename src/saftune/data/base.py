"""The two data types every layer agrees on: a `Split` of labelled examples and a `Benchmark`.

A benchmark is one task (class names + prompt templates) with a few-shot training set, a validation
set carved from the training pool (for choosing hyperparameters), a fixed in-distribution test set and
any number of out-of-distribution test sets. An OOD set may use its own class names and templates
(cross-dataset transfer) or a subset of the benchmark's classes (ImageNet-A/R: 200 of 1000).

Example:
    >>> s = Split("toy", ["good", "bad"], [1, 0])
    >>> b = Benchmark("toy", "text", ["negative", "positive"], ["a {} review."], s, s, s, {"other": s})
    >>> b.prompts()
    [['a negative review.'], ['a positive review.']]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Split:
    """Labelled examples.

    Attributes:
        name: what the split is ("movies/test", "tweets", "imagenet-a", ...).
        inputs: one entry per example: `str` text, a `pathlib.Path` to an image file, or an image array
            (H x W or H x W x C, uint8).
        labels: class index per example, into `classnames` (or into the benchmark's class names).
        classnames: this split's own class names (cross-dataset transfer); None: the benchmark's.
        templates: this split's own prompt templates; None: the benchmark's.
        class_subset: indices of the benchmark classes this split uses, in label order (ImageNet-A/R);
            evaluation keeps only those logits. None: all classes.
    """

    name: str
    inputs: Sequence
    labels: Sequence[int]
    classnames: list[str] | None = None
    templates: list[str] | None = None
    class_subset: list[int] | None = None

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.inputs) != len(self.labels):
            raise ValueError(f"split {self.name!r}: {len(self.inputs)} inputs but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int], name: str | None = None) -> Split:
        """The examples at `indices`, keeping class names, templates and class subset."""
        indices = np.asarray(indices, dtype=np.int64)
        inputs = self.inputs[indices] if isinstance(self.inputs, np.ndarray) else [self.inputs[i] for i in indices]
        return Split(name or self.name, inputs, self.labels[indices], self.classnames, self.templates, self.class_subset)

    def class_counts(self, num_classes: int | None = None) -> np.ndarray:
        """Number of examples per class."""
        return np.bincount(self.labels, minlength=num_classes or 0)


@dataclass
class Benchmark:
    """One task with its training, validation, ID test and OOD test sets.

    Attributes:
        name: registry name ("sentiment-domains").
        modality: "text" or "image".
        classnames: class names, in label order.
        templates: prompt templates with one "{}" each, averaged for the zero-shot head.
        train, val, test: few-shot training set, validation set (from the training pool, disjoint from
            train), fixed in-distribution test set.
        ood: name -> out-of-distribution test split.
        info: provenance and protocol (source, shots, seed, binarisation, ...), recorded with results.
    """

    name: str
    modality: str
    classnames: list[str]
    templates: list[str]
    train: Split
    val: Split
    test: Split
    ood: dict[str, Split] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def prompts(self, split: Split | None = None) -> list[list[str]]:
        """Prompt texts per class (templates x class names) for the benchmark or one split."""
        classnames = (split.classnames if split is not None and split.classnames else None) or self.classnames
        templates = (split.templates if split is not None and split.templates else None) or self.templates
        return [[t.format(c) for t in templates] for c in classnames]

    def eval_splits(self) -> dict[str, Split]:
        """The ID test split (key "id") followed by the OOD splits."""
        return {"id": self.test, **self.ood}
