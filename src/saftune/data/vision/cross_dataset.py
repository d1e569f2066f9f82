"""Cross-dataset transfer (CoCoOp protocol): fine-tune on one dataset, test zero-shot on the others.

The benchmark trains on `source` (ImageNet by default, few-shot as usual) and has one OOD split per
target dataset: that dataset's full test set with its own class names and its own prompt templates
(`Split.classnames` / `Split.templates`), so the evaluation builds a new zero-shot head per target.

Example (with the data in place):
    >>> b = load_dataset("cross-dataset", root="/data", shots=16, seed=1)   # doctest: +SKIP
    >>> b.ood["dtd"].templates                                              # doctest: +SKIP
    ['{} texture.']
"""

from __future__ import annotations

import logging
from dataclasses import replace

from saftune.data.base import Benchmark
from saftune.data.registry import register_dataset
from saftune.data.vision.coop import COOP_DATASETS
from saftune.data.vision.paths import DatasetNotFoundError
from saftune.data.vision.protocol import build_benchmark, check_options, get_source, resolve_templates, source_names

logger = logging.getLogger(__name__)

#: Default transfer targets: the ten CoOp datasets.
DEFAULT_TARGETS = tuple(COOP_DATASETS)


@register_dataset(
    "cross-dataset",
    "train on one image dataset (ImageNet by default), OOD = the other datasets' test sets with their own "
    "class names and templates; options: root, source=imagenet, targets, shots=16, seed=1, skip_missing=False, "
    "val_shots, templates, cache_dir",
)
def build_cross_dataset(
    root=None,
    source="imagenet",
    targets=None,
    shots=16,
    seed=1,
    skip_missing=False,
    val_shots=None,
    templates=None,
    cache_dir=None,
) -> Benchmark:
    """Cross-dataset transfer benchmark.

    Args:
        root: data root (default `$SAFTUNE_DATA`), CoOp layout.
        source: registry name of the training dataset ("imagenet", "caltech101", ...).
        targets: registry names of the transfer targets; default: the ten CoOp datasets (plus ImageNet
            when the source is not ImageNet), without the source.
        shots, seed, val_shots, cache_dir: few-shot protocol on the source (see `build_benchmark`).
        skip_missing: leave out targets whose folders are missing (logged) instead of raising.
        templates: "single" | "openai" | "openai-7" for every dataset; None: each dataset's own.
            An explicit list of templates applies to the source only (targets keep their own).
    """
    check_options(shots, seed, "all", val_shots)
    known = source_names()
    if source not in known:
        raise ValueError(f"unknown source dataset {source!r}; known: {', '.join(known)}")
    if targets is None:
        targets = [t for t in (*DEFAULT_TARGETS, "imagenet") if t != source]
    targets = [targets] if isinstance(targets, str) else list(targets)
    unknown = [t for t in targets if t not in known]
    if unknown:
        raise ValueError(f"unknown target datasets {unknown}; known: {', '.join(known)}")
    ood = {}
    for t in targets:
        if t == source:
            raise ValueError(f"target {t!r} is the source dataset; its test set is the ID test split already")
        try:
            target = get_source(t, root)
        except DatasetNotFoundError as e:
            if not skip_missing:
                raise
            logger.warning("cross-dataset: leaving out %s: %s", t, str(e).splitlines()[0])
            continue
        own = target.templates if not isinstance(templates, str) else resolve_templates(t, templates)
        ood[t] = replace(target.load_test(), name=t, classnames=list(target.classnames), templates=list(own))
    bench = build_benchmark(
        get_source(source, root),
        shots=shots,
        seed=seed,
        val_shots=val_shots,
        templates=templates,
        cache_dir=cache_dir,
        ood=ood,
        name="cross-dataset",
    )
    bench.info.update({"source_dataset": source, "targets": list(ood)})
    return bench
