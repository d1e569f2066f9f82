"""Result artifacts: what a run saves, and how to apply it to a fresh base model.

Every result directory holds `saftune_config.json` with a `kind`:

    sparse_delta    SAFT / BitFit: `delta.safetensors` (indices, trained and pretrained values)
    weights         full fine-tuning family: `model.safetensors` (the whole classifier)
    partial_weights a linear probe: `weights.safetensors` (only the trained tensors, e.g. the head)
    lora            PEFT adapter: `adapter_config.json` + `adapter_model.safetensors`
    prompt          CoOp: `prompt.safetensors` (the learned context vectors)
    none            zero-shot: nothing trained

The config also records the model spec, dataset, method and its options, so `saftune eval` can rebuild
the base model, and the SHA-256 of each artifact file, so a damaged file is refused instead of loaded.
Only safetensors and JSON are written: nothing is pickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from saftune._io import atomic_path, sha256_file, write_json
from saftune.models.base import Classifier
from saftune.sparse.delta import CONFIG_NAME, SparseDelta

RESULT_FORMAT = "saftune.result"


class ResultError(ValueError):
    """A result directory is missing, damaged or does not fit the model."""


# The files of each kind besides saftune_config.json (a sparse delta checks its own, in SparseDelta).
ARTIFACT_FILES = {
    "weights": ("model.safetensors",),
    "partial_weights": ("weights.safetensors",),
    "lora": ("adapter_config.json", "adapter_model.safetensors"),
    "prompt": ("prompt.safetensors",),
}


def write_result_config(directory: Path, kind: str, info: dict) -> Path:
    """Write `saftune_config.json` last, with the checksums of the artifact files already written."""
    from saftune import __version__

    directory = Path(directory)
    files = {name: sha256_file(directory / name) for name in ARTIFACT_FILES.get(kind, ())}
    return write_json(directory / CONFIG_NAME,
                      {"format": RESULT_FORMAT, "kind": kind, "library_version": __version__, **info, "files": files})


def read_result_config(directory: str | Path) -> dict:
    """The result's `saftune_config.json` (sparse deltas included), validated."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise ResultError(f"{str(path)!r} is missing: {str(directory)!r} is not a saftune result directory")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
        raise ResultError(f"{str(path)!r} is not valid JSON ({e}); the result is damaged") from e
    if not isinstance(config, dict):
        raise ResultError(f"{str(path)!r} is not a saftune result config")
    if config.get("format") == "saftune.sparse_delta":
        config.setdefault("kind", "sparse_delta")
    elif config.get("format") != RESULT_FORMAT:
        raise ResultError(f"{str(path)!r} is not a saftune result config")
    return config


def _check_files(directory: Path, config: dict) -> None:
    """Every artifact file of the result is there and matches its recorded checksum."""
    recorded = config.get("files")  # absent only in results of saftune <= 0.1.0
    for name in ARTIFACT_FILES.get(config.get("kind"), ()):
        path = directory / name
        if not path.is_file():
            raise ResultError(f"{str(path)!r} is missing: the {config['kind']} result in {str(directory)!r} is incomplete")
        if isinstance(recorded, dict) and recorded.get(name) != sha256_file(path):
            raise ResultError(f"{str(path)!r} is damaged or from another run: its bytes do not match the checksum in "
                              f"{CONFIG_NAME}; save the result again (the same `saftune train` command resumes from "
                              "the run's checkpoint and rewrites it)")


def _ensure_head(model: Classifier, names) -> None:
    """A saved linear probe on a dual encoder needs its head module before loading."""
    if any(n.startswith("head.") for n in names) and getattr(model, "head", "absent") is None:
        model.linear_head()


def save_weights(model: Classifier, directory: Path, info: dict) -> Path:
    """Kind `weights`: the whole classifier (shared tensors stored once)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / "model.safetensors") as tmp:
        save_model(model, str(tmp))
    write_result_config(directory, "weights", info)
    return directory


def save_partial_weights(tensors: dict[str, torch.Tensor], directory: Path, info: dict) -> Path:
    """Kind `partial_weights`: only the named tensors (e.g. a linear probe's head)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / "weights.safetensors") as tmp:
        save_file({n: t.detach().contiguous().cpu() for n, t in tensors.items()}, str(tmp))
    write_result_config(directory, "partial_weights", {**info, "tensors": sorted(tensors)})
    return directory


def load_result(directory: str | Path, model: Classifier) -> dict:
    """Apply a saved result to `model` (built from the recorded base model, classes already set).

    Returns the result's config. Raises `ResultError` (or `DeltaError`) when it does not fit.
    """
    directory = Path(directory)
    config = read_result_config(directory)
    kind = config.get("kind")
    _check_files(directory, config)
    try:
        _apply(kind, directory, model)
    except (SafetensorError, OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError) as e:
        raise ResultError(f"cannot load the {kind} result in {str(directory)!r}: {e!r}; the result is damaged") from e
    return config


def _apply(kind: str, directory: Path, model: Classifier) -> None:
    """Load a checked result of `kind` into `model`."""
    if kind == "none":
        return
    if kind == "sparse_delta":
        SparseDelta.from_pretrained(directory).apply_to(model)
    elif kind == "weights":
        try:
            from safetensors import safe_open

            with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
                _ensure_head(model, f.keys())
            missing, unexpected = load_model(model, str(directory / "model.safetensors"), strict=False)
        except (OSError, RuntimeError) as e:
            raise ResultError(f"cannot load {str(directory / 'model.safetensors')!r}: {e}") from e
        if unexpected or [m for m in missing if not m.startswith("head.")]:
            raise ResultError(f"weights do not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    elif kind == "partial_weights":
        tensors = load_file(str(directory / "weights.safetensors"))
        _ensure_head(model, tensors)
        missing = [n for n in tensors if n not in dict(model.named_parameters())]
        if missing:
            raise ResultError(f"the saved tensors {missing[:3]} are not parameters of this model")
        model.load_state_dict(tensors, strict=False)
    elif kind == "lora":
        from saftune.methods.lora import load_lora

        load_lora(model, directory)
    elif kind == "prompt":
        from saftune.methods.coop import load_prompt

        load_prompt(model, directory)
    else:
        raise ResultError(f"unknown result kind {kind!r} in {str(directory)!r}")
