"""Base-to-new generalisation (CoCoOp protocol): train on the first half of the classes, test on both.

Classes are taken in label order; the first ceil(n/2) are "base", the rest "new". Labels are
renumbered within each half (base class 0..m-1, new class 0..n-m-1), and each half is a separate
classification problem with its own class names.

`subsample="base"` gives the benchmark to train: train/val/test on the base classes and one OOD split,
"new", holding the new classes' test images with the new class names. `subsample="new"` puts every
split on the new classes (to score a model on them alone); `"all"` leaves the benchmark as it is.

Example:
    >>> base_new_classes(5)
    ([0, 1, 2], [3, 4])
    >>> from saftune.data.base import Split
    >>> s = Split("t", ["a", "b", "c", "d"], [0, 3, 4, 1])
    >>> part = select_classes(s, [3, 4], classnames=["d", "e"])
    >>> list(part.inputs), part.labels.tolist(), part.classnames
    (['b', 'c'], [0, 1], ['d', 'e'])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from saftune.data.base import Benchmark, Split

SUBSAMPLE_CHOICES = ("all", "base", "new")


def base_new_classes(num_classes: int) -> tuple[list[int], list[int]]:
    """(base, new) class indices: the first ceil(n/2) classes, then the rest."""
    m = math.ceil(num_classes / 2)
    return list(range(m)), list(range(m, num_classes))


def select_classes(
    split: Split, classes: Sequence[int], classnames: list[str] | None = None, name: str | None = None
) -> Split:
    """The examples of `classes`, relabelled to their position in `classes`.

    Args:
        split: the split to filter.
        classes: kept class indices; class `classes[i]` becomes label i.
        classnames: the split's own class names after relabelling (None: the benchmark's).
        name: new split name (default: unchanged).
    """
    classes = np.asarray(classes, dtype=np.int64)
    lookup = np.full(int(max(classes.max(initial=-1), split.labels.max(initial=-1))) + 1, -1, dtype=np.int64)
    lookup[classes] = np.arange(len(classes))
    keep = np.flatnonzero(lookup[split.labels] >= 0)
    sub = split.subset(keep, name)
    return replace(sub, labels=lookup[sub.labels], classnames=classnames, class_subset=None)


def subsample_classes(benchmark: Benchmark, subsample: str = "all") -> Benchmark:
    """Apply the base-to-new protocol to a benchmark (see the module docstring).

    Raises:
        ValueError: unknown `subsample`, or a benchmark with OOD splits (their classes would not match).
    """
    if subsample not in SUBSAMPLE_CHOICES:
        raise ValueError(f"subsample must be one of {', '.join(SUBSAMPLE_CHOICES)}, got {subsample!r}")
    if subsample == "all":
        return benchmark
    if benchmark.ood:
        raise ValueError(f"subsample={subsample!r} applies to a single dataset, but {benchmark.name!r} has OOD splits")
    base, new = base_new_classes(len(benchmark.classnames))
    keep = base if subsample == "base" else new
    names = [benchmark.classnames[c] for c in keep]
    tag = f"{benchmark.name}/{subsample}"
    ood = {}
    if subsample == "base":
        new_names = [benchmark.classnames[c] for c in new]
        ood["new"] = select_classes(benchmark.test, new, classnames=new_names, name=f"{benchmark.name}/new")
    info = {**benchmark.info, "subsample": subsample, "base_classes": base, "new_classes": new}
    return replace(
        benchmark,
        name=tag,
        classnames=names,
        train=select_classes(benchmark.train, keep, name=f"{tag}/train"),
        val=select_classes(benchmark.val, keep, name=f"{tag}/val"),
        test=select_classes(benchmark.test, keep, name=f"{tag}/test"),
        ood=ood,
        info=info,
    )
