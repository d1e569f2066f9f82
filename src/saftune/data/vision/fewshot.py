"""Few-shot sampling (K examples per class, seeded) and the on-disk cache that pins the sample.

Sampling rule: for each class, its examples are ordered by input (file path or text), and K of them
are drawn without replacement with `numpy.random.default_rng([seed, stream, class])`. One random
stream per class means a class's sample does not depend on which other classes exist (the base
classes of a base-to-new split get the same images as in the all-class benchmark), nor on the order
of the split file. A class with fewer than K examples contributes all of them, with a warning.
`stream` separates independent draws from the same pool (0: training shots, 1: validation shots).

The cache is one JSON file per (shots, seed): `split_fewshot/shot_{K}-seed_{S}.json` beside the data
(as CoOp does, but JSON instead of pickle), holding the chosen training and validation images as
`[path relative to the image folder, label, class name]` rows. Every method run on the same data root
reads the same file, so all methods see the same images; deleting it resamples identically.

Example:
    >>> labels = [0, 0, 0, 1, 1, 1, 1]
    >>> idx = few_shot_indices(labels, shots=2, seed=1)
    >>> len(idx), sorted(set(int(labels[i]) for i in idx))
    (4, [0, 1])
    >>> bool((idx == few_shot_indices(labels, shots=2, seed=1)).all())
    True
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from saftune._io import write_json
from saftune.data.base import Split

logger = logging.getLogger(__name__)

CACHE_FORMAT = "saftune.fewshot"
CACHE_VERSION = 1
#: Environment variable for the user cache (default `~/.cache/saftune`), used when the data is read-only.
CACHE_ENV = "SAFTUNE_CACHE"


#: When validation is held out of a full training pool, at most this share of a class goes to it.
HOLDOUT_FRACTION = 0.1


def default_val_shots(shots: int | None) -> int | None:
    """Validation shots per class: min(K, 4) as in CoOp; None (use everything) for full-data training."""
    return None if shots is None else min(int(shots), 4)


def check_shots(shots, field: str = "shots") -> int | None:
    """Validate a shots option: None (all examples) or a positive integer."""
    if shots is None:
        return None
    if isinstance(shots, bool) or int(shots) != shots or int(shots) < 1:
        raise ValueError(f"{field} must be a positive integer or None (all examples), got {shots!r}")
    return int(shots)


def few_shot_indices(
    labels: Sequence[int],
    shots: int,
    seed: int,
    stream: int = 0,
    keys: Sequence | None = None,
    exclude: Sequence[int] | None = None,
    classnames: Sequence[str] | None = None,
    max_fraction: float | None = None,
) -> np.ndarray:
    """Indices of `shots` examples per class, sorted, deterministic given (seed, stream).

    Args:
        labels: class of each example in the pool.
        shots: examples per class (all of a class when it has fewer; logged as a warning).
        seed: sampling seed (CoOp protocol: 1, 2, 3).
        stream: independent draw from the same pool (0 for training shots, 1 for validation shots).
        keys: per-example sort key within a class (file path, text); default: pool order.
        exclude: indices that may not be drawn (e.g. the training shots when carving a validation set).
        classnames: used only to name short classes in the warning.
        max_fraction: take at most this share of each class (rounded down). For holding a validation
            set out of a full training pool: a small class then keeps most of its examples for training.

    Returns:
        Sorted int64 indices into the pool.
    """
    labels = np.asarray(labels, dtype=np.int64)
    shots = check_shots(shots)
    allowed = np.ones(len(labels), dtype=bool)
    if exclude is not None and len(exclude):
        allowed[np.asarray(exclude, dtype=np.int64)] = False
    # Group by class once (argsort) rather than scanning the pool per class: ImageNet has 1.28M x 1000.
    order = np.argsort(labels, kind="stable")
    classes, starts = np.unique(labels[order], return_index=True)
    ends = np.append(starts[1:], len(order))
    chosen, short = [], []
    for c, lo, hi in zip(classes.tolist(), starts.tolist(), ends.tolist()):
        members = order[lo:hi]
        members = members[allowed[members]]
        if keys is not None:
            members = np.asarray(sorted(members.tolist(), key=lambda i: str(keys[i])), dtype=np.int64)
        k = shots if max_fraction is None else min(shots, int(len(members) * max_fraction))
        if len(members) <= k:
            if len(members) < k:
                short.append((c, len(members)))
            chosen.append(members)
            continue
        rng = np.random.default_rng([int(seed), int(stream), int(c)])
        chosen.append(members[rng.choice(len(members), size=k, replace=False)])
    if short:
        names = [f"{c} ({classnames[c]!r}): {n}" if classnames is not None else f"{c}: {n}" for c, n in short[:5]]
        more = f" and {len(short) - 5} more" if len(short) > 5 else ""
        logger.warning(
            "%d classes have fewer than %d examples; using all of them: %s%s", len(short), shots, ", ".join(names), more
        )
    if not chosen:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(chosen)).astype(np.int64)


# ---------------------------------------------------------------------------------------------------
# cache


def user_cache_dir() -> Path:
    """`$SAFTUNE_CACHE`, else `~/.cache/saftune`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "saftune").expanduser()


def is_writable(directory: Path) -> bool:
    # The folder may not exist yet: then its nearest existing parent decides.
    d = directory
    while not d.exists() and d != d.parent:
        d = d.parent
    return os.access(d, os.W_OK)


def cache_filename(shots: int, seed: int, val_shots: int | None) -> str:
    """`shot_{K}-seed_{S}.json` (CoOp's naming), with `-val_{V}` when validation shots are not the default."""
    suffix = "" if val_shots == default_val_shots(shots) else f"-val_{'all' if val_shots is None else val_shots}"
    return f"shot_{shots}-seed_{seed}{suffix}.json"


def cache_candidates(
    dataset_dir: Path, key: str, filename: str, cache_dir: str | os.PathLike | None = None
) -> list[Path]:
    """Where a few-shot cache file may be, in lookup order; the first writable one is where it is written.

    With `cache_dir`: only `cache_dir/<key>/<filename>`. Otherwise `<dataset_dir>/split_fewshot/<filename>`
    (beside the data, like CoOp) then `<user cache>/fewshot/<key>-<hash of dataset_dir>/<filename>`
    (for read-only data).
    """
    if cache_dir is not None:
        return [Path(cache_dir).expanduser() / key / filename]
    # Two copies of a dataset (or two user folders both called "image-folder") must not share a user
    # cache entry: key it by the dataset folder too.
    where = hashlib.sha1(str(Path(dataset_dir).resolve()).encode()).hexdigest()[:8]
    return [Path(dataset_dir) / "split_fewshot" / filename, user_cache_dir() / "fewshot" / f"{key}-{where}" / filename]


@dataclass
class FewShotSample:
    """The training and validation rows of one few-shot draw: `(relative path, label, class name)`."""

    train: list[tuple[str, int, str]]
    val: list[tuple[str, int, str]]


def split_rows(split: Split, image_root: Path) -> list[tuple[str, int, str]]:
    rows = []
    names = split.classnames or []
    for x, y in zip(split.inputs, split.labels.tolist()):
        p = Path(x)
        try:
            rel = p.relative_to(image_root).as_posix()
        except ValueError:  # outside the image folder (unusual); keep the absolute path
            rel = p.as_posix()
        rows.append((rel, int(y), names[y] if y < len(names) and names[y] is not None else ""))
    return rows


def save_fewshot(path: Path, sample: FewShotSample, meta: dict) -> Path:
    """Write a cache file (atomically)."""
    return write_json(
        path,
        {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            **meta,
            "train": [list(r) for r in sample.train],
            "val": [list(r) for r in sample.val],
        },
    )


def load_fewshot(path: Path, meta: dict, classnames: Sequence[str], image_root: Path) -> FewShotSample | None:
    """Read a cache file; None (with a warning) when it does not match `meta`/`classnames` or its images
    are gone, so the caller resamples instead of silently training on a different protocol."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        logger.warning("ignoring unreadable few-shot cache %s (%s); resampling", path, e)
        return None
    if obj.get("format") != CACHE_FORMAT or obj.get("version") != CACHE_VERSION:
        logger.warning("ignoring few-shot cache %s: not a %s v%d file; resampling", path, CACHE_FORMAT, CACHE_VERSION)
        return None
    for k, v in meta.items():
        if obj.get(k) != v:
            logger.warning("ignoring few-shot cache %s: %s is %r, expected %r; resampling", path, k, obj.get(k), v)
            return None
    sample = FewShotSample([tuple(r) for r in obj.get("train", [])], [tuple(r) for r in obj.get("val", [])])
    for rel, label, name in sample.train + sample.val:
        if not (0 <= label < len(classnames)) or (name and classnames[label] != name):
            logger.warning(
                "ignoring few-shot cache %s: label %r / class %r do not match the dataset; resampling",
                path,
                label,
                name,
            )
            return None
        if not (image_root / rel).exists():
            logger.warning("ignoring few-shot cache %s: image %s is missing; resampling", path, image_root / rel)
            return None
    return sample


def rows_to_split(rows: Sequence[tuple[str, int, str]], image_root: Path, name: str) -> Split:
    """A split of image paths from cache rows."""
    return Split(name, [image_root / r for r, _, _ in rows], np.asarray([y for _, y, _ in rows], dtype=np.int64))
