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
from dataclasses import dataclass, replace

from saftune.config import option
from saftune.data.base import Benchmark
from saftune.data.registry import register_dataset
from saftune.data.vision.coop import COOP_DATASETS
from saftune.data.vision.paths import DatasetNotFoundError
from saftune.data.vision.protocol import FewShotOptions, build_benchmark, get_source, resolve_templates, source_names

logger = logging.getLogger(__name__)

#: Default transfer targets: the ten CoOp datasets.
DEFAULT_TARGETS = tuple(COOP_DATASETS)


@dataclass
class CrossDatasetOptions(FewShotOptions):
    """`FewShotOptions` (applied to the source) plus which dataset trains and which are transfer targets.

    `templates`: a kind ("single" | "openai" | "openai-7") applies to every dataset; an explicit list of
    templates applies to the source only (targets keep their own).
    """

    source: str = option("imagenet", "registry name of the training dataset (imagenet, caltech101, dtd, ...)")
    targets: list[str] | None = option(None, "registry names of the transfer targets; default: the ten CoOp "
                                       "datasets and ImageNet, without the source")
    skip_missing: bool = option(False, "leave out targets whose folders are missing (logged) instead of failing")


@register_dataset(
    "cross-dataset",
    "train on one image dataset (ImageNet by default), OOD = the other datasets' test sets with their own "
    "class names and templates",
    options=CrossDatasetOptions,
)
def build_cross_dataset(options: CrossDatasetOptions) -> Benchmark:
    """Cross-dataset transfer benchmark (see `CrossDatasetOptions`)."""
    root, source, targets, templates = options.root, options.source, options.targets, options.templates
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
            if not options.skip_missing:
                raise
            logger.warning("cross-dataset: leaving out %s: %s", t, str(e).splitlines()[0])
            continue
        own = target.templates if not isinstance(templates, str) else resolve_templates(t, templates)
        ood[t] = replace(target.load_test(), name=t, classnames=list(target.classnames), templates=list(own))
    bench = build_benchmark(get_source(source, root), **options.sampling(), ood=ood, name="cross-dataset")
    bench.info.update({"source_dataset": source, "targets": list(ood)})
    return bench
