"""`SparseDelta`: the artifact of a sparse fine-tuning run.

A delta stores, per touched tensor, the flat indices of the trained entries, their trained values
(fp32) and their pretrained values (in the base model's dtype, so unmerging is exact). On disk it is a
directory with `saftune_config.json` and `delta.safetensors`; at sparsity 1e-3 that is ~0.3% of the
fp32 model (12 bytes per entry: int32 index, fp32 value, fp32 pretrained value).

Applying a delta checks the model first: every selected entry must hold either the pretrained value
(then it is merged) or the trained value (already merged: nothing to do). Anything else means the
model is not the base the delta was trained from, and nothing is written.

Quantized bases (`saftune.sparse.quantized`): a weight quantized to int8 or nf4 cannot take trained values, so
`apply_to` attaches the delta's entries to it as a side term (y = x Q(W)^T + x Delta^T, no requantization
error). A delta *trained* on a quantized base records Q(W) as its pretrained values; applied to the
full-precision base it is first rebased (`rebased`): each entry gets W + (trained - Q(W)), after checking
that W quantizes to the recorded Q(W).

Example:
    >>> import torch, tempfile
    >>> base = torch.nn.Linear(3, 2)
    >>> pre = base.weight.detach().reshape(-1)[[1, 4]].clone()
    >>> delta = SparseDelta({"weight": torch.tensor([1, 4])}, {"weight": pre + 1}, {"weight": pre}, {"weight": (2, 3)})
    >>> out = tempfile.mkdtemp()
    >>> _ = delta.save_pretrained(out)
    >>> _ = SparseDelta.from_pretrained(out).apply_to(base)
    >>> bool(torch.equal(base.weight.reshape(-1)[[1, 4]], pre + 1))
    True
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from saftune._io import atomic_path, sha256_file, write_json
from saftune.sparse.mask import SparseMask
from saftune.sparse import quantized as q

CONFIG_NAME = "saftune_config.json"
WEIGHTS_NAME = "delta.safetensors"
DELTA_FORMAT = "saftune.sparse_delta"
DELTA_FORMAT_VERSION = 1
_SEP = "::"  # tensor keys are "<parameter name>::indices" etc.; "::" cannot occur in a module path


class DeltaError(ValueError):
    """A delta file is damaged or incompatible, or does not fit the model it is applied to."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def fingerprint(indices: Mapping[str, torch.Tensor], pretrained: Mapping[str, torch.Tensor], shapes: Mapping) -> str:
    """SHA-256 over parameter names, shapes, selected indices and the pretrained values there."""
    h = hashlib.sha256()
    for name in sorted(indices):
        h.update(name.encode())
        h.update(repr(tuple(shapes[name])).encode())
        h.update(indices[name].to(torch.int64).contiguous().numpy().tobytes())
        pre = pretrained[name].contiguous()
        h.update(_dtype_name(pre.dtype).encode())
        h.update(pre.view(torch.uint8).numpy().tobytes() if pre.numel() else b"")
    return "sha256:" + h.hexdigest()


class SparseDelta:
    """Trained values at fixed indices, with the pretrained values they replace.

    Args:
        indices: parameter name -> sorted int64 flat indices.
        values: parameter name -> trained values (fp32).
        pretrained: parameter name -> pretrained values (the base model's dtype).
        shapes: parameter name -> shape of the full parameter.
        config: JSON-serialisable description of the run (method, base_model, sparsity, ...).
    """

    def __init__(self, indices, values, pretrained, shapes, config: Mapping | None = None):
        names = set(indices)
        if set(values) != names or set(pretrained) != names or not names <= set(shapes):
            raise DeltaError("delta: indices, values, pretrained and shapes must cover the same parameters")
        self.indices = {n: torch.as_tensor(indices[n]).to(torch.int64) for n in indices}
        self.values = {n: values[n].detach().float() for n in indices}
        self.pretrained = {n: pretrained[n].detach() for n in indices}
        self.shapes = {n: tuple(int(s) for s in shapes[n]) for n in indices}
        for n in indices:
            if not self.indices[n].numel() == self.values[n].numel() == self.pretrained[n].numel():
                raise DeltaError(f"delta: tensor {n!r} has different numbers of indices, values and pretrained values")
        self.config = dict(config or {})

    # ------------------------------------------------------------------ basic facts
    @property
    def num_entries(self) -> int:
        """Number of trained entries, d."""
        return sum(i.numel() for i in self.indices.values())

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the base model at the selected entries (see `fingerprint`)."""
        return fingerprint(self.indices, self.pretrained, self.shapes)

    def to_mask(self) -> SparseMask:
        """The mask of this delta's entries."""
        return SparseMask(self.indices, self.shapes, {"derived_from": "delta"})

    def __repr__(self) -> str:
        return f"SparseDelta(entries={self.num_entries}, tensors={len(self.indices)}, method={self.config.get('method')!r})"

    # ------------------------------------------------------------------ model operations
    def _target(self, model: torch.nn.Module, name: str) -> torch.Tensor:
        try:
            param = model.get_parameter(name)
        except AttributeError:
            raise DeltaError(
                f"the delta changes parameter {name!r}, which this model does not have; apply it to the base "
                f"model it was trained from ({self.config.get('base_model', 'unknown base')})"
            ) from None
        if tuple(param.shape) != self.shapes[name]:
            raise DeltaError(
                f"parameter {name!r} has shape {tuple(param.shape)} in this model but {self.shapes[name]} in the "
                f"delta's base model ({self.config.get('base_model', 'unknown base')})"
            )
        return param

    @property
    def quantized_tensors(self) -> set[str]:
        """The tensors this delta was trained on quantized (their pretrained values are the dequantized ones)."""
        return set((self.config.get("quantized_base") or {}).get("tensors", []))

    @property
    def quantized_scheme(self) -> str | None:
        """How the quantized tensors were quantized ("int8" or "nf4"), or None."""
        return (self.config.get("quantized_base") or {}).get("scheme")

    @torch.no_grad()
    def rebased(self, model: torch.nn.Module) -> SparseDelta:
        """This delta moved onto the full-precision `model`: quantized-trained entries become W + (trained - Q(W)).

        The result's pretrained values are the model's own, so it merges and unmerges bit for bit. Every
        rebased tensor is checked first: `model`'s weight, quantized as in training, must give the recorded
        Q(W) at the selected entries.
        """
        values, pretrained = dict(self.values), dict(self.pretrained)
        for name in sorted(self.quantized_tensors & set(self.indices)):
            param = self._target(model, name)
            if q.is_quantized(param):
                continue  # stays a side term
            idx = self.indices[name].to(param.device)
            base = param.reshape(-1)[idx]
            if torch.equal(base.to(self.pretrained[name].dtype), self.pretrained[name].to(param.device)):
                continue  # the quantized base's exact dequantized weights (`quantized.dequantize_model`): merges as it is
            requantized = q.requantized_values(param.detach(), idx, self.quantized_scheme)
            if not torch.equal(requantized.to(self.pretrained[name].dtype), self.pretrained[name].to(param.device)):
                raise DeltaError(
                    f"cannot rebase the delta onto {name!r}: quantized to {self.quantized_scheme} this weight does not give the values the "
                    f"delta was trained beside; this is not the full-precision base of {self.config.get('base_model', 'the delta')} "
                    "(or the delta is already merged into it)"
                )
            pretrained[name] = base.detach().cpu().clone()
            values[name] = base.float().cpu() + (self.values[name] - self.pretrained[name].float())
        config = {k: v for k, v in self.config.items() if k != "quantized_base"}
        if self.quantized_tensors:
            config["rebased_from_quantized"] = self.config["quantized_base"]
        return SparseDelta(self.indices, values, pretrained, self.shapes, config)

    @torch.no_grad()
    def _side_terms(self, model: torch.nn.Module, names: list[str], action: str) -> dict[str, tuple]:
        """Check the quantized targets: their dequantized entries must be the delta's base (or within half a step)."""
        sides = {}
        for name in names:
            param = self._target(model, name)
            q.check_routable(name, param)
            module = model.get_submodule(name.rpartition(".")[0])
            idx = self.indices[name].to(param.device)
            current = q.dequantize(param.detach()).reshape(-1)[idx].float()
            base = self.pretrained[name].to(param.device).float()
            if name in self.quantized_tensors:  # trained beside this very Q(W)
                if q.scheme_of(param) != self.quantized_scheme:
                    raise DeltaError(f"cannot {action}: this delta was trained beside {self.quantized_scheme} weights and "
                                     f"{name!r} is {q.scheme_of(param)}; load the model with quantize="
                                     f"{self.quantized_scheme!r} (or without quantize, to rebase it)")
                fits = torch.equal(current, base)
            else:  # trained on the full-precision weights: quantizing moved each entry by at most the rounding bound
                bound = q.rounding_bound(param.detach(), idx)  # (with 1% for the rounding of the dequantized values)
                fits = bool(((current - base).abs() <= bound * (1 + 1e-2) + 1e-12).all())
            if not fits:
                raise DeltaError(f"cannot {action}: the quantized weight {name!r} is not the base the delta was trained "
                                 f"from (base {self.config.get('base_model', 'unknown')})")
            sides[name] = (module, idx)
        return sides

    @torch.no_grad()
    def _write(self, model: torch.nn.Module, new_values: Mapping[str, torch.Tensor], action: str) -> torch.nn.Module:
        """Check every tensor first, then write: a refused delta leaves the model untouched.

        Quantized weights take the delta as a side term: attached on apply, detached on remove.
        """
        quantized = [n for n in self.indices if q.is_quantized(self._target(model, n))]
        if self.quantized_tensors - set(quantized):  # trained beside quantized weights, applied to full-precision ones
            if new_values is not self.values:
                raise DeltaError(f"cannot {action}: this delta was trained on a {self.quantized_scheme} base, and merging it into the "
                                 "full-precision base is not undone bit for bit; keep `delta.rebased(model)` and remove that")
            rebased = self.rebased(model)
            return rebased._write(model, rebased.values, action)
        sides = self._side_terms(model, quantized, action)
        targets = {}
        for name, idx in self.indices.items():
            if name in sides:
                continue
            param = self._target(model, name)
            idx = idx.to(param.device)
            current = param.reshape(-1)[idx]
            base = self.pretrained[name].to(param.device, param.dtype)
            trained = self.values[name].to(param.device, param.dtype)
            known = (current == base) | (current == trained)
            if not bool(known.all()):
                bad = int((~known).sum())
                raise DeltaError(
                    f"cannot {action}: {bad} of {idx.numel()} selected entries of {name!r} hold neither the base "
                    f"model's value nor the delta's; this is not the base model the delta was trained from "
                    f"(base {self.config.get('base_model', 'unknown')}, fingerprint {self.fingerprint[:19]}...)"
                )
            targets[name] = (param, idx)
        for name, (param, idx) in targets.items():
            param.view(-1).index_copy_(0, idx, new_values[name].to(param.device, param.dtype))
        for name, (module, idx) in sides.items():
            present = q.attached(module)
            if new_values is self.pretrained:  # remove: the side term goes, the quantized weight is the base again
                q.detach(module)
            elif present is None or not (torch.equal(present.indices, idx) and torch.equal(present.values, self.values[name].to(idx.device))):
                q.attach(module, q.SideTerm.build(idx, self.shapes[name], self.values[name].to(idx.device),
                                                  self.pretrained[name].to(idx.device)))
        return model

    def apply_to(self, model: torch.nn.Module) -> torch.nn.Module:
        """Merge: write the trained values into the base model (in place). Applying twice changes nothing."""
        return self._write(model, self.values, "apply the delta")

    def remove_from(self, model: torch.nn.Module) -> torch.nn.Module:
        """Unmerge: write the pretrained values back, bit for bit (in place)."""
        return self._write(model, self.pretrained, "remove the delta")

    # ------------------------------------------------------------------ arithmetic
    def scaled(self, alpha: float) -> SparseDelta:
        """WiSE-FT on the delta: values = pretrained + alpha * (trained - pretrained).

        alpha=0 gives the base model, alpha=1 this delta.
        """
        # lerp is exact at both ends (pre + 1 * (trained - pre) rounds in fp32: 1 + (1e-8 - 1) is 0).
        values = {n: torch.lerp(self.pretrained[n].float(), self.values[n].float(), alpha) for n in self.indices}
        return SparseDelta(self.indices, values, self.pretrained, self.shapes, {**self.config, "wiseft_alpha": alpha})

    @classmethod
    def compose(cls, deltas: Sequence[SparseDelta], weights: Sequence[float] | None = None) -> SparseDelta:
        """Add several deltas of one base model: theta = theta0 + sum_i w_i (theta_i - theta0).

        Entries trained by several deltas get the sum of their changes. Deltas must agree on the
        pretrained value of every entry they share (they come from the same base).
        """
        if not deltas:
            raise DeltaError("compose needs at least one delta")
        weights = [1.0] * len(deltas) if weights is None else list(weights)
        if len(weights) != len(deltas):
            raise DeltaError(f"compose got {len(deltas)} deltas but {len(weights)} weights")
        indices, values, pretrained, shapes = {}, {}, {}, {}
        for name in sorted({n for d in deltas for n in d.indices}):
            parts = [(d, w) for d, w in zip(deltas, weights) if name in d.indices]
            shape = parts[0][0].shapes[name]
            if any(d.shapes[name] != shape for d, _ in parts):
                raise DeltaError(f"compose: the deltas disagree on the shape of {name!r}")
            idx = torch.unique(torch.cat([d.indices[name] for d, _ in parts]))
            pre = torch.empty(idx.numel(), dtype=parts[0][0].pretrained[name].dtype)
            seen = torch.zeros(idx.numel(), dtype=torch.bool)
            change = torch.zeros(idx.numel(), dtype=torch.float32)
            for d, w in parts:
                pos = torch.searchsorted(idx, d.indices[name])
                mine = d.pretrained[name].to(pre.dtype)
                if not bool(torch.equal(pre[pos][seen[pos]], mine[seen[pos]])):
                    raise DeltaError(f"compose: the deltas have different pretrained values in {name!r}: not the same base model")
                pre[pos], seen[pos] = mine, True
                change[pos] += w * (d.values[name] - mine.float())
            indices[name], pretrained[name], shapes[name] = idx, pre, shape
            values[name] = pre.float() + change
        config = {"method": "composed", "composed_from": [d.config for d in deltas], "weights": weights}
        return cls(indices, values, pretrained, shapes, config)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write `saftune_config.json` and `delta.safetensors` into `directory` (atomically, file by file)."""
        from saftune import __version__

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name in self.indices:
            if _SEP in name:
                raise DeltaError(f"parameter name {name!r} contains {_SEP!r}, which delta files use as a separator")
            small = torch.int32 if self.indices[name].numel() == 0 or int(self.indices[name].max()) < 2**31 else torch.int64
            tensors[f"{name}{_SEP}indices"] = self.indices[name].to(small).contiguous()
            tensors[f"{name}{_SEP}values"] = self.values[name].contiguous()
            tensors[f"{name}{_SEP}pretrained"] = self.pretrained[name].contiguous()
        config = {
            "format": DELTA_FORMAT,
            "format_version": DELTA_FORMAT_VERSION,
            "library_version": __version__,
            **self.config,
            "base_fingerprint": self.fingerprint,
            "num_entries": self.num_entries,
            "tensors": {
                n: {"shape": list(self.shapes[n]), "dtype": _dtype_name(self.pretrained[n].dtype), "count": self.indices[n].numel()}
                for n in self.indices
            },
        }
        with atomic_path(directory / WEIGHTS_NAME) as tmp:
            save_file(tensors, str(tmp), metadata={"format": DELTA_FORMAT})
            config["weights_sha256"] = sha256_file(tmp)  # the base fingerprint does not cover the trained values
        write_json(directory / CONFIG_NAME, config)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> SparseDelta:
        """Load a delta directory, verifying format version and that the tensors match the config."""
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for p in (config_path, weights_path):
            if not p.is_file():
                raise DeltaError(f"{str(p)!r} is missing: {str(directory)!r} is not a saftune delta directory")
        try:
            config = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DeltaError(f"{str(config_path)!r} is not valid JSON ({e}); the delta is damaged") from e
        if not isinstance(config, dict) or config.get("format") != DELTA_FORMAT:
            raise DeltaError(f"{str(config_path)!r} is not a saftune delta config")
        if config.get("format_version") != DELTA_FORMAT_VERSION:
            raise DeltaError(
                f"{str(directory)!r} was written in delta format {config.get('format_version')} "
                f"(saftune {config.get('library_version')}); this saftune reads format {DELTA_FORMAT_VERSION}"
            )
        try:
            with safe_open(str(weights_path), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise DeltaError(f"{str(weights_path)!r} is truncated or corrupt ({e})") from e
        expected = config.get("weights_sha256")  # absent only in deltas of saftune <= 0.1.0
        if expected is not None and sha256_file(weights_path) != expected:
            raise DeltaError(f"{str(weights_path)!r} is damaged or from another run: its bytes do not match the "
                             f"checksum in {CONFIG_NAME}")
        try:
            meta = config["tensors"]
            indices = {n: tensors[f"{n}{_SEP}indices"].to(torch.int64) for n in meta}
            values = {n: tensors[f"{n}{_SEP}values"] for n in meta}
            pretrained = {n: tensors[f"{n}{_SEP}pretrained"] for n in meta}
            shapes = {n: tuple(m["shape"]) for n, m in meta.items()}
        except KeyError as e:
            raise DeltaError(f"{str(directory)!r}: the config names tensor {e} that {WEIGHTS_NAME} lacks") from None
        reserved = ("format", "format_version", "library_version", "base_fingerprint", "weights_sha256", "num_entries",
                    "tensors")
        settings = {k: v for k, v in config.items() if k not in reserved}
        delta = cls(indices, values, pretrained, shapes, settings)
        if delta.fingerprint != config.get("base_fingerprint"):
            raise DeltaError(f"{str(directory)!r}: {WEIGHTS_NAME} does not match the fingerprint in {CONFIG_NAME}; the files are damaged or mixed")
        return delta
