"""Deterministic, class-balanced index selection shared by the embedded benchmarks.

The protocol every embedded benchmark follows:

* a fixed in-distribution test set, class-balanced, drawn once with a constant seed (`fixed_balanced`):
  it never changes with the run seed, so results of different seeds are comparable;
* the rest is the training pool; from it `few_shot` draws, per class and with the run seed, a validation
  set and a K-shot training set, disjoint. Both come from one permutation per class: validation first,
  then training, so the validation set does not depend on K and the K-shot sets are nested
  (the 4-shot set of seed 1 is inside its 16-shot set);
* evaluation sets can be shrunk for quick runs with `fixed_balanced` too (a constant seed again).

All functions return sorted int64 indices into the `labels` they were given.

Example:
    >>> labels = np.array([0, 1] * 10)
    >>> train, val = few_shot(labels, shots=2, val_per_class=3, seed=1)
    >>> np.bincount(labels[train]).tolist(), np.bincount(labels[val]).tolist()
    ([2, 2], [3, 3])
    >>> set(train) & set(val)
    set()
"""

from __future__ import annotations

import numpy as np


def _check_count(name: str, value, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        allowed = "a non-negative int or None" if allow_none else "a non-negative int"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def few_shot(labels: np.ndarray, shots: int | None, val_per_class: int, seed: int,
             num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a K-shot training set and a validation set, per class, chosen by `seed`.

    Args:
        labels: class index per pool example.
        shots: training examples per class; None: every pool example not in the validation set.
        val_per_class: validation examples per class (0 for none).
        seed: the run seed; the same seed always gives the same indices.
        num_classes: number of classes (default: max label + 1); every class must have enough examples.

    Raises:
        ValueError: a class has fewer than `val_per_class + shots` examples (the message names it).

    Example:
        >>> labels = np.array([0, 0, 0, 1, 1, 1])
        >>> train, val = few_shot(labels, shots=1, val_per_class=1, seed=3)
        >>> labels[train].tolist(), np.array_equal(train, few_shot(labels, 1, 1, seed=3)[0])
        ([0, 1], True)
    """
    _check_count("shots", shots)
    _check_count("val_per_class", val_per_class, allow_none=False)
    labels = np.asarray(labels)
    num_classes = num_classes or int(labels.max()) + 1
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in range(num_classes):
        members = rng.permutation(np.flatnonzero(labels == c))
        need = val_per_class + (shots or 0)
        if len(members) < need or (shots is None and len(members) <= val_per_class):
            raise ValueError(f"class {c} has {len(members)} pool examples; {val_per_class} for validation "
                             f"+ {shots if shots is not None else 'at least 1'} shots needed")
        val.append(members[:val_per_class])
        train.append(members[val_per_class:] if shots is None else members[val_per_class:need])
    return np.sort(np.concatenate(train)).astype(np.int64), np.sort(np.concatenate(val)).astype(np.int64)


def fixed_balanced(labels: np.ndarray, per_class: int | None, seed: int,
                   num_classes: int | None = None) -> np.ndarray:
    """Up to `per_class` examples of each class, chosen with a fixed `seed` (None: all examples).

    A class with fewer examples contributes all of them, so the result is balanced whenever it can be.

    Example:
        >>> fixed_balanced(np.array([0, 0, 0, 1]), per_class=2, seed=0).size
        3
    """
    _check_count("per_class", per_class)
    labels = np.asarray(labels)
    if per_class is None:
        return np.arange(len(labels), dtype=np.int64)
    num_classes = num_classes or int(labels.max()) + 1
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(num_classes)]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def subsample(labels: np.ndarray, max_size: int | None, seed: int, num_classes: int | None = None) -> np.ndarray:
    """At most `max_size` indices, class-balanced (`max_size // num_classes` per class), fixed by `seed`.

    For quick runs: an evaluation set no larger than `max_size` is returned whole.

    Example:
        >>> subsample(np.array([0] * 8 + [1] * 2), max_size=4, seed=0).size
        4
        >>> subsample(np.array([0, 1]), max_size=None, seed=0).tolist()
        [0, 1]
    """
    _check_count("max_size", max_size)
    labels = np.asarray(labels)
    if max_size is None or len(labels) <= max_size:
        return np.arange(len(labels), dtype=np.int64)
    num_classes = num_classes or int(labels.max()) + 1
    return fixed_balanced(labels, max_size // num_classes, seed, num_classes)
