"""Your own image data as a benchmark: `load_dataset("image-folder", root="my_data", shots=16)`.

Layout (class folder names become the class names, "_" read as a space):

    my_data/
      train/<class>/*.jpg       # training pool (few-shot sampled unless shots=None)
      val/<class>/*.jpg         # optional; without it, validation is carved from train
      test/<class>/*.jpg        # ID test set
      ood/<name>/<class>/*.jpg  # optional OOD test sets, one folder each

An OOD folder may hold a subset of the classes: its split then gets `class_subset` (as ImageNet-A/R)
and evaluation keeps only those classes' logits. A class folder unknown to train is an error.

Example:
    >>> import tempfile, pathlib
    >>> from PIL import Image
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> for part in ["train", "test", "ood/sketch"]:
    ...     for cls in (["cat", "dog"] if part != "ood/sketch" else ["dog"]):
    ...         (root / part / cls).mkdir(parents=True)
    ...         for i in range(3):
    ...             Image.new("RGB", (4, 4)).save(root / part / cls / f"{i}.png")
    >>> from saftune.data.registry import load_dataset
    >>> b = load_dataset("image-folder", root=root, shots=2)
    >>> len(b.train), b.ood["sketch"].class_subset, b.ood["sketch"].labels.tolist()
    (4, [1], [0, 0, 0])
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from saftune.config import option
from saftune.data.base import Benchmark
from saftune.data.registry import register_dataset
from saftune.data.vision.folder import class_folders, image_folder, readable_name
from saftune.data.vision.paths import DatasetNotFoundError, require
from saftune.data.vision.protocol import DatasetSource, SubsampleOptions, build_benchmark

LAYOUT = """<root>/
  train/<class>/<images>
  val/<class>/<images>         (optional)
  test/<class>/<images>
  ood/<name>/<class>/<images>  (optional)"""


@dataclass
class ImageFolderOptions(SubsampleOptions):
    """`SubsampleOptions` for your own folders: `root` is required, templates default to one photo prompt."""

    root: str | None = option(None, "the folder holding train/, val/ (optional), test/ and ood/ (optional)")
    templates: str | list[str] = option(help="prompt templates with {} for the class name",
                                        default_factory=lambda: ["a photo of a {}."])
    name: str = option("image-folder", "benchmark name (names the splits and the few-shot cache)")


@register_dataset(
    "image-folder",
    "your own images: root/{train,val?,test}/<class>/ and root/ood/<name>/<class>/",
    options=ImageFolderOptions,
)
def build_image_folder(options: ImageFolderOptions) -> Benchmark:
    """A few-shot benchmark from plain class folders (see the module docstring for the layout)."""
    root, templates, name = options.root, options.templates, options.name
    if root is None:
        raise DatasetNotFoundError(f"image-folder needs root=<folder>; expected this layout:\n{LAYOUT}")
    root = require(Path(root).expanduser(), "image-folder root", LAYOUT)
    train_dir = require(root / "train", "training folder", LAYOUT)
    test_dir = require(root / "test", "test folder", LAYOUT)
    folders = class_folders(train_dir)
    if not folders:
        raise DatasetNotFoundError(f"{str(train_dir)!r} has no class folders; expected this layout:\n{LAYOUT}")
    to_label = {c: i for i, c in enumerate(folders)}

    def read(directory: Path, split_name: str):
        unknown = sorted(set(class_folders(directory)) - set(to_label))
        if unknown:
            raise ValueError(f"{str(directory)!r} has class folders not in {str(train_dir)!r}: {unknown[:5]}")
        return replace(image_folder(directory, name=split_name, class_to_label=to_label), classnames=None)

    ood = {}
    if (root / "ood").is_dir():
        for ood_name in class_folders(root / "ood"):
            split = read(root / "ood" / ood_name, ood_name)
            present = sorted(to_label[c] for c in class_folders(root / "ood" / ood_name))
            if len(present) < len(folders):
                relabel = np.full(len(folders), -1, dtype=np.int64)
                relabel[present] = np.arange(len(present))
                split = replace(split, labels=relabel[split.labels], class_subset=present)
            ood[ood_name] = split
    has_val = (root / "val").is_dir()
    source = DatasetSource(
        name=name,
        classnames=[readable_name(c) for c in folders],
        templates=[templates] if isinstance(templates, str) else list(templates),
        dataset_dir=root,
        image_root=root,
        load_train=lambda: read(train_dir, f"{name}/train"),
        load_val=(lambda: read(root / "val", f"{name}/val")) if has_val else None,
        load_test=lambda: read(test_dir, f"{name}/test"),
        info={"source": str(root)},
    )
    if options.subsample != "all" and ood:
        raise ValueError("subsample='base'/'new' needs a dataset without ood/ folders")
    bench = build_benchmark(source, **{**options.sampling(), "templates": None})  # the source has them
    if ood:
        bench.ood.update(ood)
    return bench
