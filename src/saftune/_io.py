"""Small file-system helpers shared by every writer: atomic writes, JSON and checksums."""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on success move it over `path` in one rename.

    A crash mid-write leaves the previous file (or none) in place, never a half-written one.

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "x.txt"
        >>> with atomic_path(target) as tmp:
        ...     _ = tmp.write_text("done")
        >>> target.read_text()
        'done'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # flush to disk before the rename makes the file visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def did_you_mean(name: str, known) -> str:
    """" Did you mean 'x'?" for the known name closest to a misspelt one, or "" when none is close.

    Example:
        >>> did_you_mean("saf", ["saft", "lora"]), did_you_mean("zzz", ["saft"])
        (" Did you mean 'saft'?", '')
    """
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def write_json(path: str | os.PathLike, obj) -> Path:
    """Write `obj` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    return Path(path)


def sha256(data: bytes) -> str:
    """The checksum recorded beside a saved file: "sha256:<hex>" of its bytes.

    Safetensors files and torch's zip checkpoints carry no checksum of their data, so without one a
    flipped byte would load as a wrong number.
    """
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """`sha256` of a file, read in 1 MiB chunks: the one file checksum (results, checkpoints, assets).

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "x.bin"
        >>> _ = path.write_bytes(b"abc")
        >>> sha256_file(path) == sha256(b"abc")
        True
        >>> sha256_file(path)[:15]
        'sha256:ba7816bf'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()
