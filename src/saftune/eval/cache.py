"""Accuracies already measured in this process, keyed by the model's weights and the split.

A grid evaluates the same weights on the same test sets more than once: the zero-shot model once per
seed (the test and OOD sets do not depend on the seed), WiSE-FT's alpha = 0 end (the pretrained model
again) and its alpha = 1 end (the fine-tuned model the `ft` row of the same seed already evaluated). A
MiniLM evaluation of the demo's 2,000 test sentences costs about as much as a whole training run on 2
CPU cores, so a grid keeps one `EvaluationCache` and asks it first.

The key is a digest of every parameter and buffer (names, dtypes, shapes and bytes), the split's
inputs, labels and class names, and the batch size (padding changes float rounding). That is all an
evaluation depends on as long as the model's behaviour lives in its tensors, which holds for every
saftune method: masks, adapters and prompt learners are modules or weights of the model.

Example:
    >>> import torch
    >>> cache = EvaluationCache()
    >>> net = torch.nn.Linear(2, 2)
    >>> key = cache.key(net, ("toy", ["a", "b"], [0, 1]), batch_size=8)
    >>> cache.get(key) is None
    True
    >>> cache.put(key, 0.5); cache.get(key)
    0.5
    >>> with torch.no_grad():
    ...     _ = net.weight.add_(1.0)
    >>> cache.key(net, ("toy", ["a", "b"], [0, 1]), batch_size=8) == key
    False
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from saftune.sparse.quantized import stored_tensors


def weights_digest(model: torch.nn.Module) -> str:
    """Hex digest of every parameter and buffer of `model`: names, dtypes, shapes and values.

    Example:
        >>> a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        >>> b.load_state_dict(a.state_dict())
        <All keys matched successfully>
        >>> weights_digest(a) == weights_digest(b)
        True
    """
    digest = hashlib.blake2b(digest_size=20)
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in tensors:
        tensor = tensor.detach()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        for part in stored_tensors(tensor):
            digest.update(_tensor_bytes(part))
    # A quantized base's trained entries live beside its weights (`saftune.sparse.quantized`), not in them.
    for name, module in model.named_modules():
        side = module.__dict__.get("_saftune_side")
        if side is not None:
            digest.update(f"{name}:side;".encode())
            for part in (side.indices, side.values.detach().float(), side.pretrained.float()):
                digest.update(_tensor_bytes(part))
    return digest.hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    # Viewed as bytes, so bf16 (which numpy lacks) hashes like any other dtype.
    flat = tensor.cpu().contiguous().reshape(-1)
    if flat.numel() and flat.stride(-1) != 1:  # a one-entry view keeps its stride (torchao's NF4 scale factors)
        flat = flat.clone(memory_format=torch.contiguous_format)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def data_digest(*parts) -> str:
    """Hex digest of nested lists/tuples of str, numbers, paths, None and arrays (a split's content)."""
    digest = hashlib.blake2b(digest_size=20)

    def feed(x) -> None:
        if isinstance(x, (list, tuple)):
            digest.update(f"[{len(x)}".encode())
            for item in x:
                feed(item)
            digest.update(b"]")
        elif isinstance(x, (np.ndarray, torch.Tensor)):
            array = np.ascontiguousarray(x.numpy() if isinstance(x, torch.Tensor) else x)
            digest.update(f"a{array.dtype}{array.shape}".encode())
            digest.update(array.tobytes())
        elif isinstance(x, np.generic):
            feed(x.item())
        elif x is None or isinstance(x, (str, int, float, bool, Path)):
            digest.update(f"{type(x).__name__}:{x!s};".encode())
        else:
            raise TypeError(f"cannot fingerprint {type(x).__name__} in an evaluation key")

    for part in parts:
        feed(part)
    return digest.hexdigest()


class EvaluationCache:
    """Split scores by (weights digest, split content, class names, batch size).

    In memory, and with `path` also in a JSON-lines file that several processes append to and read
    (each entry is one short line, written with one append).
    """

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        self._scores: dict[tuple, float | dict[str, float]] = {}
        self._read_up_to = 0  # bytes of the file already read
        self.hits = 0

    def key(self, model: torch.nn.Module, split_content, *, batch_size: int, weights: str | None = None) -> tuple:
        """The cache key of evaluating `model` on `split_content`; pass `weights` to reuse a digest."""
        return (weights or weights_digest(model), data_digest(split_content), batch_size)

    def get(self, key: tuple) -> float | dict[str, float] | None:
        score = self._scores.get(key)
        if score is None and self.path is not None:
            self._read_new_lines()  # what other processes measured since
            score = self._scores.get(key)
        self.hits += score is not None
        return score

    def get_or_compute(self, key: tuple, compute):
        """The score kept under `key`, or `compute()`'s, which is then kept."""
        score = self.get(key)
        if score is None:
            score = compute()
            self.put(key, score)
        return score

    def put(self, key: tuple, score: float | dict[str, float]) -> None:
        """Keep a score: one accuracy, or several measures of one evaluation (a dict of floats)."""
        self._scores[key] = score
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps([list(key), score]) + "\n")

    def _read_new_lines(self) -> None:
        if not self.path.is_file():
            return
        with open(self.path, "rb") as f:
            f.seek(self._read_up_to)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written is read next time
        self._read_up_to += len(complete)
        for line in complete.splitlines():
            try:
                key, score = json.loads(line)
                self._scores[tuple(key)] = score if isinstance(score, dict) else float(score)
            except (ValueError, TypeError):
                continue  # a damaged line only costs its evaluation being redone

    def __len__(self) -> int:
        return len(self._scores)
