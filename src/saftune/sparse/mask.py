"""`SparseMask`: which entries of which parameters a sparse fine-tuning run may change.

A mask is a set of flat indices per parameter tensor (sorted, unique, int64), plus the shapes of all
*candidate* parameters (so a summary can say "12 of 590k entries in layer 3 were chosen") and the
settings that produced it. It is saved as one safetensors file whose header carries the JSON metadata:
nothing is pickled.

Example:
    >>> import torch
    >>> mask = SparseMask({"w": torch.tensor([0, 3])}, shapes={"w": (2, 2), "b": (2,)})
    >>> mask.num_selected, mask.num_candidates
    (2, 6)
    >>> (mask & SparseMask({"w": torch.tensor([3])}, shapes={"w": (2, 2)})).counts
    {'w': 1}
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from saftune._io import atomic_path

MASK_FORMAT = "saftune.sparse_mask"
MASK_FORMAT_VERSION = 1


class MaskFileError(ValueError):
    """A mask file is missing, truncated, corrupt or from an incompatible format version."""


def _numel(shape) -> int:
    return math.prod(shape)


def _check_indices(name: str, idx: torch.Tensor, numel: int, source: str) -> torch.Tensor:
    """Validate one parameter's indices: 1-D integers, strictly increasing, inside the tensor."""
    if idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{source}: indices of {name!r} must be a 1-D integer tensor, got {tuple(idx.shape)} {idx.dtype}")
    idx = idx.to(torch.int64)
    if idx.numel() and (idx[0] < 0 or idx[-1] >= numel):
        raise ValueError(f"{source}: indices of {name!r} fall outside its {numel} entries")
    if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise ValueError(f"{source}: indices of {name!r} must be sorted and unique")
    return idx


@dataclass(frozen=True)
class BlockCount:
    """One row of `SparseMask.summary()`: how many entries of a block were selected."""

    block: str
    selected: int
    total: int

    @property
    def share(self) -> float:
        """Fraction of the block's entries that were selected."""
        return self.selected / self.total if self.total else 0.0


class SparseMask:
    """Selected flat indices per parameter.

    Args:
        indices: parameter name -> 1-D integer tensor of flat indices into that parameter. Unsorted
            input is sorted; duplicates are an error. Empty tensors are dropped.
        shapes: shape of every candidate parameter (at least those in `indices`). Used for validation,
            for counting candidates, and for the per-block summary.
        meta: free-form JSON-serialisable settings (score, sparsity, include, ...), saved with the mask.
    """

    def __init__(
        self,
        indices: Mapping[str, torch.Tensor],
        shapes: Mapping[str, tuple[int, ...]],
        meta: Mapping | None = None,
    ):
        self.shapes: dict[str, tuple[int, ...]] = {n: tuple(int(s) for s in shp) for n, shp in shapes.items()}
        self.indices: dict[str, torch.Tensor] = {}
        for name, idx in indices.items():
            if name not in self.shapes:
                raise ValueError(f"mask: parameter {name!r} has indices but no shape; pass it in `shapes`")
            idx = torch.as_tensor(idx).detach().cpu().reshape(-1).to(torch.int64)
            if idx.numel() == 0:
                continue
            idx = torch.sort(idx).values
            self.indices[name] = _check_indices(name, idx, _numel(self.shapes[name]), "mask")
        self.meta: dict = dict(meta or {})

    # ------------------------------------------------------------------ counts
    @property
    def counts(self) -> dict[str, int]:
        """Number of selected entries per parameter (only parameters with at least one)."""
        return {n: int(i.numel()) for n, i in self.indices.items()}

    @property
    def num_selected(self) -> int:
        """Total number of selected entries, d."""
        return sum(int(i.numel()) for i in self.indices.values())

    @property
    def num_candidates(self) -> int:
        """Total number of entries the selection chose from, D."""
        return sum(_numel(s) for s in self.shapes.values())

    @property
    def density(self) -> float:
        """d / D."""
        return self.num_selected / max(self.num_candidates, 1)

    def boolean(self, name: str, device=None) -> torch.Tensor:
        """Dense boolean mask of one parameter, shaped like it (for tests and plots, not for training)."""
        flat = torch.zeros(_numel(self.shapes[name]), dtype=torch.bool, device=device)
        if name in self.indices:
            flat[self.indices[name].to(device)] = True
        return flat.view(self.shapes[name])

    # ------------------------------------------------------------------ summary
    def summary(self, group_by=None) -> list[BlockCount]:
        """Selected entries per block, in parameter order (the paper's Fig. 6).

        Args:
            group_by: function parameter name -> block name. The default groups by the name up to the
                first numeric component ("encoder.layer.3.attention.self.query.weight" ->
                "encoder.layer.3"), and by the module path (name without its last component) for
                parameters outside numbered blocks.

        Example:
            >>> m = SparseMask({"enc.layer.0.w": torch.tensor([1])}, {"enc.layer.0.w": (4,), "head.w": (4,)})
            >>> [(r.block, r.selected, r.total) for r in m.summary()]
            [('enc.layer.0', 1, 4), ('head', 0, 4)]
        """
        group_by = group_by or default_block_name
        rows: dict[str, list[int]] = {}
        for name, shape in self.shapes.items():
            row = rows.setdefault(group_by(name), [0, 0])
            row[0] += int(self.indices[name].numel()) if name in self.indices else 0
            row[1] += _numel(shape)
        return [BlockCount(b, s, t) for b, (s, t) in rows.items()]

    def format_summary(self, group_by=None) -> str:
        """The summary as an aligned text table."""
        rows = self.summary(group_by)
        width = max([len(r.block) for r in rows] + [5])
        lines = [f"{'block':<{width}}  {'selected':>9}  {'total':>11}  {'share':>8}"]
        lines += [f"{r.block:<{width}}  {r.selected:>9d}  {r.total:>11d}  {r.share:>8.2e}" for r in rows]
        lines.append(f"{'all':<{width}}  {self.num_selected:>9d}  {self.num_candidates:>11d}  {self.density:>8.2e}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ set operations
    def _combine(self, other: SparseMask, op: str) -> SparseMask:
        if not isinstance(other, SparseMask):
            return NotImplemented
        for name in set(self.shapes) & set(other.shapes):
            if self.shapes[name] != other.shapes[name]:
                raise ValueError(f"masks disagree on the shape of {name!r}: {self.shapes[name]} vs {other.shapes[name]}")
        shapes = {**other.shapes, **self.shapes}
        empty = torch.empty(0, dtype=torch.int64)
        out = {}
        for name in shapes:
            a, b = self.indices.get(name, empty), other.indices.get(name, empty)
            if op == "and":
                out[name] = a[torch.isin(a, b)]
            elif op == "or":
                out[name] = torch.unique(torch.cat([a, b]))
            else:  # "sub"
                out[name] = a[~torch.isin(a, b)]
        return SparseMask(out, shapes, {"derived_from": op})

    def __and__(self, other):
        return self._combine(other, "and")

    def __or__(self, other):
        return self._combine(other, "or")

    def __sub__(self, other):
        return self._combine(other, "sub")

    def overlap(self, other: SparseMask) -> float:
        """Intersection over union of the selected entries (1.0 for equal masks)."""
        union = (self | other).num_selected
        return (self & other).num_selected / union if union else 1.0

    def __eq__(self, other) -> bool:
        if not isinstance(other, SparseMask):
            return NotImplemented
        return self.indices.keys() == other.indices.keys() and all(
            torch.equal(i, other.indices[n]) for n, i in self.indices.items()
        )

    __hash__ = None  # masks are mutable containers of tensors

    def __repr__(self) -> str:
        return (
            f"SparseMask(selected={self.num_selected}, candidates={self.num_candidates}, "
            f"density={self.density:.3g}, tensors={len(self.indices)}/{len(self.shapes)})"
        )

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write the mask to one safetensors file (indices as int32 where they fit, metadata as JSON)."""
        path = Path(path)
        tensors = {
            name: idx.to(torch.int32 if _numel(self.shapes[name]) < 2**31 else torch.int64).contiguous()
            for name, idx in self.indices.items()
        }
        header = {
            "format": MASK_FORMAT,
            "format_version": MASK_FORMAT_VERSION,
            "shapes": {n: list(s) for n, s in self.shapes.items()},
            "meta": self.meta,
        }
        header["digest"] = _digest(header, self.indices)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"saftune": json.dumps(header)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> SparseMask:
        """Read a mask written by `save`, validating it; a damaged file raises `MaskFileError`."""
        path = Path(path)
        if not path.is_file():
            raise MaskFileError(f"mask file {str(path)!r} does not exist (write one with `saftune select`)")
        try:
            tensors = load_file(str(path))
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                header = json.loads((f.metadata() or {}).get("saftune", "null"))
        except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as e:
            raise MaskFileError(f"mask file {str(path)!r} is truncated or corrupt ({e}); select the mask again") from e
        if not isinstance(header, dict) or header.get("format") != MASK_FORMAT:
            raise MaskFileError(f"{str(path)!r} is not a saftune mask file (no saftune mask header)")
        if header.get("format_version") != MASK_FORMAT_VERSION:
            raise MaskFileError(
                f"mask file {str(path)!r} has format version {header.get('format_version')}, this saftune reads "
                f"version {MASK_FORMAT_VERSION}; select the mask again with this version"
            )
        if "digest" in header and _digest(header, tensors) != header["digest"]:  # no digest: saftune <= 0.1.0
            raise MaskFileError(f"mask file {str(path)!r} is damaged: its contents do not match the checksum in its "
                                "header; select the mask again")
        try:
            shapes = {n: tuple(s) for n, s in header["shapes"].items()}
            unknown = set(tensors) - set(shapes)
            if unknown:
                raise ValueError(f"indices for {sorted(unknown)[:3]} but no shapes")
            # safetensors stores keys sorted; the header keeps the model's parameter order
            return cls({n: tensors[n] for n in shapes if n in tensors}, shapes, header.get("meta"))
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            raise MaskFileError(f"mask file {str(path)!r} is inconsistent: {e}") from e


def _digest(header: dict, indices: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the header (without its digest) and every parameter's indices as int64."""
    h = hashlib.sha256(json.dumps({k: v for k, v in header.items() if k != "digest"}, sort_keys=True).encode())
    for name in sorted(indices):
        h.update(name.encode() + b"\0")
        h.update(indices[name].to(torch.int64).contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()


_NUMBERED = re.compile(r"^\d+$")


def default_block_name(param_name: str) -> str:
    """Block of a parameter: its name up to the first numeric component, else its module path.

    Example:
        >>> default_block_name("text_model.encoder.layers.11.mlp.fc1.weight")
        'text_model.encoder.layers.11'
        >>> default_block_name("logit_scale")
        'logit_scale'
    """
    parts = param_name.split(".")
    for i, part in enumerate(parts):
        if _NUMBERED.match(part):
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) or param_name
