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
  dense gradient. These are the small tensors. (RMSNorm scales take the engine's `scale` path, which gives
  the weight no gradient, only its value vector: they are sharded like the projections.)

Every forward of a sharded unit is a collective: every process must run the same number of forward
passes (see `shard_frozen_base`).

Phase 1 sharded too: `select_mask_sharded` scores on an FSDP2-sharded view of the model (sharing the
whole weights' storage, which stay where they were loaded, e.g. in host memory): each process holds
1/W of the weights on the device, gets 1/W of each summed gradient (FSDP reduce-scatters it), keeps
1/W of the score accumulator, and the global top-k is found across the processes without gathering
the scores. With saftune's own trainer both phases shard:
`torchrun --nproc-per-node N -m saftune.cli train --fsdp ...` (or `train.fsdp: true`).

Example (in each of 2 processes under torchrun; a single process has nothing to shard):
    >>> sm = sparsify(model, mask)                                     # doctest: +SKIP
    >>> shards = shard_frozen_base(sm)                                 # doctest: +SKIP
    >>> shards.local_numel / shards.total_numel                        # doctest: +SKIP
    0.51
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from saftune.sparse.engine import SparseModel, _linear_forward, _owners, _Slot
from saftune.sparse.kernels import LinearRoute
from saftune.sparse.mask import SparseMask
from saftune.sparse.scores import per_example_losses
from saftune.sparse.select import _float_to_key, _key_to_float, candidate_parameters, mask_meta, selected_count

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


def _fully_shard():
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError as e:  # FSDP2 is public from torch 2.6
        raise ImportError(f"saftune's FSDP support needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6): {e}") from e
    return FSDPModule, fully_shard


def _check_processes(what: str) -> None:
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        raise RuntimeError(f"{what} needs several processes: launch with torchrun (or accelerate launch) and "
                           "call saftune.distributed.init_from_env() first")


def _default_mesh(model: nn.Module, mesh, device: torch.device | str | None = None):
    """`mesh`, or one over every process on `device`'s type (default: where the model's weights are)."""
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        device_type = torch.device(device).type if device is not None else next(model.parameters()).device.type
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    if mesh.ndim != 1:
        raise ValueError(f"saftune shards over a 1-D mesh (data parallel); got {mesh.ndim} dimensions")
    return mesh


def _mesh_device(mesh) -> torch.device:
    """This process's device on `mesh` (an accelerator's current index, as FSDP2 places the shards)."""
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    module = getattr(torch, mesh.device_type)
    return torch.device(mesh.device_type, module.current_device())


def shard_frozen_base(sparse_model: SparseModel, *, units: list[str] | None = None, mesh=None, device=None,
                      reshard_after_forward: bool = True) -> FrozenShards:
    """Shard the frozen weights of a sparsified model with FSDP2; the selected values stay replicated.

    Call it in every process, after `sparsify` (the engine must see the whole weights) and before the
    first training forward. Train as without FSDP: the value vectors to the optimizer,
    `distributed.all_reduce_gradients` on them before each step (saftune's trainer does both).

    Every process must run the same number of forward passes, in training and in evaluation: a forward
    all-gathers, and a process that skips one leaves the others waiting. saftune's trainer (`fsdp`
    on: `saftune train --fsdp`, which calls this after phase 1) gives a process with an empty share of a
    micro-batch a forward on one example weighted 0, and `saftune.eval.predict` pads a process's
    batches to the others' count; a loop of your own must do the same.

    Args:
        sparse_model: what `sparsify` returned (SAFT's `method.sparse`).
        units: names of submodules to shard as FSDP units of their own (all-gathered one at a time);
            default `plan_units(model)`. Each must hold every module that shares its parameters.
        mesh: a 1-D `DeviceMesh` over the processes; default all of them, on `device`'s type.
        device: where the shards and the engine's tensors go when `mesh` is not given (default: where the
            weights are). A model too big for one device stays in host memory until this call moves
            each process's shards (and the engine's O(d) tensors) to it.
        reshard_after_forward: free each unit's gathered weights after its forward (gather them again
            for the backward): the least memory. False keeps them until the backward.

    Returns:
        A `FrozenShards` with what this process holds.
    """
    FSDPModule, fully_shard = _fully_shard()
    _check_processes("shard_frozen_base")
    if not isinstance(sparse_model, SparseModel):
        raise TypeError(f"shard_frozen_base takes the SparseModel that sparsify returned, not {type(sparse_model).__name__}")
    model = sparse_model.model
    if isinstance(model, FSDPModule):
        raise RuntimeError("this model is sharded already (shard_frozen_base was called on it before)")
    from saftune.sparse.quantized import QuantizationError, quantized_parameter_names

    if quantized_parameter_names(model):  # FSDP2 would shard torchao's quantized tensors without their side terms
        raise QuantizationError("a quantized base (quantize=int8 or nf4) is not sharded with FSDP: it already takes a "
                                "quarter (or an eighth) of fp32's memory; train it in one process, without --fsdp / train.fsdp")
    mesh = _default_mesh(model, mesh, device)

    names = {id(p): n for n, p in model.named_parameters()}
    # A parameter that trains through a dense gradient (the engine's hook path) stays whole: FSDP would
    # reduce-scatter that dense gradient, and the engine's hook gathers its selected entries itself.
    ignored = {p for p in model.parameters() if p.requires_grad}
    places = _owners(model)  # parameter id -> every (module, attribute) holding it: where to find its sharded form
    total = sum(p.numel() for p in model.parameters())

    unit_names = plan_units(model) if units is None else list(units)
    modules = dict(model.named_modules())
    unknown = [u for u in unit_names if u not in modules or not u]
    if unknown:
        raise ValueError(f"units {unknown} are not submodules of the model (names look like {list(modules)[1:4]})")
    for name in unit_names:
        fully_shard(modules[name], mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=ignored)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=ignored)

    # The engine still holds the unsharded parameters (its slots, requires_grad record): point them at the
    # sharded ones, so the whole weights are freed.
    replaced = {pid: getattr(*places[pid][0]) for pid in places}
    for slot in sparse_model._slots:
        slot.param = replaced[id(slot.param)]
    sparse_model._requires_grad = {replaced[id(p)]: flag for p, flag in sparse_model._requires_grad.items()}
    # FSDP2 moved each process's shards to the mesh's device, but not what it ignores. A model loaded in
    # host memory (bigger than one device) reaches the device here, shard by shard, never whole.
    device = _mesh_device(mesh)
    for p in ignored:
        p.data = p.data.to(device)
    sparse_model.to(device)  # also installs the kernels again, on the sharded parameters
    for route, module, owner, attr in _routes(sparse_model):  # the kernels must get the weight FSDP gathered for this forward
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


# ---------------------------------------------------------------------------------------------- phase 1, sharded


@dataclass
class ShardedScores:
    """Phase-1 scores as the processes hold them: each its own rows of every candidate tensor.

    Attributes:
        local: parameter name -> this process's rows of its score (flattened; empty when it holds none).
        offsets: parameter name -> the flat index in the whole tensor of `local[name]`'s first entry.
        shapes: parameter name -> the whole tensor's shape.
        examples: the number of training examples scored (all processes together).
    """

    local: dict[str, torch.Tensor]
    offsets: dict[str, int]
    shapes: dict[str, tuple[int, ...]]
    examples: int

    @property
    def local_numel(self) -> int:
        return sum(t.numel() for t in self.local.values())


def _shadow(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters share the originals' storage (no second copy of the weights):
    FSDP may shard it, replacing its parameters, while the model itself stays whole and untouched."""
    memo = {id(p): nn.Parameter(p.detach(), requires_grad=p.requires_grad) for p in model.parameters()}
    return copy.deepcopy(model, memo)  # a tied parameter is one id: it stays tied in the copy


def sharded_grad_scores(model: nn.Module, names: Iterable[str], loss_fn, data: Iterable, *, mesh=None, device=None,
                        progress: bool = False) -> ShardedScores:
    """|mean gradient| of the named parameters over `data`, scored with the weights sharded by FSDP2.

    Call it in every process, with the same `data` in each (every process iterates all batches and
    scores its W-th share, as `saftune.distributed.shard` splits them). The model is left as it was,
    e.g. in host memory: the sharded view moves each process's shards to `device` (or `mesh`'s), where
    `data`'s batches must be.

    Why FSDP and not an all-reduce: a dense gradient all-reduced is the whole model's size in every
    process; reduce-scattered by FSDP, each process receives and accumulates only its 1/W of it, and
    between its forward and backward a unit's whole weights exist only while it runs.
    """
    from saftune.sparse.scores import scoring_mode

    FSDPModule, fully_shard = _fully_shard()
    _check_processes("sharded phase 1")
    names = list(names)
    wanted = set(names)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if n in wanted}
    batches = list(data)  # every process must run the same number of forward passes: count them first
    if not batches:
        raise ValueError("select_mask_sharded got an empty dataset: `data` yielded no batches")
    mesh = _default_mesh(model, mesh, device)
    rank, size = mesh.get_local_rank(), mesh.size()
    shadow = _shadow(model)
    params = dict(shadow.named_parameters())
    with scoring_mode(shadow, [params[n] for n in names]):
        scalars = {p for p in shadow.parameters() if p.dim() == 0}  # nothing to split: kept whole
        device = _mesh_device(mesh)
        for p in scalars:  # FSDP moves the rest to the mesh's device, not what it ignores
            p.data = p.data.to(device)
        modules = dict(shadow.named_modules())
        for unit in plan_units(shadow):
            fully_shard(modules[unit], mesh=mesh, ignored_params=scalars)
        fully_shard(shadow, mesh=mesh, ignored_params=scalars)
        for module in shadow.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)  # sums, as the unsharded phase 1 sums
                module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
        params = dict(shadow.named_parameters())  # the sharded ones
        sums = {n: torch.zeros_like(_local(params[n]), dtype=torch.float32) for n in names}
        mine = batches[rank::size]
        examples = 0
        for i in range(math.ceil(len(batches) / size)):
            # A process out of batches still joins the collectives: a forward and backward weighted 0.
            batch, weight = (mine[i], 1.0) if i < len(mine) else (batches[0], 0.0)
            losses = per_example_losses(loss_fn, shadow, batch).float()
            (losses.sum() * weight).backward()
            examples += losses.numel() if weight else 0
            for n in names:
                if params[n].grad is not None:
                    sums[n].add_(_local(params[n].grad).float())
                    params[n].grad = None
            if progress and rank == 0:
                logger.info("phase 1 (sharded): batch %d of %d", min((i + 1) * size, len(batches)), len(batches))
    count = torch.tensor([examples], dtype=torch.int64)
    dist.all_reduce(count)
    offsets = {}
    for n in names:
        if hasattr(params[n], "to_local"):
            rows = shapes[n][0]
            per_rank = -(-rows // size)
            offsets[n] = min(rank * per_rank, rows) * math.prod(shapes[n][1:])
        else:  # kept whole (a scalar): each process summed its own batches; the main one holds the total
            dist.all_reduce(sums[n])
            offsets[n] = 0
            if rank != 0:
                sums[n] = sums[n].reshape(-1)[:0]
    del shadow, params
    scores = {n: s.reshape(-1).div_(int(count)).abs_() for n, s in sums.items()}
    for n, s in scores.items():
        if not bool(torch.isfinite(s).all()):
            raise FloatingPointError(f"the 'grad' score of parameter {n!r} has NaN or Inf entries; check the loss "
                                     "(e.g. run in fp32)")
    return ShardedScores(scores, offsets, shapes, int(count))


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def top_k_across_processes(local: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """The exact global top-k of float32 scores split across the processes, as local flat indices.

    The same selection as `saftune.sparse.select.top_k` over the whole tensors, with ties broken by
    (tensor order, flat index) where each process holds consecutive rows, in rank order. The scores are
    never gathered: a bisection over the float order counts the entries above a threshold in each
    process and sums the counts (one all-reduce of one number per step, about 32 steps).

    Example (in each of 2 processes; the scores are [3, 1] in process 0 and [2, 5] in process 1):
        >>> top_k_across_processes([scores], 2)                        # doctest: +SKIP
        [tensor([0])]   # process 0; process 1: [tensor([1])]
    """
    flats = [s.reshape(-1) for s in local]

    def total(value: int | float, op=dist.ReduceOp.SUM, dtype=torch.int64):
        t = torch.tensor([value], dtype=dtype)
        dist.all_reduce(t, op=op)
        return t.item()

    def at_least(threshold: float) -> int:
        return total(sum(int(torch.count_nonzero(f >= threshold)) for f in flats))

    size = total(sum(f.numel() for f in flats))
    if not 0 <= k <= size:
        raise ValueError(f"top_k: k={k} is outside [0, {size}]")
    if k == 0:
        return [torch.empty(0, dtype=torch.int64) for _ in flats]
    smallest = min((float(f.min()) for f in flats if f.numel()), default=math.inf)
    largest = max((float(f.max()) for f in flats if f.numel()), default=-math.inf)
    lo = _float_to_key(total(smallest, dist.ReduceOp.MIN, torch.float64))
    hi = _float_to_key(total(largest, dist.ReduceOp.MAX, torch.float64)) + 1
    while hi - lo > 1:  # invariant: at least k entries >= key lo, fewer than k >= key hi
        mid = (lo + hi) // 2
        if at_least(_key_to_float(mid)) >= k:
            lo = mid
        else:
            hi = mid
    threshold = _key_to_float(lo)
    above = [torch.nonzero(f > threshold).squeeze(1) for f in flats]
    ties = [torch.nonzero(f == threshold).squeeze(1) for f in flats]
    ties_left = k - total(sum(a.numel() for a in above))
    table = [None] * dist.get_world_size()
    dist.all_gather_object(table, [t.numel() for t in ties])  # ties per (process, tensor)
    rank = dist.get_rank()
    taken = []
    for t in range(len(flats)):  # tensor order first, then the processes' rows in rank order
        mine = 0
        for r, counts in enumerate(table):
            take = min(ties_left, counts[t])
            ties_left -= take
            if r == rank:
                mine = take
        taken.append(mine)
    return [torch.sort(torch.cat([a, t[:n]])).values for a, t, n in zip(above, ties, taken)]


def select_mask_sharded(model: nn.Module, loss_fn, data: Iterable, *, sparsity: float,
                        include: list[str] | None = None, exclude: list[str] | None = None, seed: int = 0,
                        progress: bool = False, max_batches: int | None = None, mesh=None, device=None) -> SparseMask:
    """SAFT's phase 1 (score 'grad', global budget) with the weights and the scores sharded by FSDP2.

    The same mask as `saftune.sparse.select_mask` (up to float rounding of the summed gradients, which
    may swap entries whose scores agree to about 1e-7), in every process. Each process holds about 1/W
    of the weights on the device and of the score accumulator (`sharded_grad_scores`).

    Example (in every process of a torchrun job):
        >>> mask = select_mask_sharded(model, loss_fn, batches, sparsity=1e-3)   # doctest: +SKIP
        >>> mask.num_selected == select_mask(model, loss_fn, batches, sparsity=1e-3).num_selected  # doctest: +SKIP
        True
    """
    import itertools

    params = candidate_parameters(model, include, exclude)
    num_candidates = sum(p.numel() for p in params.values())
    d = selected_count(sparsity, num_candidates)
    if max_batches is not None:
        data = itertools.islice(data, max_batches)
    scores = sharded_grad_scores(model, params, loss_fn, data, mesh=mesh, device=device, progress=progress)
    names = list(params)
    chosen = top_k_across_processes([scores.local[n] for n in names], d)
    local = {n: idx + scores.offsets[n] for n, idx in zip(names, chosen)}
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)  # d indices: the mask is small
    indices = {n: torch.sort(torch.cat([p[n] for p in parts])).values for n in names}
    meta = mask_meta(score="grad", sparsity=sparsity, budget="global", seed=seed, include=include, exclude=exclude,
                     num_selected=d, num_candidates=num_candidates, max_batches=max_batches)
    logger.info("selected %d of %d entries (grad, global budget; phase 1 sharded over %d processes, this one held %d "
                "score entries)", d, num_candidates, len(parts), scores.local_numel)
    return SparseMask(indices, scores.shapes, meta)
