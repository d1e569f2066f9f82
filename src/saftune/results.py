"""Result artifacts: what a run saves, and how a result is loaded, merged and interpolated.

Every result directory holds `saftune_config.json` with a `kind`. The method that writes a kind also
loads it (`Method.result_kind`, `Method.apply_result`, `Method.result_files`), so this module finds the
loader of a kind in the method registry; the built-in kinds:

    sparse_delta    saft, bitfit: `delta.safetensors` (indices, trained and pretrained values)
    weights         full fine-tuning family: `model.safetensors` (the whole classifier)
    partial_weights lp: `weights.safetensors` (only the trained tensors, e.g. the head)
    lora            lora: PEFT adapter, `adapter_config.json` + `adapter_model.safetensors`
    prompt          coop: `prompt.safetensors` (the learned context vectors)
    none            zeroshot: nothing trained

The config also records the model spec, dataset, method and its options, so `saftune eval` can rebuild
the base model, and the SHA-256 of each artifact file, so a damaged file is refused instead of loaded.
Only safetensors and JSON are written: nothing is pickled.

What a result is used for, given its base model (built from the recorded spec, classes set):

    load_result(directory, model)             apply it (merge=True: fold adapters into the weights)
    merge_result(directory, model, out)       apply and fold it, then save the merged model
    interpolate(directory, model, alphas)     WiSE-FT: walk the model from the base to the result
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import save_model

from saftune._io import sha256_file, write_json
from saftune.models.base import Classifier
from saftune.sparse.delta import CONFIG_NAME

RESULT_FORMAT = "saftune.result"
MERGED_CONFIG = "saftune_merged.json"


class ResultError(ValueError):
    """A result directory is missing, damaged or does not fit the model."""


def result_directory(path: str | Path) -> Path:
    """Accept a run directory (which holds result/) or the result directory itself."""
    path = Path(path)
    if (path / "result" / CONFIG_NAME).is_file():
        return path / "result"
    return path


def _loader(kind, directory: Path | None = None):
    """The registered method class that saves and loads results of `kind`."""
    # The methods write their results through this module, so their registry is imported only when used.
    from saftune.methods.base import result_kinds

    loaders = result_kinds()
    if kind not in loaders:
        where = f" in {str(directory)!r}" if directory is not None else ""
        raise ResultError(f"unknown result kind {kind!r}{where}; known kinds: {', '.join(loaders)}")
    return loaders[kind]


def write_result_config(directory: Path, kind: str, info: dict) -> Path:
    """Write `saftune_config.json` last, with the checksums of the artifact files already written."""
    from saftune import __version__

    directory = Path(directory)
    files = {name: sha256_file(directory / name) for name in _loader(kind).result_files}
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


def _check_files(directory: Path, config: dict, names: Iterable[str]) -> None:
    """Every artifact file of the result is there and matches its recorded checksum."""
    recorded = config.get("files")  # absent only in results of saftune <= 0.1.0
    for name in names:
        path = directory / name
        if not path.is_file():
            raise ResultError(f"{str(path)!r} is missing: the {config['kind']} result in {str(directory)!r} is incomplete")
        if isinstance(recorded, dict) and recorded.get(name) != sha256_file(path):
            raise ResultError(f"{str(path)!r} is damaged or from another run: its bytes do not match the checksum in "
                              f"{CONFIG_NAME}; save the result again (the same `saftune train` command resumes from "
                              "the run's checkpoint and rewrites it)")


def ensure_head(model: Classifier, names: Iterable[str]) -> None:
    """Attach the linear head a saved result holds tensors for (`head.*`) to a dual encoder that has none yet."""
    if any(n.startswith("head.") for n in names) and getattr(model, "head", "absent") is None:
        model.linear_head()


def load_result(directory: str | Path, model: Classifier, *, merge: bool = False) -> dict:
    """Apply a saved result to `model` (built from the recorded base model, classes already set).

    Args:
        directory: the result directory (`saftune train` writes it as <run>/result).
        model: the pretrained base model.
        merge: fold what the result attaches (LoRA adapters) into the model's own weights.

    Returns the result's config. Raises `ResultError` (or `DeltaError`) when it does not fit.

    Example:
        >>> model = create("tiny-clip"); model.set_classes(["dark", "bright"])   # doctest: +SKIP
        >>> load_result("runs/ft/result", model)["method"]                        # doctest: +SKIP
        'ft'
    """
    directory = Path(directory)
    config = read_result_config(directory)
    kind = config.get("kind")
    method = _loader(kind, directory)
    _check_files(directory, config, method.result_files)
    try:
        method.apply_result(model, directory, config, merge=merge)
    except (SafetensorError, OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError) as e:
        raise ResultError(f"cannot load the {kind} result in {str(directory)!r}: {e!r}; the result is damaged") from e
    return config


def _transformers_module(model: Classifier):
    """The transformers model a classifier wraps (CLIPModel, BertModel, ...), or None."""
    from transformers import PreTrainedModel

    return next((m for m in model.children() if isinstance(m, PreTrainedModel)), None)


def merge_result(directory: str | Path, model: Classifier, out: str | Path, *, base_model: str | None = None) -> dict:
    """Apply a result to its base `model`, fold it into the weights, and save the merged model in `out`.

    The merged model is saved in the Hugging Face layout (`save_pretrained` of the wrapped transformers
    model, and its tokenizer): it loads with `from_pretrained`, no saftune needed. A result that adds
    tensors the base model lacks (a linear probe's head, CoOp's context vectors), or a model that wraps
    no transformers model, is saved as `model.safetensors` of the saftune classifier instead.
    `saftune_merged.json` records where it came from; it is also returned.

    Example:
        >>> merge_result("runs/saft/result", model, "merged/")["layout"]   # doctest: +SKIP
        'Hugging Face (from_pretrained)'
    """
    directory, out = Path(directory), Path(out)
    base_names = set(model.state_dict())
    config = load_result(directory, model, merge=True)
    out.mkdir(parents=True, exist_ok=True)
    inner = _transformers_module(model)
    if inner is not None and set(model.state_dict()) == base_names:
        inner.save_pretrained(out)
        tokenizer = getattr(model, "tokenizer", None)
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(out)
        layout = "Hugging Face (from_pretrained)"
    else:
        save_model(model, str(out / "model.safetensors"))
        layout = "safetensors of the saftune classifier"
    merged = {"merged_from": str(directory), "base_model": base_model or config.get("base_model"),
              "method": config.get("method"), "layout": layout}
    write_json(out / MERGED_CONFIG, merged)
    return merged


def interpolate(directory: str | Path, model: Classifier, alphas: Iterable[float]) -> Iterator[float]:
    """WiSE-FT between the base `model` and a result: set the model to each mixing weight in turn.

    For each alpha the model holds (1 - alpha) * pretrained + alpha * fine-tuned weights (`lerp_weights`,
    the function the `wiseft` method uses), and alpha is yielded. The result's adapters are merged first;
    tensors the result adds (a linear probe's head) have no pretrained value and keep their trained one.

    Example:
        >>> for alpha in interpolate("runs/ft/result", model, [0.0, 0.5, 1.0]):   # doctest: +SKIP
        ...     print(alpha, evaluate(model, bench)["id"])
    """
    from saftune.methods.wiseft import lerp_weights
    from saftune.sparse.quantized import copy_model

    pretrained = {k: v.detach().clone() for k, v in model.state_dict().items()}
    finetuned_model = copy_model(model)  # deepcopy, with quantized weights copied exactly
    load_result(directory, finetuned_model, merge=True)
    finetuned = finetuned_model.state_dict()
    ensure_head(model, finetuned)
    added = {k: finetuned[k] for k in model.state_dict() if k not in pretrained}
    for alpha in alphas:
        model.load_state_dict({**lerp_weights(pretrained, finetuned, alpha), **added})
        yield alpha
