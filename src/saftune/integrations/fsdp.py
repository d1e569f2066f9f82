"""FSDP2 for SAFT: the frozen base sharded across the processes, the O(d) selected values replicated.

SAFT trains a value vector per touched weight, kept *beside* the module (`saftune.sparse.engine`); the
module's own weights are frozen. `shard_frozen_base(sparse_model)`, called after `sparsify` in every
process of a torchrun (or `accelerate launch`) job, shards those frozen weights with FSDP2
(`torch.distributed.fsdp.fully_shard`), so each of W processes keeps about 1/W of them between forward
passes. Nothing else changes:

* FSDP2 all-gathers a unit's weights before its forward (and again before its backward), so the
  selected-entry kernels see the whole weight, as they do unsharded.
* The value vectors are not module parameters: FSDP never sees them. Their gradients are summed across
  the processes by `saftune.distributed.all_reduce_gradients` as without FSDP: d numbers per step.
  The frozen weights get no gradient, so FSDP reduce-scatters nothing.
* After every optimizer step each process writes the new values of the selected entries that fall in
  its own shard (the next all-gather brings them to everyone).
* A tensor trained through a dense-gradient hook (LayerNorm weights, biases, denser tensors: the
  engine's `hook` path) stays whole in every process: sharding it would make FSDP reduce-scatter its
  dense gradient. These are the small tensors.

Every forward of a sharded unit is a collective: every process must run the same number of forward
passes (see `shard_frozen_base`). The base is loaded and the mask selected unsharded (phase 1 needs
dense gradients); the sharding saves memory from `sparsify` on.

Example (in each of 2 processes under torchrun; a single process has nothing to shard):
    >>> sm = sparsify(model, mask)                                     # doctest: +SKIP
    >>> shards = shard_frozen_base(sm)                                 # doctest: +SKIP
    >>> shards.local_numel / shards.total_numel                        # doctest: +SKIP
    0.51
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from saftune.sparse.engine import SparseModel, _linear_forward, _owners, _Slot
from saftune.sparse.kernels import LinearRoute

logger = logging.getLogger(__name__)

# Module types whose weights the engine's kernels route; each makes a good FSDP unit of its own when
# the model names no blocks (`_no_split_modules`).
_ROUTED_TYPES = (nn.Linear, nn.Embedding, nn.MultiheadAttention)
_ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


@dataclass
class FrozenShards:
    """What `shard_frozen_base` did in this process.

    Attributes:
        units: names of the submodules sharded as FSDP units of their own (the root holds the rest).
        replicated: names of the parameters kept whole in every process (trained through a dense gradient).
        local_numel: frozen-base entries this process holds (its shards plus the replicated tensors).
        total_numel: entries of the whole base.
    """

    units: list[str]
    replicated: list[str]
    local_numel: int
    total_numel: int


def plan_units(model: nn.Module) -> list[str]:
    """The submodules `shard_frozen_base` shards as FSDP units by default (the root takes the rest).

    The model's transformer blocks when a Hugging Face model inside names them (`_no_split_modules`,
    as accelerate's FSDP wrapping uses), otherwise every `nn.Linear`, `nn.Embedding` and
    `nn.MultiheadAttention`; in both cases the outermost such modules, and only those that hold every
    module sharing their parameters (FSDP needs a tied tensor, e.g. a language model's input and output
    embedding, in one unit: the root).

    Example:
        >>> net = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4), nn.Linear(4, 10))
        >>> net[2].weight = net[0].weight  # tied
        >>> plan_units(nn.Sequential(net, nn.Linear(10, 2)))
        ['1']
    """
    block_names = set()
    for module in model.modules():
        block_names.update(getattr(module, "_no_split_modules", None) or ())

    def wanted(module: nn.Module) -> bool:
        if block_names:
            return type(module).__name__ in block_names
        return type(module) in _ROUTED_TYPES

    owners: dict[int, set[int]] = {}  # parameter id -> ids of the modules holding it
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                owners.setdefault(id(p), set()).add(id(module))
    units: list[str] = []
    covered: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(c + ".") for c in covered) or not wanted(module):
            continue
        inside = {id(m) for m in module.modules()}
        if all(owners[id(p)] <= inside for p in module.parameters()):
            units.append(name)
            covered.append(name)
    return units


def shard_frozen_base(sparse_model: SparseModel, *, units: list[str] | None = None, mesh=None,
                      reshard_after_forward: bool = True) -> FrozenShards:
    """Shard the frozen weights of a sparsified model with FSDP2; the selected values stay replicated.

    Call it in every process, after `sparsify` (the engine must see the whole weights) and before the
    first training forward. Train as without FSDP: the value vectors to the optimizer,
    `distributed.all_reduce_gradients` on them before each step (saftune's trainer does both).

    Every process must run the same number of forward passes, in training and in evaluation: a forward
    all-gathers, and a process that skips one leaves the others waiting. saftune's trainer gives a
    process with an empty share of a micro-batch no forward, so use a global batch size of at least
    the number of processes (and a last batch that every process gets part of).

    Args:
        sparse_model: what `sparsify` returned (SAFT's `method.sparse`).
        units: names of submodules to shard as FSDP units of their own (all-gathered one at a time);
            default `plan_units(model)`. Each must hold every module that shares its parameters.
        mesh: a 1-D `DeviceMesh` over the processes; default all of them, on the weights' device type.
        reshard_after_forward: free each unit's gathered weights after its forward (gather them again
            for the backward): the least memory. False keeps them until the backward.

    Returns:
        A `FrozenShards` with what this process holds.
    """
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError as e:  # FSDP2 is public from torch 2.6
        raise ImportError(f"shard_frozen_base needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6): {e}") from e
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        raise RuntimeError("shard_frozen_base needs several processes: launch with torchrun (or accelerate launch) and "
                           "call saftune.distributed.init_from_env() first")
    if not isinstance(sparse_model, SparseModel):
        raise TypeError(f"shard_frozen_base takes the SparseModel that sparsify returned, not {type(sparse_model).__name__}")
    model = sparse_model.model
    if isinstance(model, FSDPModule):
        raise RuntimeError("this model is sharded already (shard_frozen_base was called on it before)")
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(next(model.parameters()).device.type, (dist.get_world_size(),))
    if mesh.ndim != 1:
        raise ValueError(f"shard_frozen_base shards over a 1-D mesh (data parallel); got {mesh.ndim} dimensions")

    names = {id(p): n for n, p in model.named_parameters()}
    # A parameter that trains through a dense gradient (the engine's hook path) stays whole: FSDP would
    # reduce-scatter that dense gradient, and the engine's hook gathers its selected entries itself.
    ignored = {p for p in model.parameters() if p.requires_grad}
    places = _owners(model)  # parameter id -> every (module, attribute) holding it: where to find its sharded form
    routes = _routes(sparse_model)
    total = sum(p.numel() for p in model.parameters())

    unit_names = plan_units(model) if units is None else list(units)
    modules = dict(model.named_modules())
    unknown = [u for u in unit_names if u not in modules or not u]
    if unknown:
        raise ValueError(f"units {unknown} are not submodules of the model (names look like {list(modules)[1:4]})")
    for name in unit_names:
        fully_shard(modules[name], mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=ignored)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=ignored)

    # The engine still holds the unsharded parameters (its slots, kernel routes, requires_grad record):
    # point them at the sharded ones, so the whole weights are freed.
    replaced = {pid: getattr(*places[pid][0]) for pid in places}
    for slot in _slots(sparse_model):
        slot.param = replaced[id(slot.param)]
    for route, module, _owner, _attr in routes:
        _point(route, module, replaced[id(route.weight)])
    sparse_model._requires_grad = {replaced[id(p)]: flag for p, flag in sparse_model._requires_grad.items()}
    for route, module, owner, attr in routes:  # the kernels must get the weight FSDP gathered for this forward
        module.register_forward_pre_hook(partial(_refresh_route, route, owner, attr))

    mesh_rank, mesh_size = mesh.get_local_rank(), mesh.size()
    fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    writes = [_local_write(slot, mesh_rank, mesh_size) for slot in sparse_model._slots]
    # The engine's optimizer-step hook calls `sync()`: this instance writes the new values into its shards.
    sparse_model.sync = partial(_sync_shards, writes, fsdp_modules)

    with torch.no_grad():
        local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
    shards = FrozenShards(unit_names, sorted(names[id(p)] for p in ignored), local, total)
    logger.info("FSDP2: %d units and the root over %d processes; this process holds %d of %d frozen entries (%.0f%%), "
                "%d tensors replicated", len(unit_names), mesh_size, local, total, 100 * local / max(total, 1), len(ignored))
    return shards


def _slots(sparse_model: SparseModel) -> list[_Slot]:
    """Every slot object that holds a parameter: the model's, and the copies a tied weight's two kernels keep."""
    slots = {id(s): s for s in sparse_model._slots}
    for module in sparse_model._forwards:
        forward = module.__dict__.get("forward")
        slots.update({id(a): a for a in getattr(forward, "args", ()) if isinstance(a, _Slot)})
    return list(slots.values())


def _routes(sparse_model: SparseModel) -> list[tuple[LinearRoute, nn.Module, nn.Module, str]]:
    """(route, the module whose forward runs it, the module holding its weight, that attribute) per kernel route."""
    found = []
    for module in sparse_model._forwards:
        forward = module.__dict__.get("forward")
        if getattr(forward, "func", None) is _linear_forward:
            found.append((forward.args[1], module, module, "weight"))
    for attention, by_weight in sparse_model._attention_routes.items():
        for route in by_weight.values():
            holders = [(attention, a) for a in _ATTENTION_WEIGHTS] + [(attention.out_proj, "weight")]
            owner, attr = next((m, a) for m, a in holders if getattr(m, a, None) is route.weight)
            found.append((route, attention, owner, attr))
    return found


def _point(route: LinearRoute, module: nn.Module, weight: torch.Tensor) -> None:
    """Make `weight` the route's: the kernels recognise their weight by identity (attention routes by its id)."""
    if isinstance(module, nn.MultiheadAttention):
        by_weight = module.forward.args[1]  # the routes dict the engine's attention forward looks up
        by_weight.pop(id(route.weight), None)
        by_weight[id(weight)] = route
    route.weight = weight


def _refresh_route(route: LinearRoute, owner: nn.Module, attr: str, module: nn.Module, args) -> None:
    """Forward pre-hook (after FSDP's): point the route at the whole weight FSDP just gathered."""
    if "forward" not in module.__dict__:  # unsparsified: the module runs its own forward, nothing is routed
        return
    weight = getattr(owner, attr)
    if weight is not route.weight:
        _point(route, module, weight)


def _local_write(slot: _Slot, rank: int, size: int):
    """(slot, positions of its values in this shard, their flat indices in the local shard); None, None when whole."""
    param = slot.param
    if not hasattr(param, "to_local"):  # replicated: the engine's own write
        return slot, None, None
    from torch.distributed.tensor import Shard

    if tuple(param.placements) != (Shard(0),):
        raise NotImplementedError(f"{slot.name}: saftune writes values into FSDP shards of dim 0, not {param.placements}")
    rows = param.shape[0]
    per_rank = -(-rows // size)  # torch.chunk's split, as FSDP2's: the last ranks may get fewer rows, or none
    first, last = min(rank * per_rank, rows), min((rank + 1) * per_rank, rows)
    if param.to_local().shape[0] != last - first:
        raise RuntimeError(f"{slot.name}: FSDP2 gave this process {param.to_local().shape[0]} rows, saftune expected "
                           f"{last - first}; this torch version shards differently")
    row = math.prod(param.shape[1:])
    own = (slot.indices >= first * row) & (slot.indices < last * row)
    positions = own.nonzero().squeeze(1)
    return slot, positions, slot.indices[positions] - first * row


@torch.no_grad()
def _sync_shards(writes: list, fsdp_modules: list) -> None:
    """`SparseModel.sync` for a sharded base: each process writes the selected entries of its own shards."""
    for module in fsdp_modules:
        module.reshard()  # a copy gathered for an evaluation would be stale: the next forward gathers again
    for slot, positions, local in writes:
        if positions is None:
            slot.param.view(-1).index_copy_(0, slot.indices, slot.values.detach().to(slot.param.dtype))
        elif positions.numel():
            shard = slot.param.to_local()
            shard.view(-1).index_copy_(0, local, slot.values.detach()[positions].to(shard.dtype))
