"""Checkpoints that a crash cannot corrupt.

A checkpoint is a directory: `trainable.safetensors` (what the method trains), `optimizer.pt` (optimizer
and scheduler state, read back with `torch.load(weights_only=True)`: no arbitrary unpickling) and
`trainer.json` (step, config fingerprint). It is written into a temporary directory and moved into
place with renames, so the previous checkpoint stays valid until the new one is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_DIR = "checkpoint"


class CheckpointError(ValueError):
    """A checkpoint is damaged or belongs to a different run configuration."""


def config_fingerprint(config: dict) -> str:
    """A short hash of the settings that must match for a checkpoint to be resumed."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_checkpoint(run_dir: Path, *, step: int, trainable: dict[str, torch.Tensor], optimizer, scheduler,
                    fingerprint: str, extra: dict | None = None) -> Path:
    """Write `run_dir/checkpoint` atomically (build beside it, then swap with renames)."""
    run_dir = Path(run_dir)
    final = run_dir / CHECKPOINT_DIR
    staging = run_dir / f".{CHECKPOINT_DIR}.tmp"
    old = run_dir / f".{CHECKPOINT_DIR}.old"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file({n: t.detach().contiguous().cpu() for n, t in trainable.items()}, str(staging / "trainable.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, staging / "optimizer.pt")
    (staging / "trainer.json").write_text(json.dumps({"step": step, "fingerprint": fingerprint, **(extra or {})}, indent=2))
    for f in staging.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staging.rename(final)  # the commit point: from here on the new checkpoint is the valid one
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(run_dir: Path) -> Path | None:
    """The valid checkpoint of a run, if any (recovers from a crash between the two renames)."""
    run_dir = Path(run_dir)
    for candidate in (run_dir / CHECKPOINT_DIR, run_dir / f".{CHECKPOINT_DIR}.old"):
        if (candidate / "trainer.json").is_file():
            return candidate
    return None


def load_checkpoint(path: Path, fingerprint: str) -> dict:
    """Read a checkpoint; refuse it if it was written for another configuration."""
    path = Path(path)
    try:
        meta = json.loads((path / "trainer.json").read_text())
        trainable = load_file(str(path / "trainable.safetensors"))
        states = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any read failure means the checkpoint cannot be trusted
        raise CheckpointError(f"checkpoint {str(path)!r} is damaged ({e}); delete it to start the run afresh") from e
    if meta.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"checkpoint {str(path)!r} was written by a run with a different configuration; resume with the same "
            "settings, or choose a new output directory (or delete the checkpoint) to start afresh"
        )
    return {"step": int(meta["step"]), "trainable": trainable, **states, "meta": meta}
