"""From a dataset's full splits to a few-shot `Benchmark` (CoOp protocol), shared by every image suite.

A `DatasetSource` describes one local dataset before sampling: class names, default templates, and
loaders for the full training pool, the validation pool (if the dataset has one) and the test set.
Loaders are functions so that nothing is listed until needed: with a cached few-shot sample, ImageNet's
1.28M training files are never scanned.

`build_benchmark(source, shots=16, seed=1)`:

* train: `shots` images per class from the training pool (`fewshot.few_shot_indices`, stream 0);
* val: `val_shots` per class (default min(shots, 4), as CoOp) from the dataset's validation split;
  datasets without one (ImageNet) carve it from the training pool, disjoint from the training shots
  (CoOp reuses ImageNet's test set as validation; saftune keeps validation and test apart);
* the sample is cached as JSON (see `fewshot`) and reused by every later run;
* `shots=None` trains on the whole pool (full fine-tuning): val is the whole validation split, or
  `val_shots` (default 4) per class held out of the pool (at most 10% of a class);
* test: the fixed test split; `subsample` applies the base-to-new protocol (`base2new`).

Example:
    >>> import tempfile, pathlib
    >>> from PIL import Image
    >>> from saftune.data.base import Split
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> files = []
    >>> for i in range(12):
    ...     Image.new("RGB", (4, 4)).save(d / f"{i}.png"); files.append(d / f"{i}.png")
    >>> pool = Split("toy/train", files, [i % 2 for i in range(12)])
    >>> src = DatasetSource("toy", ["cat", "dog"], ["a photo of a {}."], d, d,
    ...                     load_train=lambda: pool, load_val=None, load_test=lambda: pool)
    >>> b = build_benchmark(src, shots=2, seed=1)
    >>> len(b.train), len(b.val), (d / "split_fewshot" / "shot_2-seed_1.json").exists()
    (4, 4, True)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from saftune.config import Config, option
from saftune.data.base import Benchmark, Split
from saftune.data.templates import KINDS, check_template, templates_for
from saftune.data.vision import fewshot
from saftune.data.vision.base2new import SUBSAMPLE_CHOICES, subsample_classes

logger = logging.getLogger(__name__)


@dataclass
class FewShotOptions(Config):
    """Options every local image suite shares: where the data is and the few-shot protocol.

    Example:
        >>> FewShotOptions.from_dict({"shots": "none", "root": "/data"}).sampling()["shots"] is None
        True
    """

    root: str | None = option(None, "data root holding the dataset folders (default $SAFTUNE_DATA)")
    shots: int | None = option(16, "training images per class (CoOp protocol); none: the whole training set",
                               low=1)
    seed: int = option(1, "few-shot sampling seed (the papers average seeds 1, 2, 3)", low=0)
    val_shots: int | None = option(None, "validation images per class (default min(shots, 4); with shots=none "
                                   "the whole validation split, or 4 per class held out of the training set)", low=1)
    templates: str | list[str] | None = option(None, "prompt templates: single | openai | openai-7 | a list of "
                                               "templates with {}; default: the dataset's own")
    cache_dir: str | None = option(None, "folder for the few-shot sample file (default: beside the data, or "
                                   "$SAFTUNE_CACHE when the data is read-only)")

    def sampling(self) -> dict:
        """The keyword arguments of `build_benchmark` these options set."""
        return {"shots": self.shots, "seed": self.seed, "val_shots": self.val_shots, "templates": self.templates,
                "cache_dir": self.cache_dir}


@dataclass
class SubsampleOptions(FewShotOptions):
    """`FewShotOptions` plus the base-to-new protocol, for single-dataset suites."""

    subsample: str = option("all", "base-to-new protocol: all classes, or train and test on the base (first half) "
                            "or new classes", choices=SUBSAMPLE_CHOICES)

    def sampling(self) -> dict:
        return {**super().sampling(), "subsample": self.subsample}


@dataclass
class DatasetSource:
    """One local image dataset before few-shot sampling.

    Attributes:
        name: registry name ("oxford-pets"); also names the splits and the templates lookup.
        classnames: readable class names in label order.
        templates: default prompt templates.
        dataset_dir: the dataset's folder (the few-shot cache goes in its `split_fewshot/`).
        image_root: folder the image paths are relative to in split and cache files.
        load_train: () -> the full training pool.
        load_val: () -> the validation pool, or None when the dataset has none (carved from train).
        load_test: () -> the fixed test split.
        info: provenance recorded in `Benchmark.info` (split file, layout, ...).
    """

    name: str
    classnames: list[str]
    templates: list[str]
    dataset_dir: Path
    image_root: Path
    load_train: Callable[[], Split]
    load_val: Callable[[], Split] | None
    load_test: Callable[[], Split]
    info: dict = field(default_factory=dict)


# registry name -> (root -> DatasetSource); cross-dataset transfer looks sources up here.
_SOURCES: dict[str, Callable[..., DatasetSource]] = {}


def register_source(name: str):
    """Decorator: register `factory(root) -> DatasetSource` under the dataset's registry name."""

    def wrap(factory):
        _SOURCES[name] = factory
        return factory

    return wrap


def source_names() -> list[str]:
    """Registry names of the datasets that have a source (ImageNet and the CoOp datasets)."""
    return list(_SOURCES)


def get_source(name: str, root=None) -> DatasetSource:
    """The `DatasetSource` of a registered image dataset."""
    if name not in _SOURCES:
        raise ValueError(f"unknown image dataset {name!r}; known: {', '.join(_SOURCES)}")
    return _SOURCES[name](root)


def resolve_templates(dataset_name: str, templates: str | Sequence[str]) -> list[str]:
    """A templates option: a kind ("single", "openai", "openai-7") or an explicit list of templates."""
    if isinstance(templates, str):
        if templates in KINDS:
            return templates_for(dataset_name, templates)
        if "{}" not in templates:
            raise ValueError(
                f"templates must be one of {', '.join(KINDS)}, a template with '{{}}' or a list, got {templates!r}"
            )
        return [check_template(templates)]
    templates = [check_template(t) for t in templates]
    if not templates:
        raise ValueError("templates must not be empty")
    return templates


def check_seed(seed) -> int:
    if isinstance(seed, bool) or int(seed) != seed or int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def check_options(shots=16, seed=1, subsample="all", val_shots=None) -> None:
    """Validate the protocol options before any file is read, with messages naming the option."""
    fewshot.check_shots(shots)
    check_seed(seed)
    fewshot.check_shots(val_shots, "val_shots")
    if subsample not in SUBSAMPLE_CHOICES:
        raise ValueError(f"subsample must be one of {', '.join(SUBSAMPLE_CHOICES)}, got {subsample!r}")


def _draw(split: Split, k: int, seed: int, stream: int, exclude=None, max_fraction=None) -> np.ndarray:
    """`k` per class from `split` (see `fewshot.few_shot_indices`), ordered by file path within a class."""
    return fewshot.few_shot_indices(
        split.labels, k, seed, stream=stream, keys=split.inputs, exclude=exclude,
        classnames=split.classnames, max_fraction=max_fraction,
    )  # fmt: skip


def _sample(source: DatasetSource, shots: int, seed: int, val_shots: int | None) -> fewshot.FewShotSample:
    """Draw the training and validation shots (no cache involved)."""
    pool = replace(source.load_train(), classnames=source.classnames)
    train_idx = _draw(pool, shots, seed, stream=0)
    if source.load_val is not None:
        vpool = replace(source.load_val(), classnames=source.classnames)
        val = vpool if val_shots is None else vpool.subset(_draw(vpool, val_shots, seed, stream=1))
    else:  # no validation split (ImageNet): carve it from the images the training shots left
        val = pool.subset(_draw(pool, 4 if val_shots is None else val_shots, seed, stream=1, exclude=train_idx))
    return fewshot.FewShotSample(
        fewshot.split_rows(pool.subset(train_idx), source.image_root), fewshot.split_rows(val, source.image_root)
    )


def few_shot_train_val(
    source: DatasetSource,
    shots: int | None,
    seed: int,
    val_shots: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[Split, Split, dict]:
    """Training and validation splits of the few-shot protocol, read from or written to the cache.

    Returns:
        (train, val, info) where info records shots, seed, val_shots and the cache file used.
    """
    name = source.name
    if shots is None:
        pool = source.load_train()
        if source.load_val is not None:
            vpool = source.load_val()
            val = vpool if val_shots is None else vpool.subset(_draw(vpool, val_shots, seed, stream=1))
            train = pool
        else:
            # No validation split: hold `val_shots` per class (default 4) out of the training pool,
            # never more than HOLDOUT_FRACTION of a class.
            val_shots = 4 if val_shots is None else val_shots
            val_idx = _draw(pool, val_shots, seed, stream=1, max_fraction=fewshot.HOLDOUT_FRACTION)
            train, val = pool.subset(np.setdiff1d(np.arange(len(pool)), val_idx)), pool.subset(val_idx)
        info = {"shots": None, "seed": seed, "val_shots": val_shots, "fewshot_cache": None}
        return _named(train, f"{name}/train"), _named(val, f"{name}/val"), info

    meta = {"dataset": name, "shots": shots, "seed": seed, "val_shots": val_shots}
    filename = fewshot.cache_filename(shots, seed, val_shots)
    candidates = fewshot.cache_candidates(source.dataset_dir, name, filename, cache_dir)
    sample, used = None, None
    for path in candidates:
        if path.is_file():
            sample = fewshot.load_fewshot(path, meta, source.classnames, source.image_root)
            if sample is not None:
                used = path
                logger.info("%s: using the few-shot sample in %s", name, path)
                break
    if sample is None:
        sample = _sample(source, shots, seed, val_shots)
        used = _write_cache(candidates, sample, meta, name)
    train = fewshot.rows_to_split(sample.train, source.image_root, f"{name}/train")
    val = fewshot.rows_to_split(sample.val, source.image_root, f"{name}/val")
    info = {"shots": shots, "seed": seed, "val_shots": val_shots, "fewshot_cache": str(used) if used else None}
    return train, val, info


def _write_cache(candidates: list[Path], sample: fewshot.FewShotSample, meta: dict, name: str) -> Path | None:
    for path in candidates:
        if not fewshot.is_writable(path.parent):
            continue
        try:
            fewshot.save_fewshot(path, sample, meta)
        except OSError as e:  # e.g. a read-only mount that os.access did not see as such
            logger.info("%s: cannot write few-shot cache %s (%s)", name, path, e)
            continue
        logger.info("%s: wrote the few-shot sample to %s", name, path)
        return path
    logger.warning(
        "%s: could not write the few-shot sample to any of %s; it is not cached", name, [str(p) for p in candidates]
    )
    return None


def _named(split: Split, name: str) -> Split:
    return replace(split, name=name, classnames=None)


def build_benchmark(
    source: DatasetSource,
    shots: int | None = 16,
    seed: int = 1,
    val_shots: int | None = None,
    subsample: str = "all",
    templates: str | Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    ood: dict[str, Split] | None = None,
    name: str | None = None,
) -> Benchmark:
    """A few-shot benchmark from a `DatasetSource` (see the module docstring for the protocol).

    Args:
        source: the dataset.
        shots: training images per class; None for the whole training pool.
        seed: sampling seed (the CoOp protocol averages seeds 1, 2, 3).
        val_shots: validation images per class; None: min(shots, 4), or everything when shots is None.
        subsample: "all", "base" or "new" (base-to-new protocol).
        templates: a kind ("single", "openai", "openai-7") or a list; None: the dataset's own.
        cache_dir: where to keep the few-shot sample instead of beside the data.
        ood: extra OOD splits (ImageNet variants, cross-dataset targets).
        name: benchmark name (default: the source's).
    """
    check_options(shots, seed, subsample, val_shots)
    shots, seed = fewshot.check_shots(shots), check_seed(seed)
    val_shots = (
        fewshot.check_shots(val_shots, "val_shots") if val_shots is not None else fewshot.default_val_shots(shots)
    )
    train, val, info = few_shot_train_val(source, shots, seed, val_shots, cache_dir)
    test = _named(source.load_test(), f"{source.name}/test")
    bench = Benchmark(
        name=name or source.name,
        modality="image",
        classnames=list(source.classnames),
        templates=source.templates if templates is None else resolve_templates(source.name, templates),
        train=train,
        val=val,
        test=test,
        ood=dict(ood or {}),
        info={
            "protocol": "coop-fewshot" if shots else "full",
            **source.info,
            "dataset_dir": str(source.dataset_dir),
            **info,
            "subsample": subsample,
            "num_classes": len(source.classnames),
        },
    )
    return subsample_classes(bench, subsample)
