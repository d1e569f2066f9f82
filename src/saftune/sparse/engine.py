"""Phase 2: train only the masked entries, in place, with O(d) optimizer state.

`sparsify(model, mask)` gives each touched parameter an fp32 *value vector* holding its selected entries
(the only tensors an optimizer sees) and keeps their pretrained values for the delta. Gradients reach the
value vectors in one of these ways, chosen per tensor:

* `linear`: an exact `nn.Linear` weight at low density. Its forward is routed through
  `SparseLinearFunction`, which computes only the selected entries of dW (no dense weight gradient).
* `attention`: a projection weight of an `nn.MultiheadAttention` (`in_proj_weight`, `q/k/v_proj_weight`,
  `out_proj.weight`) at low density: torch's attention runs with those projections routed through the
  same kernel (`saftune.sparse.attention`).
* `embedding`: an exact `nn.Embedding` weight: `SparseEmbeddingFunction` adds output gradients into the
  selected rows only.
* `tied`: one tensor that is both an exact `nn.Embedding`'s weight and an exact `nn.Linear`'s weight (a
  language model's tied input and output embeddings): both kernels above, each adding its part of the
  gradient into the same value vector, so no dense vocabulary x hidden gradient is formed.
* `scale`: an RMSNorm's scale (Llama's, Mistral's, Qwen's: `saftune.sparse.norms`): `SparseScaleFunction`
  recomputes the normalised input in the backward pass instead of keeping it, as the frozen model does.
* `quantized`: a quantized `nn.Linear` weight (torchao int8 or nf4, `saftune.sparse.quantized`): the weight cannot
  take trained values, so the selected entries act beside it as a sparse side term, y = x Q(W)^T + x Delta^T,
  whose forward and backward touch only those entries.
* `hook`: anything else (convolutions, LayerNorm, other norms, raw parameters, denser tensors). The
  tensor keeps `requires_grad`, and a post-accumulate-grad hook gathers the selected entries of its dense
  gradient into `values.grad` and frees the dense gradient at once, tensor by tensor.

Untouched parameters get `requires_grad=False`: no gradient at all. After every `optimizer.step()` of any
torch optimizer holding value vectors, the new values are written into the model's own weights (a global
optimizer step hook), so the model in memory is always the merged model. Unselected entries are never
written: they stay bit-identical to the pretrained values whatever the optimizer does.

With gradient checkpointing on the CPU, the free pages of glibc's heap are handed back to the system
after each training forward pass (`saftune.sparse.heap`; `release_heap=False` keeps them).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from saftune.sparse.attention import attention_forward
from saftune.sparse.delta import SparseDelta
from saftune.sparse.heap import checkpointing_modules, release_after_checkpointed_forward
from saftune.sparse.kernels import LinearRoute, LinearSelection, SparseEmbeddingFunction
from saftune.sparse.mask import SparseMask
from saftune.sparse.norms import ScaleRoute, routable
from saftune.sparse.quantized import (
    QuantizationError, SideTerm, attach, check_routable, dequantize, detach, frozen_forward, is_quantized, scheme_of,
)

logger = logging.getLogger(__name__)

# Above this density the dense x^T dy (one GEMM, then a gather) beats the sampled dot products of
# `SparseLinearFunction`. benchmarks/kernel_crossover.py (random masks, 7 shapes 384..4096 x 384..3072, 128..2048
# tokens, 2 threads), sparse / dense time, median (max) over shapes and token counts: density 1e-3 0.14 (0.27),
# 1e-2 0.19 (1.07), 3e-2 0.25 (1.14), 0.1 0.44 (1.26), 0.3 0.90 (1.87). The max above 1 from 3e-3 up is one small
# shape with many tokens (384 x 384, 2048 tokens), where the page faults of two fresh transposed copies cost more
# than its small GEMM. Masks chosen by a score cluster in few rows and columns, which favours the sparse kernel
# further (on BERT-base the grad-score mask uses at most about half of them).
LINEAR_KERNEL_MAX_DENSITY = 0.05

_LIVE: weakref.WeakSet = weakref.WeakSet()
_HOOK_HANDLE = None


@dataclass
class _Slot:
    """One touched parameter: where its selected entries are and what they hold."""

    name: str
    param: nn.Parameter
    indices: torch.Tensor  # int64 [d_t], sorted flat indices, on the parameter's device
    values: nn.Parameter  # master copy [d_t], fp32 (or the parameter's dtype when that is wider)
    pretrained: torch.Tensor  # [d_t] in the parameter's own dtype: exact unmerge
    path: str  # "linear" | "attention" | "embedding" | "tied" | "scale" | "quantized" | "hook"


def _sync_after_step(optimizer, args, kwargs) -> None:
    if not _LIVE:
        return
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for sparse_model in list(_LIVE):
        if sparse_model._value_ids & in_optimizer:
            sparse_model.sync()


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """Parameter id -> every (module, attribute) that holds it (tied weights have several)."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((module, attr))
    return owners


def _attention_projections(model: nn.Module) -> dict[int, nn.MultiheadAttention]:
    """Parameter id -> the nn.MultiheadAttention that uses it as a projection weight (when its forward is torch's)."""
    found = {}
    for module in model.modules():
        if type(module).forward is not nn.MultiheadAttention.forward or "forward" in module.__dict__:
            continue
        for weight in (module.in_proj_weight, module.q_proj_weight, module.k_proj_weight, module.v_proj_weight, module.out_proj.weight):
            if weight is not None:
                found[id(weight)] = module
    return found


def _plain_embedding(module: nn.Module, attr: str) -> bool:
    """An exact nn.Embedding weight whose forward `SparseEmbeddingFunction` reproduces."""
    return (attr == "weight" and type(module) is nn.Embedding and "forward" not in module.__dict__
            and module.max_norm is None and not module.sparse and not module.scale_grad_by_freq)


def _tied_pair(owners: list[tuple[nn.Module, str]]) -> tuple[nn.Embedding, nn.Linear] | None:
    """(embedding, linear) when a tensor is exactly one plain nn.Embedding's and one nn.Linear's weight."""
    if len(owners) != 2:
        return None
    embedding = [m for m, attr in owners if _plain_embedding(m, attr)]
    linear = [m for m, attr in owners if attr == "weight" and type(m) is nn.Linear and "forward" not in m.__dict__]
    return (embedding[0], linear[0]) if len(embedding) == 1 and len(linear) == 1 else None


def _choose_path(param: nn.Parameter, owners: list[tuple[nn.Module, str]], density: float, kernels: str, in_attention: bool) -> str:
    if is_quantized(param):  # whatever `kernels` says: a quantized weight has no dense gradient to hook
        if len(owners) != 1 or owners[0][1] != "weight" or type(owners[0][0]) is not nn.Linear or "forward" in owners[0][0].__dict__:
            raise QuantizationError("saftune trains quantized weights of plain nn.Linear layers only; this one belongs to "
                                    f"{', '.join(type(m).__name__ for m, _ in owners)}")
        return "quantized"
    sparse_enough = kernels == "on" or density <= LINEAR_KERNEL_MAX_DENSITY
    if kernels != "off" and sparse_enough and not in_attention and _tied_pair(owners) is not None:
        return "tied"
    if kernels == "off" or len(owners) != 1:
        return "hook"
    if in_attention and param.dim() == 2:
        return "attention" if sparse_enough else "hook"
    module, attr = owners[0]
    if attr != "weight" or "forward" in module.__dict__:  # someone already wraps this forward
        return "hook"
    # Exact types only: a subclass may have its own forward.
    if type(module) is nn.Linear and sparse_enough:
        return "linear"
    if _plain_embedding(module, attr):
        return "embedding"
    if routable(module):  # an RMSNorm whose forward saftune reproduces bit for bit (any density: its gradient is 1-D)
        return "scale"
    return "hook"


def _linear_forward(module: nn.Linear, route: LinearRoute, x: torch.Tensor):
    if not (torch.is_grad_enabled() and route.values.requires_grad):  # eval / no_grad: nothing to save
        return F.linear(x, module.weight, module.bias)
    return route.apply(x, module.weight, module.bias)


def _embedding_forward(module: nn.Embedding, slot: _Slot, unique_rows, row_slot, cols, ids: torch.Tensor):
    return SparseEmbeddingFunction.apply(ids, module.weight, slot.values, unique_rows, row_slot, cols, module.padding_idx)


class SparseModel:
    """A model prepared for sparse training by `sparsify`; the model itself is trained in place.

    Attributes:
        model: the wrapped module (its weights always hold the current values).
        mask: the `SparseMask` being trained.
    """

    def __init__(self, model: nn.Module, mask: SparseMask, *, kernels: str = "auto", master_dtype=torch.float32,
                 release_heap: bool = True):
        if kernels not in ("auto", "on", "off"):
            raise ValueError(f"kernels must be 'auto', 'on' or 'off'; got {kernels!r}")
        self.model = model
        self.mask = mask
        self.release_heap = release_heap
        self._slots: list[_Slot] = []
        self._handles: list = []
        self._forwards: list[nn.Module] = []
        self._sides: list[nn.Module] = []
        self._requires_grad = {p: p.requires_grad for p in model.parameters()}
        params = dict(model.named_parameters())
        for name in mask.indices:
            owner = params.get(name.rpartition(".")[0])
            if name not in params and owner is not None and is_quantized(owner):
                raise QuantizationError(
                    f"mask tensor {name!r} is part of the quantized weight {name.rpartition('.')[0]!r} (its quantized data or "
                    "scales), which cannot be trained; select on the weight itself, whose entries train beside it"
                )
            if name not in params:
                raise ValueError(
                    f"mask parameter {name!r} is not in the model; was the mask selected on another model? "
                    f"(model parameters look like {list(params)[:3]})"
                )
            if tuple(params[name].shape) != mask.shapes[name]:
                raise ValueError(f"mask shape {mask.shapes[name]} of {name!r} does not match the model's {tuple(params[name].shape)}")
            check_routable(name, params[name])
            if not is_quantized(params[name]) and not params[name].is_contiguous():
                raise ValueError(f"parameter {name!r} is not contiguous; call .contiguous() on it before sparsify")
        schemes = {scheme_of(params[n]) for n in mask.indices if is_quantized(params[n])}
        if len(schemes) > 1:  # a delta records one scheme, to rebase its entries onto the full-precision base
            raise QuantizationError(f"the mask trains weights quantized in {len(schemes)} ways ({', '.join(sorted(schemes))}); "
                                    "quantize the model one way (quantize='int8' or 'nf4')")
        for p in model.parameters():
            p.requires_grad_(False)
        owners = _owners(model)
        attention_of = _attention_projections(model)
        self._attention_routes: dict[nn.MultiheadAttention, dict[int, LinearRoute]] = {}
        # (slot position, path, module) per kernel or hook to install: kept, so that `to` can install them again
        # (a module's type may have changed by then, e.g. FSDP2 swaps its class, so the paths are not chosen again).
        self._targets: list[tuple[int, str, nn.Module]] = []
        # Slots follow the model's parameter order, so optimizer state lines up whatever the mask's dict order.
        for name in [n for n in params if n in mask.indices]:
            idx, param = mask.indices[name], params[name]
            idx = idx.to(param.device)
            # A quantized weight's pretrained values are its dequantized ones: the side term starts at zero.
            pretrained = dequantize(param.detach()).reshape(-1)[idx].clone()
            dtype = torch.promote_types(param.dtype, master_dtype)
            values = nn.Parameter(pretrained.to(dtype).clone())
            path = _choose_path(param, owners.get(id(param), []), idx.numel() / param.numel(), kernels, id(param) in attention_of)
            position = len(self._slots)
            if path == "tied":
                embedding, linear = _tied_pair(owners[id(param)])
                self._targets += [(position, "embedding", embedding), (position, "linear", linear)]
            else:
                self._targets.append((position, path, attention_of[id(param)] if path == "attention" else owners[id(param)][0][0]))
            self._slots.append(_Slot(name, param, idx, values, pretrained, path))
        # Quantized layers with no selected entry still need saftune's forward: torchao's own keeps a dense copy
        # of each weight for the backward pass (the input's gradient), a bf16 model's worth in all.
        trained = {id(s.param) for s in self._slots}
        self._frozen_quantized = [m for m in model.modules()
                                  if type(m) is nn.Linear and is_quantized(m.weight) and id(m.weight) not in trained
                                  and "forward" not in m.__dict__]
        self._install_all()
        self._value_ids = {id(s.values) for s in self._slots}
        _LIVE.add(self)
        global _HOOK_HANDLE
        if _HOOK_HANDLE is None:
            _HOOK_HANDLE = register_optimizer_step_post_hook(_sync_after_step)
        paths = [s.path for s in self._slots]
        logger.info(
            "sparsify: %d trainable values in %d tensors (linear kernel %d, attention kernel %d, embedding kernel %d, "
            "tied embedding kernels %d, norm scales %d, quantized side terms %d, hook %d)",
            self.num_trainable, len(self._slots), paths.count("linear"), paths.count("attention"), paths.count("embedding"),
            paths.count("tied"), paths.count("scale"), paths.count("quantized"), paths.count("hook"),
        )

    def _recomputing(self) -> bool:
        """Whether the model recomputes activations now: a Hugging Face model with gradient checkpointing on,
        in training mode (read at each forward, so enabling it after `sparsify`, as Trainer does, counts)."""
        return any(m.gradient_checkpointing and m.training for m in self._checkpointed_modules)

    def _install_all(self) -> None:
        # Modules that switch gradient checkpointing (transformers sets a bool `gradient_checkpointing` on them).
        self._checkpointed_modules = checkpointing_modules(self.model)
        for position, path, module in self._targets:
            slot = self._slots[position]
            self._install(slot if slot.path == path else replace(slot, path=path), module)
        for module, routes in self._attention_routes.items():  # one forward per attention module, for all its routes
            module.forward = partial(attention_forward, module, routes)
            self._forwards.append(module)
        for module in self._frozen_quantized:
            module.forward = partial(frozen_forward, module)
            self._forwards.append(module)
        if self.release_heap:  # once per checkpointed forward pass: the stack's hook, whatever calls the stack
            self._handles += release_after_checkpointed_forward(self.model)

    def _uninstall(self) -> None:
        for h in self._handles:
            h.remove()
        for module in self._forwards:
            del module.forward
        for module in self._sides:
            detach(module)
        self._handles, self._forwards, self._sides, self._attention_routes = [], [], [], {}

    @torch.no_grad()
    def to(self, device: torch.device | str) -> SparseModel:
        """Move the engine's own tensors (value vectors, indices, pretrained values, kernel routes) to `device`.

        The model's weights are the caller's to move (`model.to(device)`, or FSDP2 moving each process's
        shards): `sparsify` on a model in host memory, then move both, trains as `sparsify` on the device.
        The value vectors stay the same `nn.Parameter` objects; build the optimizer after moving.

        Example:
            >>> net = nn.Linear(4, 3)
            >>> sm = sparsify(net, SparseMask({"weight": torch.tensor([0, 5])}, {"weight": (3, 4)}))
            >>> sm.to("cpu").trainable_parameters()[0].device
            device(type='cpu')
        """
        device = torch.device(device)
        self._uninstall()  # the kernels' routes and hooks hold the old tensors: they are installed again below
        for slot in self._slots:
            slot.indices, slot.pretrained = slot.indices.to(device), slot.pretrained.to(device)
            slot.values.data = slot.values.data.to(device)
        self._install_all()
        return self

    def _install(self, slot: _Slot, module: nn.Module) -> None:
        """Route the gradient of the slot's selected entries into `slot.values.grad`."""
        if slot.path in ("linear", "attention"):
            selection = LinearSelection.from_indices(slot.indices, tuple(slot.param.shape))
            route = LinearRoute(slot.param, slot.values, slot.indices, selection, self._recomputing)
            if slot.path == "linear":
                module.forward = partial(_linear_forward, module, route)
                self._forwards.append(module)
            else:  # the attention module's forward is installed once, for all its routes
                self._attention_routes.setdefault(module, {})[id(slot.param)] = route
        elif slot.path == "scale":
            module.forward = partial(ScaleRoute(slot.values, slot.indices).forward, module)
            self._forwards.append(module)
        elif slot.path == "quantized":
            attach(module, SideTerm.build(slot.indices, tuple(slot.param.shape), slot.values, slot.pretrained,
                                          self._recomputing))
            self._sides.append(module)
        elif slot.path == "embedding":
            dim = slot.param.shape[1]
            rows, cols = slot.indices // dim, slot.indices % dim
            unique_rows, row_slot = torch.unique(rows, return_inverse=True)
            module.forward = partial(_embedding_forward, module, slot, unique_rows, row_slot, cols)
            self._forwards.append(module)
        else:
            slot.param.requires_grad_(True)
            self._handles.append(slot.param.register_post_accumulate_grad_hook(partial(_gather_grad, slot)))

    # ------------------------------------------------------------------ training interface
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The value vectors: give these (and only these) to the optimizer."""
        return [s.values for s in self._slots]

    def named_trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(parameter name, value vector) pairs, e.g. for per-group weight decay."""
        return ((s.name, s.values) for s in self._slots)

    @property
    def num_trainable(self) -> int:
        """d: the number of trainable entries."""
        return sum(s.values.numel() for s in self._slots)

    @torch.no_grad()
    def sync(self) -> None:
        """Write the value vectors into the model's weights (done automatically after optimizer steps)."""
        for s in self._slots:
            if s.path != "quantized":  # a quantized weight's trained entries live in its side term, read live
                s.param.view(-1).index_copy_(0, s.indices, s.values.detach().to(s.param.dtype))

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The current values per parameter name (what a checkpoint needs besides the optimizer)."""
        return {s.name: s.values.detach().clone() for s in self._slots}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore values saved by `state_dict` and write them into the model."""
        expected = {s.name for s in self._slots}
        if set(state) != expected:
            raise ValueError(f"sparse state has tensors {sorted(set(state) ^ expected)} that this mask does not (or the reverse)")
        for s in self._slots:
            if state[s.name].shape != s.values.shape:
                raise ValueError(f"sparse state of {s.name!r} has {state[s.name].numel()} values, the mask {s.values.numel()}")
            s.values.copy_(state[s.name])
        self.sync()

    @torch.no_grad()
    def reset(self) -> None:
        """Put the pretrained values back (values and weights)."""
        for s in self._slots:
            s.values.copy_(s.pretrained)
        self.sync()

    def delta(self, **config) -> SparseDelta:
        """The run's artifact: indices, trained values and pretrained values per tensor.

        Args:
            **config: recorded in `saftune_config.json` (method, base_model, sparsity, ...).
        """
        config = {**{k: v for k, v in self.mask.meta.items() if k in ("score", "sparsity", "budget", "include", "exclude")}, **config}
        quantized = [s.name for s in self._slots if s.path == "quantized"]
        if quantized:  # their pretrained values are Q(W)'s: `SparseDelta.apply_to` rebases them onto a full-precision base
            scheme = next(scheme_of(s.param) for s in self._slots if s.path == "quantized")  # one (checked in __init__)
            config["quantized_base"] = {"scheme": scheme, "tensors": quantized}
        return SparseDelta(
            {s.name: s.indices.cpu() for s in self._slots},
            {s.name: s.values.detach().float().cpu().clone() for s in self._slots},
            {s.name: s.pretrained.cpu().clone() for s in self._slots},
            {s.name: tuple(s.param.shape) for s in self._slots},
            config=config,
        )

    def unsparsify(self) -> nn.Module:
        """Remove hooks and forward overrides, restore `requires_grad`; the weights keep the trained values.

        Quantized weights keep their trained entries as a fixed side term (`saftune.sparse.quantized.detach`
        removes it).
        """
        self.sync()
        self._uninstall()
        for position, path, module in self._targets:
            slot = self._slots[position]
            if path == "quantized":
                attach(module, SideTerm.build(slot.indices, tuple(slot.param.shape), slot.values.detach().clone(), slot.pretrained))
        for p, flag in self._requires_grad.items():
            p.requires_grad_(flag)
        _LIVE.discard(self)
        return self.model

    def __repr__(self) -> str:
        paths = [s.path for s in self._slots]
        return (
            f"SparseModel(trainable={self.num_trainable}, tensors={len(self._slots)}, "
            f"linear={paths.count('linear')}, attention={paths.count('attention')}, embedding={paths.count('embedding')}, "
            f"tied={paths.count('tied')}, scale={paths.count('scale')}, quantized={paths.count('quantized')}, "
            f"hook={paths.count('hook')})"
        )


def _gather_grad(slot: _Slot, param: torch.Tensor) -> None:
    """Post-accumulate-grad hook: keep the selected entries of the dense gradient, free the rest."""
    if param.grad is None:  # autograd calls the hook without a gradient when a kernel already gave it
        return
    grad = param.grad.reshape(-1).index_select(0, slot.indices).to(slot.values.dtype)
    param.grad = None
    if slot.values.grad is None:
        slot.values.grad = grad
    else:
        slot.values.grad.add_(grad)


def sparsify(model: nn.Module, mask: SparseMask, *, kernels: str = "auto", master_dtype=torch.float32,
             release_heap: bool = True) -> SparseModel:
    """Prepare `model` (in place) so that training changes exactly the entries of `mask`.

    Call it after moving the model to its device (or move both afterwards: the model, then
    `SparseModel.to`, before building the optimizer). Give `sm.trainable_parameters()` to any torch
    optimizer; after each `optimizer.step()` the model's own weights hold the new values.

    Args:
        model: the pretrained model (any `nn.Module`; fp32, bf16 or fp16 weights).
        mask: a `SparseMask` from `select_mask` (or loaded with `SparseMask.load`).
        kernels: "auto" (sparse gradient kernels for nn.Linear at density <= 5% and for nn.Embedding),
            "on" (kernels for every eligible Linear), or "off" (gradient hooks everywhere).
        master_dtype: dtype of the trainable values (fp32 by default, even for bf16 weights).
        release_heap: with gradient checkpointing on the CPU, give the heap's free pages back to the system
            after each training forward pass (glibc keeps them resident otherwise; `saftune.sparse.heap`).

    Example:
        >>> net = nn.Linear(4, 3)
        >>> mask = SparseMask({"weight": torch.tensor([0, 5])}, {"weight": (3, 4), "bias": (3,)})
        >>> sm = sparsify(net, mask)
        >>> opt = torch.optim.AdamW(sm.trainable_parameters(), lr=0.1)
        >>> before = net.weight.detach().clone()
        >>> net(torch.randn(2, 4)).sum().backward(); opt.step()
        >>> int((net.weight != before).sum())
        2
    """
    return SparseModel(model, mask, kernels=kernels, master_dtype=master_dtype, release_heap=release_heap)
