"""A sparse delta as a PEFT adapter: SHiRA, PEFT's own format for trainable values at fixed indices.

`export_peft_adapter(delta, base_model, out_dir)` writes a directory that `peft.PeftModel.from_pretrained`
loads onto the base model; `merge_and_unload()` then gives the weights of saftune's own merge
(`SparseDelta.apply_to`) bit for bit, and the unmerged adapter computes the same outputs.

How the delta maps onto SHiRA (peft >= 0.17, `peft/tuners/shira/`):

* SHiRA keeps, per adapted `nn.Linear`, `shira_indices` (2 x n: row, column) and `shira_weight` (n
  values), and merges as ``W += scaling * sparse(indices, weight)`` with scaling 1. Both tensors are
  saved in the adapter file; on load PEFT first builds a random mask from `r`, then replaces its indices
  with the saved ones, so the random mask never matters.
* It sizes every layer as ``n = r * (in + out)`` with one `r` for all layers. The export takes the
  smallest `r` that fits the densest layer and pads the others with unused entries whose weight is
  -0.0: ``w + (-0.0) == w`` bit for bit for every w (+0.0 would turn a -0.0 weight into +0.0).
* SHiRA adds a change; the delta holds values. `exact_offsets` picks per entry a change that PEFT's
  addition turns into exactly the trained value and checks every entry. For a bf16/fp16 model every
  entry is exact (PEFT keeps the adapter in float32 by default, where the difference of two bf16
  numbers is exact). For a float32 model an entry whose trained value ended much nearer zero than its
  pretrained one cannot be reached by any float32 addition (nor by any additive PEFT adapter); the
  export refuses such a delta unless `exact=False`, which takes the nearest value.
* Only `nn.Linear` weights can be adapted: a delta that touches embeddings, norms, biases or GPT-2's
  `Conv1D` is refused.

Example:
    >>> import tempfile, torch
    >>> from saftune.models.tiny_lm import tiny_causal_lm
    >>> from saftune.sparse.delta import SparseDelta
    >>> lm = tiny_causal_lm("llama")
    >>> name = "lm.model.layers.0.self_attn.q_proj.weight"
    >>> w = lm.get_parameter(name).detach().reshape(-1)
    >>> idx = torch.tensor([3, 70])
    >>> delta = SparseDelta({name: idx}, {name: w[idx] + 0.01}, {name: w[idx].clone()}, {name: (32, 32)})
    >>> out = export_peft_adapter(delta, lm, tempfile.mkdtemp())
    >>> sorted(p.name for p in out.iterdir())
    ['README.md', 'adapter_config.json', 'adapter_model.safetensors']
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from saftune._io import atomic_path
from saftune._quiet import quiet_torchao
from saftune.sparse.delta import SparseDelta

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "adapter_model.safetensors"  # the names PEFT reads
_KEY_PREFIX = "base_model.model."  # PEFT saves adapter tensors under the PeftModel's module names
_INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}


class PeftExportError(ValueError):
    """A delta cannot be written as a PEFT adapter (tensors outside nn.Linear, values not reachable exactly)."""


def _require_shira():
    try:
        with quiet_torchao():  # PEFT imports torchao when it is installed
            from peft import ShiraConfig
    except ImportError as e:
        raise ImportError("exporting a sparse delta as a PEFT adapter needs peft >= 0.17 (its SHiRA format): "
                          "pip install -U 'peft>=0.17'") from e
    return ShiraConfig


# ---------------------------------------------------------------------------------------------- exactness
def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(_INT_VIEW[x.element_size()])


def exact_offsets(base: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per entry a change `d` with ``base + d == target`` bit for bit, as PEFT's SHiRA merge computes it.

    PEFT adds the adapter weights (float32; float64 for a float64 model) into the weight in place: the
    sum is formed in the wider dtype and rounded to the weight's dtype. The candidates are -0.0 (keeps an
    unchanged entry, signed zero included), the difference rounded to the model's dtype (exact also when
    the adapter is kept in that dtype, `autocast_adapter_dtype=False`) and the difference in the adapter's
    dtype; the first one that PEFT's addition turns into the target is taken.

    Not every target is reachable: in float32, when the trained value is much nearer zero than the
    pretrained one (|t| < |b| / 2, e.g. a weight decayed or pushed through zero), b + d lies on a grid
    coarser than t's spacing for every float32 d. A bf16/fp16 model has no such entries: the difference
    of two bf16 numbers is exact in float32. Unreachable entries get the nearest value.

    Args:
        base: the pretrained values (the model's dtype).
        target: the trained values in the same dtype (what `SparseDelta.apply_to` writes).

    Returns:
        (changes in the adapter's dtype, `reached`: exact when PEFT loads the adapter as by default,
        `portable`: exact also with the adapter in the model's dtype).

    Example:
        >>> b = torch.tensor([1.0, 0.3, -0.0, 1.0]); t = torch.tensor([1.5, 0.31, -0.0, 1e-9])
        >>> d, reached, _ = exact_offsets(b, t)
        >>> bool(torch.equal(b[:3] + d[:3], t[:3])), reached.tolist()
        (True, [True, True, True, False])
    """
    if base.dtype != target.dtype or base.shape != target.shape:
        raise ValueError(f"base and target must have one dtype and shape; got {base.dtype} {tuple(base.shape)} "
                         f"and {target.dtype} {tuple(target.shape)}")
    dtype = base.dtype
    storage = torch.promote_types(dtype, torch.float32)  # PEFT's adapter dtype (autocast upcasts bf16/fp16)
    diff = target.double() - base.double()  # exact for any two float32 or narrower numbers
    candidates = [torch.full_like(diff, -0.0, dtype=storage)]  # +0.0 would turn a -0.0 weight into +0.0
    candidates += [diff.to(dt).to(storage) for dt in dict.fromkeys([dtype, storage])]
    cand = torch.stack(candidates)
    wide = (base.to(storage) + cand).to(dtype)  # PEFT's merge with the adapter in `storage`
    hit = _bits(wide) == _bits(target)
    both = hit & (_bits(base + cand.to(dtype)) == _bits(target)) if dtype != storage else hit
    reached, portable = hit.any(0), both.any(0)
    error = (wide.double() - target.double()).abs().nan_to_num(math.inf)
    # First candidate exact both ways, else first exact as PEFT loads by default, else the nearest.
    choice = torch.where(portable, both.to(torch.uint8).argmax(0),
                         torch.where(reached, hit.to(torch.uint8).argmax(0), error.argmin(0)))
    return cand.gather(0, choice.unsqueeze(0)).squeeze(0), reached, portable


# ---------------------------------------------------------------------------------------------- targets
def _peft_root(model: nn.Module) -> tuple[nn.Module, str]:
    """The model PEFT users load (the transformers model a saftune wrapper holds) and its name prefix."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return model, ""
    for name, child in model.named_children():
        if isinstance(child, PreTrainedModel):  # CausalLM keeps it as `lm`: delta names are "lm.<HF name>"
            return child, f"{name}."
    return model, ""


def _relative(name: str, root: nn.Module, prefix: str) -> str:
    """A delta tensor name relative to the PEFT root ("lm.model.x" -> "model.x")."""
    if prefix and name.startswith(prefix):
        return name[len(prefix):]
    head, _, rest = name.partition(".")
    if not prefix and rest and not hasattr(root, head):  # a wrapper's delta applied to the bare HF model
        return rest
    return name


def _linear_targets(delta: SparseDelta, root: nn.Module, prefix: str) -> dict[str, tuple[str, nn.Linear]]:
    """Delta tensor name -> (module path in `root`, the nn.Linear whose weight it is); refuses the rest."""
    targets, refused = {}, []
    for name in sorted(delta.indices):
        if delta.indices[name].numel() == 0:
            continue
        path = _relative(name, root, prefix)
        module_path, _, leaf = path.rpartition(".")
        try:
            module = root.get_submodule(module_path)
        except AttributeError:
            raise PeftExportError(f"the delta changes {name!r}, which the base model ({type(root).__name__}) does not "
                                  f"have; pass the base model the delta was trained from "
                                  f"({delta.config.get('base_model', 'unknown')})") from None
        if isinstance(module, nn.Linear) and leaf == "weight":
            targets[name] = (module_path, module)
        else:
            refused.append(f"{name} ({type(module).__name__}.{leaf})")
    if refused:
        shown = ", ".join(refused[:6]) + (f" and {len(refused) - 6} more" if len(refused) > 6 else "")
        raise PeftExportError(
            f"PEFT's sparse adapter (SHiRA) holds only torch.nn.Linear weights, but the delta also changes {shown}. "
            "Train with a mask on Linear weights only (SAFT `scope: attention` or `scope: mlp` on a model without "
            "biases, e.g. Llama), or save the merged model instead with `saftune merge`.")
    if not targets:
        raise PeftExportError("the delta changes no entries: there is nothing to export")
    return targets


def _shared_r(counts: Mapping[str, int], shapes: Mapping[str, tuple[int, int]]) -> int:
    """The smallest SHiRA r with r * (in + out) >= count in every layer, checked against each layer's size."""
    r = max(1, *(math.ceil(counts[n] / sum(shapes[n])) for n in counts))
    for n, (rows, cols) in shapes.items():
        if r * (rows + cols) > rows * cols:
            densest = max(counts, key=lambda m: counts[m] / sum(shapes[m]))
            raise PeftExportError(
                f"SHiRA gives every layer r * (in + out) entries with one r; {densest!r} ({counts[densest]} entries) "
                f"needs r={r}, more than {n!r} ({rows}x{cols}) can hold. This delta is too dense in one layer for a "
                "SHiRA adapter; save the merged model with `saftune merge` instead.")
    return r


def _padded(flat: torch.Tensor, offsets: torch.Tensor, size: int, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill up to `size` entries with unused positions whose change is -0.0 (a bit-exact no-op)."""
    free = torch.ones(numel, dtype=torch.bool)
    free[flat] = False
    extra = free.nonzero().squeeze(1)[: size - flat.numel()]
    flat = torch.cat([flat, extra])
    offsets = torch.cat([offsets, torch.full((extra.numel(),), -0.0, dtype=offsets.dtype)])
    order = flat.argsort()
    return flat[order], offsets[order]


# ---------------------------------------------------------------------------------------------- export
def _task_type(root: nn.Module) -> str | None:
    # PeftModel.from_pretrained picks its class from the task type; causal LMs get generate() support.
    return "CAUSAL_LM" if type(root).__name__.endswith("ForCausalLM") else None


def _run_metrics(directory: Path | None) -> dict | None:
    """The metrics `saftune train` wrote beside a result directory (<run>/metrics.json), if any."""
    import json

    path = directory.parent / "metrics.json" if directory is not None else None
    if path is None or not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text()).get("metrics")
    except (OSError, ValueError, AttributeError):
        return None
    return metrics if isinstance(metrics, dict) else None


@torch.no_grad()
def export_peft_adapter(delta: SparseDelta | str | os.PathLike, base_model: nn.Module, out_dir: str | os.PathLike, *,
                        exact: bool = True, metrics: Mapping | None = None) -> Path:
    """Write a sparse delta as a PEFT SHiRA adapter directory (config, weights, README.md model card).

    Args:
        delta: a `SparseDelta`, or a delta / result / run directory (`saftune train` writes <run>/result).
        base_model: the pretrained model the delta was trained from: the saftune model (a `CausalLM`,
            whose parameter names start with "lm.") or the bare transformers model. It is not changed; it
            gives the layer types, the weights' dtype and the pretrained values (checked against the delta).
        out_dir: the adapter directory (created; files of the same names are replaced).
        exact: refuse (default) when an entry's trained value cannot be reached exactly by PEFT's
            addition (float32 models only: a trained value much nearer zero than its pretrained one);
            False: export the nearest value there, log how many and the largest difference, and say so
            in the model card.
        metrics: metrics for the model card (default: <run>/metrics.json when `delta` is a directory).

    Returns the adapter directory. It loads with `PeftModel.from_pretrained(hf_model, out_dir)` (pass
    `adapter_name=` there to name it); ``merge_and_unload()`` equals `delta.apply_to(hf_model)` bit for bit
    (with `exact=False`, up to the reported nearest entries).

    Example:
        >>> export_peft_adapter("runs/saft", tiny_causal_lm("llama"), "adapter/")   # doctest: +SKIP
        >>> model = PeftModel.from_pretrained(hf_model, "adapter/").merge_and_unload()  # doctest: +SKIP
    """
    shira_config_cls = _require_shira()
    from safetensors.torch import save_file

    source = None
    if not isinstance(delta, SparseDelta):
        from saftune.results import result_directory

        source = result_directory(delta)
        delta = SparseDelta.from_pretrained(source)
    from saftune.sparse.quantized import quantized_parameter_names

    if quantized_parameter_names(base_model):
        raise PeftExportError("SHiRA adapters change plain weights; pass the full-precision base model, not its quantized form")
    if delta.quantized_tensors:  # trained beside quantized weights: onto this full-precision base first (checked there)
        delta = delta.rebased(base_model)
    root, prefix = _peft_root(base_model)
    targets = _linear_targets(delta, root, prefix)

    tensors, counts, shapes, offsets = {}, {}, {}, {}
    unreached, missed, worst, narrow_only = [], 0, 0.0, 0
    for name, (_, module) in targets.items():
        weight = module.weight
        if tuple(weight.shape) != delta.shapes[name]:
            raise PeftExportError(f"{name!r} has shape {tuple(weight.shape)} in this model but {delta.shapes[name]} in "
                                  "the delta's base model; pass the base model the delta was trained from")
        idx = delta.indices[name]
        base = weight.detach().reshape(-1)[idx.to(weight.device)].cpu()
        if not bool((base.double() == delta.pretrained[name].double()).all()):
            raise PeftExportError(
                f"{name!r}: the model's weights at the delta's entries are not its pretrained values; pass the "
                f"unmodified base model ({delta.config.get('base_model', 'unknown')}), not one the delta or "
                "another fine-tuning was applied to")
        target = delta.values[name].to(weight.dtype)  # what SparseDelta.apply_to writes into this model
        if not bool(torch.isfinite(target).all()):
            raise PeftExportError(f"{name!r}: the delta holds NaN or infinite values; it is broken, not exportable")
        d, reached, portable = exact_offsets(base, target)
        if not bool(reached.all()):
            unreached.append(f"{name} ({int((~reached).sum())} of {idx.numel()})")
            missed += int((~reached).sum())
            got = (base.to(d.dtype) + d).to(weight.dtype)
            worst = max(worst, float((got.double() - target.double()).abs().max()))
        narrow_only += int((reached & ~portable).sum())
        offsets[name], counts[name], shapes[name] = d, idx.numel(), tuple(weight.shape)
    dtype = next(iter(targets.values()))[1].weight.dtype
    if unreached and exact:
        raise PeftExportError(
            f"SHiRA adds a change to each pretrained weight, and for {missed} entries of this {dtype} model no change "
            "rounds to the trained value (it is much nearer zero than the pretrained value, so base + change cannot "
            f"land on it): {', '.join(unreached[:6])}. Pass exact=False to export the nearest values (here within "
            f"{worst:.2g} of the trained ones), or save the merged model exactly with `saftune merge`.")
    if unreached:
        logger.warning("%d of %d entries are exported as the nearest value PEFT can reach, not the trained one "
                       "(largest difference %.3g)", missed, delta.num_entries, worst)
    if narrow_only:
        logger.info("%d entries are exact only with the adapter in float32, PEFT's default for a %s model "
                    "(PeftModel.from_pretrained(..., autocast_adapter_dtype=True))", narrow_only, dtype)
    exactness = ("bit for bit as saftune merges (PEFT's default load)" if not missed else
                 f"no: {missed} of {delta.num_entries} entries are the nearest reachable values, within {worst:.2g}")

    r = _shared_r(counts, shapes)
    for name, (path, _) in targets.items():
        rows, cols = shapes[name]
        flat, values = _padded(delta.indices[name], offsets[name], r * (rows + cols), rows * cols)
        key = f"{_KEY_PREFIX}{path}"
        tensors[f"{key}.shira_indices"] = torch.stack([flat // cols, flat % cols]).to(torch.int32).contiguous()
        tensors[f"{key}.shira_weight"] = values.contiguous()

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base_name = getattr(root, "name_or_path", "") or str(delta.config.get("base_model") or "")
    # mask_type "random": on load PEFT draws a random mask of the right size, then the saved indices replace it.
    config = shira_config_cls(r=r, target_modules=sorted(p for p, _ in targets.values()), mask_type="random",
                              base_model_name_or_path=base_name or None, task_type=_task_type(root),
                              inference_mode=True)
    config.save_pretrained(str(out))
    with atomic_path(out / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "saftune_delta_fingerprint": delta.fingerprint})
    _write_card(out, delta, base_name, r, exactness, metrics if metrics is not None else _run_metrics(source))
    logger.info("exported %d entries in %d layers as a SHiRA adapter (r=%d, %d padding entries) to %s",
                delta.num_entries, len(targets), r, sum(r * sum(s) for s in shapes.values()) - delta.num_entries, out)
    return out


def _write_card(out: Path, delta: SparseDelta, base_name: str, r: int, exactness: str,
                metrics: Mapping | None) -> None:
    from saftune.model_card import write_model_card

    cfg = delta.config
    usage = (
        "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
        f"base = AutoModelForCausalLM.from_pretrained({base_name or '<base model>'!r})\n"
        "model = PeftModel.from_pretrained(base, \"path/to/this/adapter\")\n"
        "merged = model.merge_and_unload()  # saftune's merge of the delta (see the table)\n```"
    )
    details = {"Format": f"PEFT SHiRA adapter (r={r}) exported from a saftune sparse delta",
               "Exact merge": exactness, "Base fingerprint": delta.fingerprint[:23] + "..."}
    write_model_card(out, base_model=base_name or "unknown", method=str(cfg.get("method") or "saft"),
                     dataset=cfg.get("dataset"), sparsity=cfg.get("sparsity"), trained_values=delta.num_entries,
                     seed=cfg.get("seed"), metrics=metrics, details=details, library_name="peft",
                     tags=["shira", "sparse-fine-tuning"], usage=usage)
