"""Where local datasets live: the data root (`root=` or `$SAFTUNE_DATA`) and clear "not found" errors.

All image suites follow CoOp's layout: one folder per dataset under a common root, e.g.
`$SAFTUNE_DATA/oxford_pets/images/...` and `$SAFTUNE_DATA/oxford_pets/split_zhou_OxfordPets.json`.

Example:
    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> data_root(root) == root
    True
    >>> try:
    ...     dataset_dir(root, "dtd", "dtd/\\n  images/")
    ... except DatasetNotFoundError as e:
    ...     print(str(e).splitlines()[0].endswith("dtd' not found; expected this layout:"))
    True
"""

from __future__ import annotations

import os
from pathlib import Path

#: Environment variable holding the default data root.
DATA_ENV = "SAFTUNE_DATA"


class DatasetNotFoundError(FileNotFoundError):
    """A dataset folder or file is missing. The message names the expected path and the layout."""


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: `root` when given, else `$SAFTUNE_DATA`.

    Raises:
        DatasetNotFoundError: neither is set, or the folder does not exist.
    """
    if root is None:
        root = os.environ.get(DATA_ENV)
        if not root:
            raise DatasetNotFoundError(
                f"no data root: pass root=... or set the {DATA_ENV} environment variable to the folder "
                "that holds the datasets (CoOp layout: imagenet/, oxford_pets/, dtd/, ...)"
            )
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(f"data root {str(root)!r} does not exist or is not a folder")
    return root


def dataset_dir(root: str | os.PathLike | None, folder: str, layout: str, marker: str | None = None) -> Path:
    """`root/folder`, or `root` itself when it already is that dataset's folder.

    Args:
        root: data root (None: `$SAFTUNE_DATA`).
        folder: the dataset's folder name under the root ("oxford_pets").
        layout: the expected tree, shown in the error.
        marker: a file or folder inside the dataset folder; when `root` holds it, `root` is taken to be
            the dataset folder (so users may point `root` straight at one dataset).

    Raises:
        DatasetNotFoundError: naming the expected path and the layout.
    """
    base = data_root(root)
    candidate = base / folder
    if candidate.is_dir():
        return candidate
    if base.name == folder or (marker is not None and (base / marker).exists()):
        return base
    raise DatasetNotFoundError(f"dataset folder {str(candidate)!r} not found; expected this layout:\n{layout}")


def require(path: Path, what: str, layout: str) -> Path:
    """Return `path` if it exists, else raise DatasetNotFoundError naming it, `what` it is and the layout."""
    if not path.exists():
        raise DatasetNotFoundError(f"{what} {str(path)!r} not found; expected this layout:\n{layout}")
    return path
