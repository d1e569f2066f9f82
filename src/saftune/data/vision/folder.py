"""Image-folder reading: `root/<class>/<image>` -> `Split` of file paths, classes in sorted order.

Example:
    >>> import tempfile, pathlib
    >>> from PIL import Image
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> for cls in ["dog", "cat"]:
    ...     (root / cls).mkdir()
    ...     Image.new("RGB", (4, 4)).save(root / cls / "0.png")
    >>> s = image_folder(root, name="pets")
    >>> s.classnames, s.labels.tolist()
    (['cat', 'dog'], [0, 1])
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from saftune.data.base import Split

logger = logging.getLogger(__name__)

#: File suffixes read as images (compared case-insensitively: ImageNet's files end in ".JPEG").
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})


def is_image_file(name: str) -> bool:
    """True for a visible file name with an image suffix."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_images(directory: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Image files in `directory`, sorted by relative path (so order never depends on the file system)."""
    directory = Path(directory)
    if recursive:
        found = [Path(dp) / f for dp, _, files in os.walk(directory) for f in files if is_image_file(f)]
        return sorted(found, key=lambda p: p.relative_to(directory).as_posix())
    with os.scandir(directory) as it:
        return sorted(Path(e.path) for e in it if e.is_file() and is_image_file(e.name))


def class_folders(root: str | os.PathLike) -> list[str]:
    """Names of the visible sub-folders of `root`, sorted."""
    with os.scandir(root) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def image_folder(
    root: str | os.PathLike,
    name: str | None = None,
    class_to_label: Mapping[str, int] | None = None,
    recursive: bool = False,
) -> Split:
    """Read `root/<class>/<image>` into a `Split` with `pathlib.Path` inputs.

    Args:
        root: folder with one sub-folder per class.
        name: split name (default: the folder name).
        class_to_label: folder name -> label. Default: sorted folder names numbered 0, 1, ...; given a
            mapping (e.g. ImageNet wnid -> index), folders it does not know are skipped with a warning.
        recursive: also read images in nested folders of each class folder.

    Returns:
        A split whose `classnames` are the class folder names in label order (the raw names; callers
        building a benchmark replace them with readable names or None).
    """
    root = Path(root)
    folders = class_folders(root)
    if class_to_label is None:
        class_to_label = {c: i for i, c in enumerate(folders)}
        classnames = list(folders)
    else:
        unknown = [c for c in folders if c not in class_to_label]
        if unknown:
            logger.warning("%s: ignoring %d folders that are not classes (e.g. %s)", root, len(unknown), unknown[0])
        classnames = [None] * (max(class_to_label.values(), default=-1) + 1)
        for c, i in class_to_label.items():
            classnames[i] = c
    inputs, labels, empty = [], [], []
    for c in folders:
        if c not in class_to_label:
            continue
        files = list_images(root / c, recursive=recursive)
        if not files:
            empty.append(c)
        inputs.extend(files)
        labels.extend([class_to_label[c]] * len(files))
    if empty:
        logger.warning("%s: %d class folders hold no images (e.g. %s)", root, len(empty), empty[0])
    return Split(name or root.name, inputs, np.asarray(labels, dtype=np.int64), classnames=classnames)


def readable_name(folder: str) -> str:
    """A class name for prompts from a folder name: "golden_retriever" -> "golden retriever"."""
    return folder.replace("_", " ").strip()
