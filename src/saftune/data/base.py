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
    >>> b.validate()    # raises ValueError on data that cannot be trained or scored (see `check_split`)
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

    def eval_sizes(self) -> dict[str, int]:
        """Examples per evaluated split: "id" and each OOD set by name (as results record them)."""
        return {k: len(v) for k, v in self.eval_splits().items()}

    def validate(self) -> None:
        """Refuse a benchmark that cannot be trained or scored; cheap, so runs call it before any model loads.

        Raises:
            ValueError: naming the dataset, the split and the class: bad class names, an empty split,
                labels outside the class names, a class without a training example, or a training split
                with classes of its own (training always uses the benchmark's classes).
        """
        check_classnames(self.classnames, f"dataset {self.name!r}")
        own = self.train.classnames
        if (own and list(own) != list(self.classnames)) or self.train.class_subset is not None:
            raise ValueError(
                f"training split {self.train.name!r} of dataset {self.name!r} sets classes of its own; training "
                f"uses the dataset's classes ({_preview(self.classnames)}), so leave its classnames and "
                "class_subset unset"
            )
        check_split(self.train, self.classnames, role="training", dataset=self.name)
        check_split(self.val, self.classnames, role="validation", dataset=self.name)
        check_split(self.test, self.classnames, role="ID test", dataset=self.name)
        for split in self.ood.values():
            check_split(split, self.classnames, role="OOD test", dataset=self.name)


def _preview(names: Sequence, limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... {len(names)} in all" if len(names) > limit else "")


def check_classnames(classnames: Sequence[str], where: str) -> None:
    """Refuse class names a prompt head cannot use: none at all, a blank or non-text name, a name used twice.

    Example:
        >>> check_classnames(["cat", "cat"], "dataset 'pets'")
        Traceback (most recent call last):
        ...
        ValueError: dataset 'pets': classes 0 and 1 are both named 'cat'; class names must be distinct (equal names give equal zero-shot heads)
    """
    if not classnames:
        raise ValueError(f"{where} has no class names; give one name per class, in label order")
    first: dict[str, int] = {}
    for i, name in enumerate(classnames):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{where}: class {i} is named {name!r}; every class needs a non-empty name "
                             "(it goes into the prompts)")
        if name in first:
            raise ValueError(f"{where}: classes {first[name]} and {i} are both named {name!r}; class names must be "
                             "distinct (equal names give equal zero-shot heads)")
        first[name] = i


def check_split(split: Split, classnames: Sequence[str], *, role: str = "evaluation",
                dataset: str | None = None) -> None:
    """Refuse a split that cannot be trained or scored, with a message naming it and what to change.

    Labels must index the split's classes: its own `classnames` (cross-dataset transfer), else
    `classnames`, narrowed to `class_subset` when set (label i is class `class_subset[i]`). Every split
    needs examples. A training split (`role="training"`) also needs an example of every class: a class
    the model never sees is a mistake in the data, not a few-shot setting. An evaluation split may miss
    classes (an OOD set often does); accuracy is still defined.

    Args:
        split: the split to check.
        classnames: the benchmark's class names (or the model's, in `fit`).
        role: "training", or what the split is for the message ("validation", "OOD test", ...).
        dataset: the dataset's name, for the message.

    Example:
        >>> check_split(Split("movies/train", ["good", "fine"], [1, 1]), ["negative", "positive"], role="training")
        Traceback (most recent call last):
        ...
        ValueError: training split 'movies/train' has no example of class 'negative' (label 0); every class needs at least one training example: add examples of it, or remove it from the class names
    """
    where = f"{role} split {split.name!r}" + (f" of dataset {dataset!r}" if dataset else "")
    names = list(split.classnames or classnames)
    check_classnames(names, where)
    if split.class_subset is not None:
        subset = list(split.class_subset)
        valid = all(isinstance(c, (int, np.integer)) and 0 <= c < len(names) for c in subset)
        if not valid or len(set(subset)) != len(subset):
            raise ValueError(f"{where}: class_subset {subset[:10]} must list distinct class indices in "
                             f"0..{len(names) - 1}")
        names = [names[c] for c in subset]
    if len(split) == 0:
        todo = ("check the dataset's files and its shots option" if role == "training" else
                "check the dataset's files and its size options (max_test, max_ood, val_per_class, val_shots, ...)")
        raise ValueError(f"{where} is empty; {todo}")
    labels = np.asarray(split.labels)
    outside = np.unique(labels[(labels < 0) | (labels >= len(names))])
    if outside.size:
        raise ValueError(
            f"{where} has labels {outside[:5].tolist()} outside 0..{len(names) - 1}: its {len(names)} class names "
            f"({_preview(names)}) do not match the labels; give one class name per label, in label order"
        )
    if role == "training":
        missing = np.flatnonzero(np.bincount(labels, minlength=len(names)) == 0)
        if missing.size:
            listed = ", ".join(f"class {names[c]!r} (label {c})" for c in missing[:5])
            more = f" and {missing.size - 5} more classes" if missing.size > 5 else ""
            raise ValueError(
                f"{where} has no example of {listed}{more}; every class needs at least one training "
                "example: add examples of it, or remove it from the class names"
            )
