"""Checkpoints that a crash cannot corrupt.

A checkpoint is a directory: `trainable.safetensors` (what the method trains), `optimizer.pt` (optimizer
and scheduler state, read back with `torch.load(weights_only=True)`: no arbitrary unpickling) and
`trainer.json` (step, config fingerprint, the SHA-256 of the two other files). It is written into a
temporary directory and moved into place with renames, so the previous checkpoint stays valid until
the new one is complete; a checkpoint whose files do not match their checksums is refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from saftune._io import sha256, sha256_file

CHECKPOINT_DIR = "checkpoint"
_OLD = f".{CHECKPOINT_DIR}.old"  # the previous checkpoint, during the swap
_STAGING = f".{CHECKPOINT_DIR}.tmp"  # the next checkpoint, while it is written
TRAINABLE, OPTIMIZER, META = "trainable.safetensors", "optimizer.pt", "trainer.json"


class CheckpointError(ValueError):
    """A checkpoint is damaged or belongs to a different run configuration."""


def config_fingerprint(config: dict) -> str:
    """A short hash of the settings that must match for a checkpoint to be resumed."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_checkpoint(run_dir: Path, *, step: int, trainable: dict[str, torch.Tensor], optimizer, scheduler,
                    fingerprint: str, extra: dict | None = None, moments: bool = True) -> Path:
    """Write `run_dir/checkpoint` so that a crash at any moment leaves one complete checkpoint.

    The new checkpoint is built beside the current one and swapped in with renames; the previous one is
    deleted only when it is no longer the only valid checkpoint. `moments=False` leaves out the
    optimizer's per-parameter state (AdamW's two moments, twice the trained tensors): for the checkpoint
    of a finished run, which nothing trains on from.
    """
    run_dir = Path(run_dir)
    final, staging, old = run_dir / CHECKPOINT_DIR, run_dir / _STAGING, run_dir / _OLD
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file({n: t.detach().contiguous().cpu() for n, t in trainable.items()}, str(staging / TRAINABLE))
    # The step again, inside a checksummed file: trainer.json's own bytes have no checksum.
    optimizer_state = optimizer.state_dict()
    if not moments:
        optimizer_state = {**optimizer_state, "state": {}}
    torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "step": step},
               staging / OPTIMIZER)
    files = {}
    for name in (TRAINABLE, OPTIMIZER):
        _fsync(staging / name)
        files[name] = sha256_file(staging / name)
    meta = {"step": step, "fingerprint": fingerprint, "files": files, **(extra or {})}
    (staging / META).write_text(json.dumps(meta, indent=2))
    _fsync(staging / META)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)  # `final` is valid, so `old` is left over from an earlier swap
        final.rename(old)
    # Without `final`, `old` may be the only valid checkpoint (a crash mid-swap): it stays until the commit.
    staging.rename(final)  # the commit point: from here on the new checkpoint is the valid one
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(run_dir: Path) -> Path | None:
    """The valid checkpoint of a run, if any (recovers from a crash between the two renames)."""
    run_dir = Path(run_dir)
    for candidate in (run_dir / CHECKPOINT_DIR, run_dir / _OLD):
        if (candidate / META).is_file():
            return candidate
    return None


def discard_checkpoint(run_dir: Path) -> None:
    """Delete a run's checkpoint, so that a run started afresh is never resumed from an older attempt."""
    run_dir = Path(run_dir)
    trash = run_dir / f".{CHECKPOINT_DIR}.discarded"
    for name in (_OLD, CHECKPOINT_DIR, _STAGING):  # the fallback first: a crash here leaves nothing resumable
        if (run_dir / name).exists():
            shutil.rmtree(trash, ignore_errors=True)
            (run_dir / name).rename(trash)  # one rename: never a half-deleted checkpoint that looks valid
            shutil.rmtree(trash)


def load_checkpoint(path: Path, fingerprint: str) -> dict:
    """Read a checkpoint, verified against its checksums; refuse one written for another configuration."""
    path = Path(path)
    afresh = f"delete {str(path)!r} to start the run afresh, or restore it from a copy"
    try:
        meta = json.loads((path / META).read_text())
        step = int(meta["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:  # ValueError covers bad JSON and bad UTF-8
        raise CheckpointError(f"checkpoint file {str(path / META)!r} is damaged ({e!r}); {afresh}") from e
    if meta.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"checkpoint {str(path)!r} was written by a run with a different configuration; resume with the same "
            "settings, or choose a new output directory (or delete the checkpoint) to start afresh"
        )
    data = {}
    for name in (TRAINABLE, OPTIMIZER):
        try:
            data[name] = (path / name).read_bytes()
        except OSError as e:
            raise CheckpointError(f"checkpoint file {str(path / name)!r} cannot be read ({e}); {afresh}") from e
        expected = (meta.get("files") or {}).get(name)  # absent only in checkpoints of saftune <= 0.1.0
        if expected is not None and sha256(data[name]) != expected:
            raise CheckpointError(f"checkpoint file {str(path / name)!r} is damaged: its bytes do not match the "
                                  f"checksum in {META}; {afresh}")
    try:
        trainable = load_safetensors(data[TRAINABLE])
        states = torch.load(io.BytesIO(data[OPTIMIZER]), map_location="cpu", weights_only=True)
    except Exception as e:  # any failure to deserialize means the checkpoint cannot be trusted
        raise CheckpointError(f"checkpoint {str(path)!r} is damaged ({e}); {afresh}") from e
    if states.pop("step", step) != step:
        raise CheckpointError(f"checkpoint file {str(path / META)!r} is damaged: it names step {step}, but the saved "
                              f"state is of another step; {afresh}")
    return {"step": step, "trainable": trainable, **states, "meta": meta}
