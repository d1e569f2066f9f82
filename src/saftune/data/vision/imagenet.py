"""ImageNet and its distribution shifts (ImageNet-V2, -Sketch, -A, -R) from CoOp's local layout.

    $SAFTUNE_DATA/
      imagenet/
        classnames.txt                    # "n01440764 tench" per line: wnid, then the class name
        images/train/<wnid>/*.JPEG
        images/val/<wnid>/*.JPEG          # the 50k validation images, one folder per class
      imagenetv2/imagenetv2-matched-frequency-format-val/<label index 0..999>/*.jpeg
      imagenet-sketch/images/<wnid>/*.JPEG
      imagenet-adversarial/imagenet-a/<wnid>/*.jpg     # 200 classes
      imagenet-rendition/imagenet-r/<wnid>/*.jpg       # 200 classes

Class names come from `classnames.txt` (CoOp distributes it; it holds CLIP's readable names). Labels
are the wnids in sorted order, ImageNet's standard numbering, which ImageNet-V2's folder numbers use.
A variant folder may carry its own `classnames.txt` (CoOp copies it there); it is used only when
`imagenet/classnames.txt` is missing.

ImageNet-A and -R hold 200 of the 1000 classes. Their splits keep the benchmark's 1000 class names,
set `Split.class_subset` to the indices of the classes present (in label order) and number their
labels 0..199 within that subset: evaluation computes the 1000-way logits and keeps the subset's
columns with `project_logits`, as in the papers.

Example:
    >>> import numpy as np
    >>> logits = np.array([[0.1, 0.9, 0.3, 0.7]])
    >>> project_logits(logits, [0, 2]).argmax(-1)  # class 2 is subset label 1
    array([1])
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from saftune.config import option
from saftune.data.base import Benchmark, Split
from saftune.data.registry import register_dataset
from saftune.data.templates import templates_for
from saftune.data.vision.folder import class_folders, image_folder, list_images
from saftune.data.vision.paths import DatasetNotFoundError, data_root, dataset_dir, require
from saftune.data.vision.protocol import (
    DatasetSource,
    FewShotOptions,
    SubsampleOptions,
    build_benchmark,
    register_source,
)

logger = logging.getLogger(__name__)

IMAGENET_LAYOUT = """$SAFTUNE_DATA/imagenet/
  classnames.txt            # one "wnid class name" line per class, e.g. "n01440764 tench"
  images/
    train/<wnid>/*.JPEG     # 1,000 folders like n01440764
    val/<wnid>/*.JPEG       # validation images sorted into the same 1,000 folders"""

# variant name -> (folder under the root, image folder inside it, folder naming, has 200 classes)
VARIANTS = {
    "imagenet-v2": ("imagenetv2", "imagenetv2-matched-frequency-format-val", "index", False),
    "imagenet-sketch": ("imagenet-sketch", "images", "wnid", False),
    "imagenet-a": ("imagenet-adversarial", "imagenet-a", "wnid", True),
    "imagenet-r": ("imagenet-rendition", "imagenet-r", "wnid", True),
}


def _variant_layout(name: str) -> str:
    folder, images, naming, _ = VARIANTS[name]
    inner = "<label index 0..999>" if naming == "index" else "<wnid>"
    return f"$SAFTUNE_DATA/{folder}/\n  {images}/{inner}/<images>"


def project_logits(logits, class_subset):
    """Keep the logits of `class_subset` (indices into the full class list), in subset order.

    Works on numpy arrays and torch tensors of shape [..., num_classes]; None returns `logits` as is.
    Label i of an ImageNet-A/R split is class `class_subset[i]`, so argmax over the result is directly
    comparable with the split's labels.

    Example:
        >>> import torch
        >>> project_logits(torch.tensor([[1.0, 5.0, 3.0]]), [2, 0])
        tensor([[3., 1.]])
    """
    if class_subset is None:
        return logits
    try:
        import torch

        if isinstance(logits, torch.Tensor):
            return logits.index_select(-1, torch.as_tensor(list(class_subset), dtype=torch.long, device=logits.device))
    except ImportError:  # pragma: no cover - torch is a dependency, but keep numpy usable without it
        pass
    return np.asarray(logits)[..., np.asarray(class_subset, dtype=np.int64)]


def read_classnames(path: Path) -> tuple[list[str], list[str]]:
    """(wnids, names) from a "wnid name" file, sorted by wnid (the label order).

    Raises:
        ValueError: a line without a name, or a wnid listed twice (naming the file and line).
    """
    entries = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        wnid, _, name = line.partition(" ")
        if not name.strip():
            raise ValueError(f"{str(path)!r} line {n}: expected 'wnid class name', got {line!r}")
        if wnid in entries:
            raise ValueError(f"{str(path)!r} line {n}: wnid {wnid} listed twice")
        entries[wnid] = name.strip()
    wnids = sorted(entries)
    return wnids, [entries[w] for w in wnids]


def _find_classnames(candidates: list[Path]) -> Path:
    """The first existing class-names file among `candidates` (ImageNet's own first)."""
    for c in candidates:
        if c.is_file():
            return c
    raise DatasetNotFoundError(
        f"ImageNet class names {str(candidates[0])!r} not found; expected this layout:\n{IMAGENET_LAYOUT}"
    )


def _wnid_folder_split(folder: Path, wnid_to_label: dict[str, int], name: str, layout: str) -> Split:
    require(folder, "image folder", layout)
    loose = list_images(folder)
    if loose and not class_folders(folder):
        raise DatasetNotFoundError(
            f"{str(folder)!r} holds {len(loose)} images directly; they must be sorted into one folder per "
            f"class (wnid). Expected layout:\n{layout}"
        )
    split = image_folder(folder, name=name, class_to_label=wnid_to_label)
    return replace(split, classnames=None)


@register_source("imagenet")
def imagenet_source(root=None) -> DatasetSource:
    """ImageNet as a `DatasetSource`: train pool from images/train, test from images/val, no val pool."""
    folder = dataset_dir(root, "imagenet", IMAGENET_LAYOUT, marker="classnames.txt")
    images = require(folder / "images", "ImageNet image folder", IMAGENET_LAYOUT)
    # CoOp copies classnames.txt into each variant folder; any copy will do when ImageNet's is missing.
    names_file = _find_classnames(
        [folder / "classnames.txt"] + [folder.parent / v[0] / "classnames.txt" for v in VARIANTS.values()]
    )
    wnids, names = read_classnames(names_file)
    to_label = {w: i for i, w in enumerate(wnids)}
    return DatasetSource(
        name="imagenet",
        classnames=names,
        templates=templates_for("imagenet"),
        dataset_dir=folder,
        image_root=images,
        load_train=lambda: _wnid_folder_split(images / "train", to_label, "imagenet/train", IMAGENET_LAYOUT),
        load_val=None,
        load_test=lambda: _wnid_folder_split(images / "val", to_label, "imagenet/test", IMAGENET_LAYOUT),
        info={"source": str(folder), "classnames_file": str(names_file)},
    )


def imagenet_variant(name: str, root=None, wnids: list[str] | None = None) -> Split:
    """One ImageNet shift as an OOD test split labelled in ImageNet's class numbering.

    Args:
        name: "imagenet-v2", "imagenet-sketch", "imagenet-a" or "imagenet-r".
        root: data root (default `$SAFTUNE_DATA`).
        wnids: ImageNet's wnids in label order (default: read from classnames.txt).

    Returns:
        The split. For ImageNet-A/R, `class_subset` lists the ImageNet classes present and labels are
        positions in it (0..199); for V2/Sketch labels are ImageNet labels (0..999).
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown ImageNet variant {name!r}; known: {', '.join(VARIANTS)}")
    folder_name, images_name, naming, subset = VARIANTS[name]
    layout = _variant_layout(name)
    folder = dataset_dir(root, folder_name, layout, marker=images_name)
    images = require(folder / images_name, f"{name} image folder", layout)
    if wnids is None:
        wnids, _ = read_classnames(
            _find_classnames([data_root(root) / "imagenet" / "classnames.txt", folder / "classnames.txt"])
        )
    to_label = {w: i for i, w in enumerate(wnids)}
    if naming == "index":
        # ImageNet-V2 names its folders by label index ("0" .. "999"), not by wnid.
        to_label = {str(i): i for i in range(len(wnids))}
    split = replace(image_folder(images, name=name, class_to_label=to_label), classnames=None)
    if not subset:
        return split
    present = sorted({to_label[c] for c in class_folders(images) if c in to_label})
    relabel = np.full(len(wnids), -1, dtype=np.int64)
    relabel[present] = np.arange(len(present))
    return replace(split, labels=relabel[split.labels], class_subset=present)


def _check_variants(variants) -> list[str]:
    variants = [variants] if isinstance(variants, str) else list(variants)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown ImageNet variants {unknown}; choose from {', '.join(VARIANTS)}")
    return variants


@dataclass
class ImageNetShiftOptions(FewShotOptions):
    """`FewShotOptions` plus which ImageNet shifts to test on."""

    variants: list[str] = option(help=f"OOD test sets among {', '.join(VARIANTS)} (default all four)",
                                 default_factory=lambda: list(VARIANTS))
    skip_missing: bool = option(False, "leave out a variant whose folder is missing (logged) instead of failing")

    def __post_init__(self):
        super().__post_init__()
        self.variants = _check_variants(self.variants)


@register_dataset(
    "imagenet",
    "ImageNet from local files (CoOp layout imagenet/images/{train,val}, classnames.txt), few-shot",
    options=SubsampleOptions,
)
def build_imagenet(options: SubsampleOptions) -> Benchmark:
    """ImageNet benchmark: `shots` per class from train, test = the 50k validation images.

    Validation: `val_shots` (default min(shots, 4)) per class from the training pool, disjoint from the
    training shots. `shots=None` trains on all of the training set minus that held-out validation
    (4 per class by default).
    """
    return build_benchmark(imagenet_source(options.root), **options.sampling())


@register_dataset(
    "imagenet-shift",
    "ImageNet few-shot with OOD test sets ImageNet-V2, -Sketch, -A, -R (200-class projection)",
    options=ImageNetShiftOptions,
)
def build_imagenet_shift(options: ImageNetShiftOptions) -> Benchmark:
    """ImageNet (as `build_imagenet`) with the ImageNet shifts in `options.variants` as OOD splits."""
    source = imagenet_source(options.root)
    wnids, _ = read_classnames(Path(source.info["classnames_file"]))
    ood = {}
    for v in options.variants:
        try:
            ood[v] = imagenet_variant(v, options.root, wnids=wnids)
        except DatasetNotFoundError as e:
            if not options.skip_missing:
                raise
            logger.warning("imagenet-shift: leaving out %s: %s", v, str(e).splitlines()[0])
    bench = build_benchmark(source, **options.sampling(), ood=ood, name="imagenet-shift")
    bench.info["variants"] = list(ood)
    return bench


__all__ = [
    "IMAGENET_LAYOUT",
    "VARIANTS",
    "ImageNetShiftOptions",
    "build_imagenet",
    "build_imagenet_shift",
    "imagenet_source",
    "imagenet_variant",
    "project_logits",
    "read_classnames",
]
