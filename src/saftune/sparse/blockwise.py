"""Lean phase 1: the exact dataset-averaged gradient, scored one transformer block at a time.

The one-pass phase 1 (`scores.grad_scores`) keeps an fp32 sum for every candidate parameter through the
whole pass over the data: 4 bytes per parameter, twice the size of a bf16 model, and so the memory peak
of SAFT. Here the two loops are swapped:

1. One forward pass over the data without a graph runs the stem and the blocks and keeps, for every
   batch, the hidden state entering each block and leaving the last one (the block boundaries), and
   what else each block was called with.
2. The backward runs by stage, from the top down, each stage over all batches: the head (whatever runs
   after the last block: final norm, output projection, loss), then block L-1, ..., block 0, each
   recomputed from its stored input and given the stored gradient of its output, then the stem
   (embeddings). A stage leaves the gradient of its input for the stage below.
3. Only the parameters of the stage being scored hold fp32 sums in memory; sums a later stage adds to
   again (a tied embedding's: head and stem) wait on disk in between. When a parameter's last stage is
   done, its scores join a running exact top-k and its sums are freed.

Each batch's gradient is the same sum of the same products as in the one-pass backward and is added
into the fp32 sum in the same batch order, so the scores, and the mask, are the one-pass ones; the
tests check equality on tiny Llama and GPT-2 models in fp32 and bf16 (a tied bf16 embedding is the
exception: one pass adds its two gradients in bf16, this module in fp32). The cost is one more forward
pass through the blocks, like gradient checkpointing. The memory is the boundaries (tokens x hidden x (blocks + 1) in the
model's dtype), one block's fp32 sums and one block's activations for one batch; the sums of a tensor used
both below and above the blocks (a tied embedding) are resident in the head and stem stages only, and the
stem stage gives embeddings sparse gradients (the rows of the batch's tokens), never a dense one.

When the boundaries of the whole data set would be too large, `chunk_batches` takes the data in chunks
of that many batches; between chunks the sums wait on disk (written and read with plain file I/O, which
the process's resident memory does not count), and continue in the same order.

Example:
    >>> from saftune.models.tiny_lm import tiny_causal_lm
    >>> from saftune.sparse import select_mask
    >>> lm = tiny_causal_lm("llama")
    >>> ids = torch.randint(0, 256, (2, 8))
    >>> loss = lambda m, b: m.lm(input_ids=b, use_cache=False).logits.float().logsumexp(-1).mean(-1)
    >>> select_mask_by_block(lm, loss, [ids], sparsity=0.01) == select_mask(lm, loss, [ids], sparsity=0.01)
    True
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from saftune import distributed
from saftune.sparse.mask import SparseMask
from saftune.sparse.scores import LossFn, _GradientAccumulator, get_score, per_example_losses, scoring_mode
from saftune.sparse.select import (
    candidate_parameters,
    check_batch_count,
    mask_meta,
    per_tensor_budget,
    selected_count,
    top_k,
)

logger = logging.getLogger(__name__)

HEAD, STEM = "head", "stem"
LEAN_SCORES = ("grad", "bias")  # sums of batch gradients; fisher needs each example's own backward
LEAN_BUDGETS = ("global", "per_tensor")


def find_blocks(model: nn.Module, blocks: str | None = None) -> tuple[str, nn.ModuleList]:
    """The model's stack of blocks: the `nn.ModuleList` named `blocks`, or the largest one of same-class modules.

    Example:
        >>> from saftune.models.tiny_lm import tiny_causal_lm
        >>> name, layers = find_blocks(tiny_causal_lm("llama", layers=3))
        >>> name, len(layers)
        ('lm.model.layers', 3)
    """
    modules = dict(model.named_modules())
    if blocks is not None:
        found = modules.get(blocks)
        if not isinstance(found, nn.ModuleList) or len(found) == 0:
            lists = [n for n, m in modules.items() if isinstance(m, nn.ModuleList) and len(m)]
            raise ValueError(f"blocks={blocks!r} is not a non-empty nn.ModuleList of the model; its module lists: {lists}")
        return blocks, found
    stacks = [(sum(p.numel() for p in m.parameters()), n, m) for n, m in modules.items()
              if isinstance(m, nn.ModuleList) and len(m) >= 1 and len({type(c) for c in m}) == 1]
    if not stacks:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of blocks to score one at a time; "
                         "the lean phase 1 needs a stack of transformer blocks (use the one-pass phase 1)")
    _, name, stack = max(stacks, key=lambda s: s[0])
    return name, stack


class _Stop(Exception):
    """Raised by the stub of block 0 in the stem stage: the rest of the forward is not needed."""


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor):
        raise ValueError("the lean phase 1 needs each block to take the hidden state as its first argument "
                         "(or as `hidden_states=`); use the one-pass phase 1 for this model")
    return hidden


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _first(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


def _replace_first(output, hidden: torch.Tensor):
    if isinstance(output, torch.Tensor):
        return hidden
    return type(output)((hidden, *output[1:]))


def _without_caches(kwargs: dict) -> dict:
    # A KV cache filled in the recording pass must not be extended again when a block is recomputed.
    return {k: None if type(v).__name__.endswith("Cache") else v for k, v in kwargs.items()}


@dataclass
class _Call:
    """How one block was called on one batch, and what it returned (hidden state detached)."""

    args: tuple
    kwargs: dict
    output: object


@dataclass
class _Recording:
    """The boundaries of one chunk: calls[l][b] for block l and batch b; the batches themselves."""

    batches: list = field(default_factory=list)
    calls: list = field(default_factory=list)


class _SpilledSums:
    """Per-parameter fp32 sums kept on disk between chunks (file I/O: not resident in this process)."""

    def __init__(self):
        self._dir = tempfile.TemporaryDirectory(prefix="saftune-phase1-")
        self._files: dict[str, tuple[Path, torch.Size, torch.device]] = {}
        self._written = 0

    def put(self, name: str, tensor: torch.Tensor) -> None:
        self._written += 1
        path = Path(self._dir.name) / f"{self._written}.f32"
        tensor.detach().cpu().numpy().tofile(path)
        self._files[name] = (path, tensor.shape, tensor.device)

    def names(self) -> list[str]:
        return list(self._files)

    def take(self, name: str) -> torch.Tensor | None:
        if name not in self._files:
            return None
        path, shape, device = self._files.pop(name)
        tensor = torch.from_numpy(np.fromfile(path, dtype=np.float32)).reshape(shape).to(device)
        path.unlink()
        return tensor

    def close(self) -> None:
        self._dir.cleanup()


class _RunningTopK:
    """The exact top-k of every score seen so far, ties broken by (candidate order, flat index) as `top_k` does.

    The candidates live in three flat tensors kept sorted by (tensor order, flat index), so that one `top_k`
    call over them breaks ties as the one-pass selection does, whatever order tensors arrive in.
    """

    def __init__(self, k: int, order: dict[str, int]):
        self.k, self.order = k, order
        self.tensor = torch.empty(0, dtype=torch.int64)  # candidate order of each entry's tensor
        self.flat = torch.empty(0, dtype=torch.int64)
        self.score = torch.empty(0, dtype=torch.float32)

    def add(self, name: str, score: torch.Tensor) -> None:
        flat = score.reshape(-1)
        if self.score.device != flat.device:  # the candidates live where the scores are computed
            self.tensor, self.flat, self.score = (t.to(flat.device) for t in (self.tensor, self.flat, self.score))
        if self.score.numel() >= self.k:  # full: only entries at least as high as the k-th best can enter
            idx = torch.nonzero(flat >= self.score.min()).squeeze(1)
            if idx.numel() > self.k:
                idx = idx[top_k([flat[idx]], self.k)[0]]
        else:  # the tensor's own top-k holds every entry of it the global top-k can take (same tie rule)
            idx = top_k([flat], min(self.k, flat.numel()))[0]
        at = int(torch.searchsorted(self.tensor, self.order[name]))
        self.tensor = torch.cat([self.tensor[:at], torch.full_like(idx, self.order[name]), self.tensor[at:]])
        self.flat = torch.cat([self.flat[:at], idx, self.flat[at:]])
        self.score = torch.cat([self.score[:at], flat[idx], self.score[at:]])
        if self.score.numel() > self.k:
            keep = top_k([self.score], self.k)[0]
            self.tensor, self.flat, self.score = self.tensor[keep], self.flat[keep], self.score[keep]

    def chosen(self) -> dict[str, torch.Tensor]:
        """Sorted flat indices per candidate name."""
        return {name: self.flat[self.tensor == i] for name, i in self.order.items()}


def _stage_order(num_blocks: int) -> list:
    return [HEAD, *range(num_blocks - 1, -1, -1), STEM]


def select_mask_by_block(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable,
    *,
    sparsity: float,
    score: str = "grad",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    budget: str = "global",
    seed: int = 0,
    progress: bool | None = None,
    max_batches: int | None = None,
    blocks: str | None = None,
    chunk_batches: int | None = None,
) -> SparseMask:
    """Phase 1 of SAFT with one block's fp32 sums at a time: the mask `select_mask` gives, with less memory.

    Args:
        model, loss_fn, data, sparsity, score, include, exclude, budget, seed, progress, max_batches: as
            `select_mask` (score "grad" or "bias"; budget "global" or "per_tensor").
        blocks: name of the model's `nn.ModuleList` of blocks (default: the largest list of same-class
            modules, e.g. a causal LM's `model.layers`).
        chunk_batches: hold the boundaries of at most this many batches at once (default: all of them);
            between chunks the sums are kept on disk.

    Returns:
        A `SparseMask` equal to `select_mask(...)`'s with the same arguments.
    """
    if score not in LEAN_SCORES:
        raise ValueError(f"the lean phase 1 computes sums of batch gradients: score must be one of {LEAN_SCORES}; "
                         f"got {score!r} (use the one-pass phase 1 for it)")
    if budget not in LEAN_BUDGETS:
        raise ValueError(f"the lean phase 1 supports budget {' or '.join(LEAN_BUDGETS)}; got {budget!r} "
                         "(per_row needs every score at once: use the one-pass phase 1)")
    check_batch_count("chunk_batches", chunk_batches)
    check_batch_count("max_batches", max_batches)
    if loss_fn is None or data is None:
        raise ValueError(f"score {score!r} needs `loss_fn` and `data`")
    spec = get_score(score)
    params = candidate_parameters(model, include, exclude, spec.is_candidate)
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    num_candidates = sum(p.numel() for p in params.values())
    d = selected_count(sparsity, num_candidates)
    meta = mask_meta(score=score, sparsity=sparsity, budget=budget, seed=seed, include=include, exclude=exclude,
                     num_selected=d, num_candidates=num_candidates, max_batches=max_batches)
    if d == num_candidates:
        return SparseMask({n: torch.arange(p.numel()) for n, p in params.items()}, shapes, meta)
    if progress is None:
        import sys

        progress = sys.stderr.isatty()
    blocks_name, stack = find_blocks(model, blocks)
    batches = itertools.islice(data, max_batches) if max_batches is not None else data
    with scoring_mode(model, params.values()), torch.enable_grad():
        scorer = _BlockScorer(model, stack, params, loss_fn, progress, d=d, budget=budget)
        try:
            chosen = scorer.run(distributed.shard(batches), chunk_batches)
        finally:
            scorer.close()
    names = list(params)
    logger.info("selected %d of %d entries block by block over %s (%s, %s budget)", d, num_candidates, blocks_name,
                score, budget)
    return SparseMask({n: chosen[n].cpu() for n in names}, shapes, meta)


class _BlockScorer:
    """Runs the recording pass and the stages, and keeps the sums, for `select_mask_by_block`."""

    def __init__(self, model, stack: nn.ModuleList, params: dict[str, nn.Parameter], loss_fn, progress: bool, *,
                 d: int, budget: str):
        self.model, self.stack, self.params, self.loss_fn, self.progress = model, stack, params, loss_fn, progress
        self.order = {n: i for i, n in enumerate(params)}
        # Scores are taken as soon as a parameter is finished, so at most one tensor's scores exist at a time.
        self.running = _RunningTopK(d, self.order) if budget == "global" else None
        names = list(params)
        self.quota = dict(zip(names, per_tensor_budget([params[n].numel() for n in names], d)))
        self.chosen: dict[str, torch.Tensor] = {}
        self.block_of = self._block_of_parameters()
        # parameter -> the stages that may give it gradient: its blocks, and head / stem as recorded
        self.stages_of: dict[str, set] = {n: set(b) for n, b in self.block_of.items()}
        self.accumulator = _GradientAccumulator(params, square=False)
        self.in_blocks = {id(m) for block in stack for m in block.modules()}
        self.phase, self.ran = STEM, {}  # id(module outside the blocks) -> phases it ran in
        self._outside_hooks = self._watch_outside()
        self.examples = 0  # counted in the head stage, where the loss is computed
        self.finished: set[str] = set()
        self.spilled = _SpilledSums()

    def close(self) -> None:
        for h in self._outside_hooks:
            h.remove()
        self.accumulator.close()
        self.spilled.close()

    def _block_of_parameters(self) -> dict[str, set[int]]:
        """Parameter name -> indices of the blocks holding it (empty: outside the blocks)."""
        ids = {id(p): n for n, p in self.params.items()}
        found: dict[str, set[int]] = {n: set() for n in self.params}
        for i, block in enumerate(self.stack):
            for p in block.parameters():
                if id(p) in ids:
                    found[ids[id(p)]].add(i)
        return found

    # ---- recording: one forward pass without a graph -------------------------------------------------
    def _record(self, batches: list) -> _Recording:
        """Run the stem and the blocks on every batch without a graph, keeping each block's call; stop there."""
        recording = _Recording(batches=batches, calls=[[] for _ in self.stack])
        last = len(self.stack) - 1

        def before_block(i):
            def hook(module, args, kwargs):
                self.phase = "blocks"
                if i > 0 and _hidden_of(args, kwargs) is not _first(recording.calls[i - 1][-1].output):
                    raise ValueError(
                        f"the lean phase 1 needs the blocks to run one after another (block {i}'s input is block "
                        f"{i - 1}'s output); this model changes the hidden state between blocks: use the one-pass phase 1")
                recording.calls[i].append(_Call(args, _without_caches(kwargs), None))

            return hook

        def after_block(i):
            def hook(module, args, kwargs, output):
                recording.calls[i][-1].output = output
                if i == last:  # the head runs in its own stage, with a graph
                    raise _Stop

            return hook

        handles = []
        for i, block in enumerate(self.stack):
            handles.append(block.register_forward_pre_hook(before_block(i), with_kwargs=True))
            handles.append(block.register_forward_hook(after_block(i), with_kwargs=True))
        try:
            with torch.no_grad():
                for batch in batches:
                    self.phase = STEM
                    try:
                        per_example_losses(self.loss_fn, self.model, batch)
                    except _Stop:
                        pass
        finally:
            for h in handles:
                h.remove()
        if any(len(c) != len(batches) for c in recording.calls):
            raise ValueError("the lean phase 1 needs every block to run exactly once per batch; use the one-pass phase 1")
        self._note_outside_stages()
        return recording

    def _watch_outside(self) -> list:
        """Forward pre-hooks noting in which phase (stem, head) each module outside the blocks runs."""
        def outside(module):
            def hook(mod, args):
                self.ran.setdefault(id(module), set()).add(self.phase)

            return hook

        return [m.register_forward_pre_hook(outside(m)) for m in self.model.modules()
                if id(m) not in self.in_blocks and any(p is not None for p in m._parameters.values())]

    def _note_outside_stages(self) -> None:
        """Which stages may give each parameter gradient: its blocks, and head / stem for modules outside them."""
        ids = {id(p): n for n, p in self.params.items()}
        for module in self.model.modules():
            if id(module) in self.in_blocks:
                continue
            for p in module._parameters.values():
                ran = self.ran.get(id(module), set()) & {HEAD, STEM}
                if p is not None and id(p) in ids and ran:
                    self.stages_of[ids[id(p)]] |= ran

    def _stages_everywhere(self) -> None:
        """Under torchrun: the union over processes, so that all score (and all-reduce) the same tensors in order."""
        merged: dict[str, set] = {}
        for stages in distributed.gather_objects(self.stages_of):
            for name, s in stages.items():
                merged[name] = merged.get(name, set()) | s
        self.stages_of = merged

    # ---- the stages ----------------------------------------------------------------------------------
    def run(self, data: Iterable, chunk_batches: int | None) -> dict[str, torch.Tensor]:
        """Score every candidate over `data`; returns the chosen flat indices per parameter."""
        source = iter(data)
        chunk = list(itertools.islice(source, chunk_batches)) if chunk_batches else list(source)
        while True:
            # Read one chunk ahead: the last chunk is the one scores are taken in.
            following = list(itertools.islice(source, chunk_batches)) if chunk_batches else []
            last_chunk = not distributed.any_process(bool(following))
            self._backward_stages(self._record(chunk), last_chunk)
            if last_chunk:
                return self.running.chosen() if self.running is not None else self.chosen
            chunk = following

    def _total_examples(self) -> int:
        """N over every chunk (and process); under torchrun the stage map is made the same everywhere too."""
        examples = self.examples
        if distributed.is_distributed():
            self._stages_everywhere()
            count = torch.tensor([float(examples)], device=next(iter(self.params.values())).device)
            distributed.all_reduce_([count])
            examples = int(count.item())
        if examples == 0:
            raise ValueError("select_mask got an empty dataset: `data` yielded no examples")
        return examples

    def _backward_stages(self, recording: _Recording, last_chunk: bool) -> None:
        grads: list[torch.Tensor | None] = [None] * len(recording.batches)
        order = _stage_order(len(self.stack))
        bar = tqdm(total=len(order) * len(recording.batches), desc="phase 1: scoring by block", unit="batch",
                   disable=not self.progress)
        try:
            for position, stage in enumerate(order):
                self._take_carried(stage)
                for b in range(len(recording.batches)):
                    grads[b] = self._stage_batch(stage, recording, b, grads[b])
                    bar.update()
                if stage == HEAD:
                    self._note_outside_stages()
                    if last_chunk:
                        self.total_examples = self._total_examples()
                else:
                    if stage != STEM:
                        recording.calls[stage] = []  # this block's boundaries are no longer needed
                late = self.finished & set(self.accumulator.sums)
                if late:  # a safety net: a parameter was scored before all of its gradient had arrived
                    raise RuntimeError(f"parameter {sorted(late)[0]!r} got gradient in stage {stage!r} after it was "
                                       "scored; use the one-pass phase 1 for this model")
                later = set(order[position + 1:])
                for name, stages in self.stages_of.items():
                    # A parameter outside the blocks that never ran scores zero, at the end (as in one pass).
                    if (stage in stages or (stage == STEM and not stages)) and not stages & later:
                        self._finish(name, last_chunk)
                if position + 1 < len(order):
                    self._set_aside(order[position + 1])
        finally:
            bar.close()

    def _set_aside(self, next_stage) -> None:
        """Sums the next stage does not add to wait on disk until a stage that does (a tied embedding's, which
        the head and the stem add to, during every block stage): one block's sums are then all that is resident."""
        for name in [n for n in self.accumulator.sums if next_stage not in self.stages_of[n]]:
            self.spilled.put(name, self.accumulator.sums.pop(name))

    def _take_carried(self, stage) -> None:
        """Sums set aside on disk (by an earlier stage or chunk) continue in the first stage that adds to them."""
        for name in self.spilled.names():
            stages = self.stages_of[name]
            if stage in stages or (stage == HEAD and not stages):
                if name in self.accumulator.sums:  # a safety net: gradient arrived before its stage
                    raise RuntimeError(f"parameter {name!r} got gradient before stage {stage!r}; use the one-pass phase 1")
                self.accumulator.sums[name] = self.spilled.take(name)

    def _finish(self, name: str, last_chunk: bool) -> None:
        """A parameter's last stage in this chunk is done: keep its sums for the next chunk, or score it."""
        sums = self.accumulator.sums.pop(name, None)
        if sums is None:  # the loss never reached it: score zero, as in the one-pass phase 1
            sums = torch.zeros(self.params[name].shape, dtype=torch.float32, device=self.params[name].device)
        if not last_chunk:
            self.spilled.put(name, sums)
            return
        if distributed.is_distributed():
            distributed.all_reduce_([sums])
        self.finished.add(name)
        score = sums.div_(self.total_examples).abs_()
        if not bool(torch.isfinite(score).all()):
            raise FloatingPointError(
                f"the gradient score of parameter {name!r} has NaN or Inf entries; check the loss "
                "(e.g. run in fp32 or lower the learning rate that produced these weights)")
        if self.running is not None:
            self.running.add(name, score)
        else:
            self.chosen[name] = top_k([score], self.quota[name])[0]

    def _stage_batch(self, stage, recording: _Recording, b: int, grad: torch.Tensor | None):
        if stage == HEAD:
            return self._head(recording, b)
        if stage == STEM:
            self._stem(recording, b, grad)
            return None
        return self._block(stage, recording, b, grad)

    def _head(self, recording: _Recording, b: int) -> torch.Tensor:
        last = len(self.stack) - 1
        top = _first(recording.calls[last][b].output).detach().requires_grad_(True)

        calls = [0] * len(self.stack)

        def stub(i):
            def forward(*args, **kwargs):
                calls[i] += 1
                if calls[i] > 1:
                    raise ValueError("the lean phase 1 needs every block to run exactly once per batch (this loss runs "
                                     "them more often, e.g. an encoder applied to two inputs); use the one-pass phase 1")
                # Blocks below the last return their recorded output; the last returns the boundary leaf.
                output = recording.calls[i][b].output
                if i == last:
                    self.phase = HEAD
                    return _replace_first(output, top)
                return output

            return forward

        self.phase = STEM
        with self._stubs(stub):
            losses = per_example_losses(self.loss_fn, self.model, recording.batches[b]).float()
            losses.sum().backward()
        self.examples += losses.numel()
        return top.grad

    def _block(self, i: int, recording: _Recording, b: int, grad: torch.Tensor) -> torch.Tensor:
        call = recording.calls[i][b]
        hidden = _hidden_of(call.args, call.kwargs).detach().requires_grad_(True)
        args, kwargs = _with_hidden(call.args, call.kwargs, hidden)
        output = _first(self.stack[i](*args, **kwargs))
        torch.autograd.backward(output, grad)
        return hidden.grad

    def _stem(self, recording: _Recording, b: int, grad: torch.Tensor) -> None:
        captured = {}
        self.phase = STEM

        def stub(i):
            def forward(*args, **kwargs):
                captured["hidden"] = _hidden_of(args, kwargs)
                raise _Stop

            return forward

        with self._stubs(stub, only_first=True), self._sparse_embeddings():
            try:
                per_example_losses(self.loss_fn, self.model, recording.batches[b])
            except _Stop:
                pass
            hidden = captured.get("hidden")
            if hidden is not None and hidden.requires_grad:
                torch.autograd.backward(hidden, grad)

    @contextlib.contextmanager
    def _sparse_embeddings(self):
        """Scored embeddings give the stem stage sparse gradients: the rows of the batch's tokens, not a dense
        vocabulary x hidden tensor beside the embedding's fp32 sums (1050 -> 486 MiB at the stem of a bf16
        llama:2048x4)."""
        scored = {id(p) for p in self.params.values()}
        switched = [m for m in self.model.modules() if type(m) is nn.Embedding and id(m.weight) in scored
                    and not m.sparse and m.max_norm is None and not m.scale_grad_by_freq]
        try:
            for m in switched:
                m.sparse = True
            yield
        finally:
            for m in switched:
                m.sparse = False

    @contextlib.contextmanager
    def _stubs(self, make, only_first: bool = False):
        """Blocks answer with `make(i)` instead of their forward (the first block only, with `only_first`)."""
        chosen = list(self.stack)[:1] if only_first else list(self.stack)
        try:
            for i, block in enumerate(chosen):
                block.forward = make(i)
            yield
        finally:
            for block in chosen:
                block.__dict__.pop("forward", None)
