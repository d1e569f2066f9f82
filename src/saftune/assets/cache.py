"""The asset cache on disk: where a fetched asset lives, and how a fetch is made safe to interrupt.

Layout of the cache (``$SAFTUNE_HOME`` or ``~/.cache/saftune``)::

    <name>/                      one directory per asset, only ever created by a rename
    <name>/.saftune-asset.json   completion marker: asset name, archive name and sha256, file list
    .<name>.partial-*/           staging of a fetch in progress (or a crashed one; removed next time)
    .<name>.lock                 serialises concurrent fetches of one asset

`asset_path` never downloads: it returns the directory of a completed fetch or raises
`AssetMissingError` with the command that fetches it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from saftune.assets.catalog import Asset, get_asset
from saftune.assets.errors import AssetMissingError

MARKER = ".saftune-asset.json"


def cache_dir() -> Path:
    """The asset cache: ``$SAFTUNE_HOME`` if set, else ``~/.cache/saftune``.

    Example:
        >>> import os
        >>> os.environ["SAFTUNE_HOME"] = "/tmp/st"; str(cache_dir())
        '/tmp/st'
        >>> del os.environ["SAFTUNE_HOME"]
    """
    home = os.environ.get("SAFTUNE_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "saftune"


def write_marker(staging: Path, asset: Asset, archive_name: str) -> None:
    """Mark the staging directory of `asset` complete, listing the files extracted into it."""
    files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
    # "sha256" is the registry's bare hex digest (as markers have always recorded it), which the
    # archive was checked against before anything was extracted.
    marker = {"name": asset.name, "requirement": asset.requirement, "archive": archive_name,
              "sha256": asset.sha256, "files": files}
    (staging / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _read_marker(directory: Path) -> dict | None:
    try:
        return json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None


def is_complete(asset: Asset, directory: Path) -> bool:
    """Whether `directory` holds a completed fetch of `asset`'s registered archive."""
    # The marker is written inside the staging directory before the rename, so a directory without
    # it was not made by a completed fetch; a marker with another checksum is from an older registry.
    marker = _read_marker(directory)
    return marker is not None and marker.get("name") == asset.name and marker.get("sha256") == asset.sha256


def asset_path(name: str) -> Path:
    """The directory holding a fetched asset's files. Never downloads.

    Args:
        name: an asset name from `list_assets()`.

    Raises:
        AssetMissingError: the asset was not fetched, or its directory is not from a completed fetch
            of the registered archive; the message says to run ``saftune fetch <name>``.
        ValueError: `name` is not a known asset.

    Example:
        >>> from transformers import AutoModel, AutoTokenizer     # doctest: +SKIP
        >>> model = AutoModel.from_pretrained(asset_path("minilm"))  # doctest: +SKIP
    """
    asset = get_asset(name)
    directory = cache_dir() / name
    if is_complete(asset, directory):
        return directory
    if directory.exists():
        why = f"the directory {directory} is not from a completed fetch of {asset.requirement}"
    else:
        why = f"asset {name!r} ({asset.requirement}) is not in the cache {cache_dir()}"
    raise AssetMissingError(f"{why}; run: saftune fetch {name}")


@contextlib.contextmanager
def fetch_lock(root: Path, name: str):
    """Hold the cache's lock of asset `name` (released on exit)."""
    # Two fetches of the same asset at once (two terminals, parallel test workers) must not clean up
    # each other's staging directories; a POSIX advisory lock serialises them. Without fcntl
    # (Windows) fetches are simply not serialised.
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        yield
        return
    with open(root / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def install(staging: Path, dest: Path) -> None:
    """Move the complete `staging` directory to `dest`, replacing an older copy."""
    # A directory cannot be renamed over a non-empty one, so an old copy is first renamed aside. A
    # crash between the two renames leaves no `dest`, which asset_path reports as missing: safe.
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    os.replace(staging, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
