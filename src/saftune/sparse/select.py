"""Phase 1: choose exactly d = floor(sparsity * D) entries with the highest scores.

The global top-k never concatenates the D scores into one tensor. It bisects on the *bit pattern* of
a float32 threshold (at most 32 passes, each counting `score >= t` tensor by tensor), which finds the
exact k-th largest score; entries above it are all taken, and entries equal to it are taken in global
order (parameter order, then flat index) until exactly k are chosen. Extra memory: one boolean tensor
the size of the largest parameter, briefly.

Budgets (how the d entries are spread before the scores rank them):
    global      one top-k over all candidates (SAFT).
    per_tensor  d split over tensors in proportion to their sizes, top-k inside each (SIFT).
    per_row     the same count for every output unit (GPS, Zhang et al. 2024): see `per_row_select`.
"""

from __future__ import annotations

import fnmatch
import itertools
import logging
import math
import numbers
import struct
from collections.abc import Callable, Iterable, Sequence
from fractions import Fraction

import torch
from torch import nn

from saftune.sparse.mask import SparseMask
from saftune.sparse.scores import LossFn, get_score, owner_modules, scoring_mode

logger = logging.getLogger(__name__)

BUDGETS = ("global", "per_tensor", "per_row")


def _float_to_key(x: float) -> int:
    """Map a float32 to an integer with the same order (-0.0 sorts just below +0.0)."""
    (bits,) = struct.unpack("<i", struct.pack("<f", x))
    return bits if bits >= 0 else -(bits & 0x7FFFFFFF) - 1


def _key_to_float(key: int) -> float:
    bits = key if key >= 0 else (-(key + 1)) | -0x80000000
    return struct.unpack("<f", struct.pack("<i", bits))[0]


def _count_at_least(scores: Sequence[torch.Tensor], bounds, threshold: float) -> int:
    count = 0
    for s, (lo, hi) in zip(scores, bounds):
        if hi < threshold:
            continue
        count += s.numel() if lo >= threshold else int(torch.count_nonzero(s >= threshold))
    return count


def top_k(scores: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Exact top-k over several float32 tensors, ties broken by (tensor order, flat index).

    Args:
        scores: float32 tensors, finite.
        k: how many entries to keep, 0 <= k <= total size.

    Returns:
        One sorted int64 tensor of flat indices per input tensor.

    Example:
        >>> top_k([torch.tensor([0.5, 2.0]), torch.tensor([2.0, 1.0])], 2)
        [tensor([1]), tensor([0])]
    """
    total = sum(s.numel() for s in scores)
    if not 0 <= k <= total:
        raise ValueError(f"top_k: k={k} is outside [0, {total}]")
    flats = [s.reshape(-1) for s in scores]
    if k == 0:
        return [torch.empty(0, dtype=torch.int64, device=s.device) for s in flats]
    nonempty = [s for s in flats if s.numel()]
    bounds = [(float(s.min()), float(s.max())) if s.numel() else (float("inf"), float("-inf")) for s in flats]
    # Invariant: count(>= key_to_float(lo)) >= k and count(>= key_to_float(hi)) < k.
    lo = _float_to_key(min(float(s.min()) for s in nonempty))
    hi = _float_to_key(max(float(s.max()) for s in nonempty)) + 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _count_at_least(flats, bounds, _key_to_float(mid)) >= k:
            lo = mid
        else:
            hi = mid
    threshold = _key_to_float(lo)

    selected = []
    above = [torch.nonzero(s > threshold).squeeze(1) for s in flats]
    ties_left = k - sum(a.numel() for a in above)
    for s, idx in zip(flats, above):
        if ties_left > 0:
            ties = torch.nonzero(s == threshold).squeeze(1)[:ties_left]
            ties_left -= ties.numel()
            idx = torch.sort(torch.cat([idx, ties])).values
        selected.append(idx)
    return selected


def per_tensor_budget(sizes: Sequence[int], d: int) -> list[int]:
    """Split d entries over tensors in proportion to their sizes (largest remainder, exact).

    Example:
        >>> per_tensor_budget([10, 10, 80], 5)
        [1, 0, 4]
    """
    total = sum(sizes)
    quotas = [d * n // total for n in sizes]
    remainders = [d * n % total for n in sizes]
    order = sorted(range(len(sizes)), key=lambda i: (-remainders[i], i))
    for i in order[: d - sum(quotas)]:
        quotas[i] += 1
    return quotas


def row_view(score: torch.Tensor, columns_are_units: bool = False) -> torch.Tensor:
    """A parameter's scores as [output units, entries per unit] (GPS's rows).

    A weight of 2 or more dimensions (Linear, convolution, fused attention projection) has one row per
    output unit along dim 0. An `nn.Embedding` weight [vocab, dim] is a Linear layer on one-hot inputs
    whose output units are its `dim` columns (`columns_are_units`): each column is a row here. A 0-D
    or 1-D tensor (bias, LayerNorm, class embedding) is one row.

    Example:
        >>> row_view(torch.arange(6.0).reshape(2, 3)).shape, row_view(torch.zeros(5)).shape
        (torch.Size([2, 3]), torch.Size([1, 5]))
    """
    if score.numel() == 0:  # a zero-size tensor has no unit to give entries to
        return score.reshape(0, 1)
    if score.dim() < 2:
        return score.reshape(1, -1)
    if columns_are_units:  # a copy: row-wise top-k on a transposed view is several times slower
        return score.reshape(score.shape[0], -1).T.contiguous()
    return score.reshape(score.shape[0], -1)


def _level_for(rows: Sequence[tuple[int, int]], d: int) -> int:
    """The largest q with sum(count * min(length, q)) <= d, over (row count, row length) pairs."""
    lo, hi = 0, max(length for _, length in rows)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(count * min(length, mid) for count, length in rows) <= d:
            lo = mid
        else:
            hi = mid - 1
    return lo


def per_row_select(scores: Sequence[torch.Tensor], d: int, columns_are_units: Sequence[bool] | None = None,
                   ) -> list[torch.Tensor]:
    """GPS's budget: every output unit (row, see `row_view`) gets the same number of entries, exactly d in all.

    Every row takes its q best entries, q the largest level with sum over rows of min(row length, q)
    <= d (a row shorter than q takes all of its entries). The r < (rows longer than q) entries left
    over go, one each, to the rows whose next-best entry scores highest: a top-r over those entries,
    ties broken by tensor order and then row index. Inside a row, equal scores go to the lower index.

    Args:
        scores: float32 score tensors, finite.
        d: total entries to keep, 0 <= d <= total size.
        columns_are_units: per tensor, True for `nn.Embedding` weights (their units are the columns).

    Returns:
        One sorted int64 tensor of flat indices per input tensor.

    Example:
        >>> per_row_select([torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 4.0]])], 3)
        [tensor([0, 4, 5])]
    """
    columns_are_units = list(columns_are_units or [False] * len(scores))
    views = [row_view(s, c) for s, c in zip(scores, columns_are_units)]
    total = sum(v.numel() for v in views)
    if not 0 <= d <= total:
        raise ValueError(f"per_row_select: d={d} is outside [0, {total}]")
    q = _level_for([(v.shape[0], v.shape[1]) for v in views if v.numel()], d) if total else 0
    base, next_cols, next_scores = [], [], []
    for v in views:
        rows, cols = _row_best(v, min(v.shape[1], q))
        base.append((rows, cols[0]))
        next_cols.append(cols[1])
        next_scores.append(cols[2])
    extra = top_k(next_scores, d - sum(v.shape[0] * min(v.shape[1], q) for v in views))
    chosen = []
    for s, v, (row_of, col_of), next_col, columns, bonus in zip(scores, views, base, next_cols, columns_are_units, extra):
        if bonus.numel():  # the extra entry of each chosen row: its next-best one
            row_of = torch.cat([row_of, bonus])
            col_of = torch.cat([col_of, next_col[bonus]])
        if s.dim() >= 2 and columns:  # view [dim, vocab] of a [vocab, dim] weight
            flat = col_of * v.shape[0] + row_of
        else:
            flat = row_of * v.shape[1] + col_of
        chosen.append(torch.sort(flat).values)
    return chosen


def _row_best(v: torch.Tensor, take: int):
    """The `take` best entries of every row of `v` [R, L] in stable descending order, and the next one.

    Returns (row, column) indices of the best entries, and per row the column and score of the
    next-best entry (empty when the rows have no entry left). Linear in the size of `v`: the (take+1)-th
    largest score t of each row comes from `topk`; the entries above t are all among the best, and the
    ties at t are taken in column order (`cumsum` ranks them), which is what a stable sort would give.
    """
    if take == v.shape[1]:  # the whole rows
        rows, cols = torch.nonzero(torch.ones_like(v, dtype=torch.bool), as_tuple=True)
        return rows, (cols, v.new_empty(0, dtype=torch.int64), v.new_empty(0))
    threshold = torch.topk(v, take + 1, dim=1).values[:, -1:]  # [R, 1]
    above = v > threshold
    ties = v == threshold
    needed = (take + 1) - above.sum(1, keepdim=True)  # >= 1: the (take+1)-th entry is a tie
    rank = ties.cumsum(1, dtype=torch.int32)
    best = above | (ties & (rank < needed))
    rows, cols = torch.nonzero(best, as_tuple=True)
    next_col = (ties & (rank == needed)).int().argmax(1)
    return rows, (cols, next_col, threshold.squeeze(1).contiguous())


def _matches(name: str, patterns: Iterable[str] | None) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns or ())


def candidate_parameters(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    is_candidate=None,
) -> dict[str, nn.Parameter]:
    """Parameters selectable under the include/exclude glob patterns (all of them by default).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> list(candidate_parameters(net, include=["1.*"]))
        ['1.weight', '1.bias']
    """
    include = [include] if isinstance(include, str) else include
    exclude = [exclude] if isinstance(exclude, str) else exclude
    for label, patterns in (("include", include), ("exclude", exclude)):
        for pattern in patterns or ():
            if not any(fnmatch.fnmatchcase(n, pattern) for n, _ in model.named_parameters()):
                raise ValueError(
                    f"{label} pattern {pattern!r} matches no parameter of the model; "
                    f"parameter names look like {[n for n, _ in model.named_parameters()][:3]}"
                )
    chosen = {
        n: p
        for n, p in model.named_parameters()
        if (include is None or _matches(n, include)) and not _matches(n, exclude) and (is_candidate is None or is_candidate(n, p))
    }
    if not chosen:
        raise ValueError(
            "no parameter is left to select from: include/exclude removed all of them, or the score selects "
            "only some kinds of parameter (score 'bias' needs parameters named '*bias')"
        )
    return chosen


def selected_count(sparsity: float, num_candidates: int) -> int:
    """d = floor(sparsity * D), validated: sparsity in (0, 1] and d >= 1.

    Example:
        >>> selected_count(0.29, 100)
        29
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or not 0 < sparsity <= 1:
        raise ValueError(f"sparsity must be in (0, 1] (the fraction of entries to train, e.g. 0.001); got {sparsity!r}")
    # floor on the decimal the user wrote: int(0.29 * 100) would give 28 through binary rounding
    d = math.floor(Fraction(repr(float(sparsity))) * num_candidates)
    if d < 1:
        raise ValueError(
            f"sparsity={sparsity} selects floor({sparsity} * {num_candidates}) = 0 entries; "
            f"use sparsity >= {1 / num_candidates:.3g} for this model"
        )
    return d


def check_batch_count(name: str, value) -> None:
    """A ValueError unless `value` is None or a positive int (a number of batches, e.g. max_batches)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive number of batches (or None for all); got {value!r}")


def mask_meta(*, score: str, sparsity: float, budget: str, seed: int, include, exclude, num_selected: int,
              num_candidates: int, max_batches: int | None) -> dict:
    """What a selection records in its mask: the settings it was made with and its size."""
    meta = {
        "score": score, "sparsity": sparsity, "budget": budget, "seed": seed,
        "include": list(include) if include else None, "exclude": list(exclude) if exclude else None,
        "num_selected": num_selected, "num_candidates": num_candidates,
    }
    if max_batches is not None:
        meta["max_batches"] = max_batches
    return meta


def select_mask(
    model: nn.Module,
    loss_fn: LossFn | None = None,
    data: Iterable | None = None,
    *,
    sparsity: float,
    score: str = "grad",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    budget: str = "global",
    seed: int = 0,
    progress: bool | None = None,
    max_batches: int | None = None,
    score_options: dict | None = None,
    reuse_scores: Callable[[dict, Callable[[], dict]], dict] | None = None,
    lean: bool = False,
    blocks: str | None = None,
    chunk_batches: int | None = None,
) -> SparseMask:
    """Phase 1 of SAFT: pick the d = floor(sparsity * D) most important entries.

    The model runs in eval mode (no dropout, so the mask is deterministic); its training mode and
    `requires_grad` flags are restored afterwards.

    Args:
        model: any `nn.Module`.
        loss_fn: `loss_fn(model, batch) -> [B]` per-example losses (needed by `grad`, `fisher`, `bias`).
        data: iterable of batches, passed to `loss_fn` one by one (a DataLoader, a list, ...).
        sparsity: fraction of the candidate entries to select, in (0, 1].
        score: one of `saftune.sparse.scores.SCORES` (grad, fisher, random, magnitude, bias, fps, lt-sft).
        include: glob patterns of parameter names to select from (default: all parameters).
        exclude: glob patterns of parameter names never to select.
        budget: "global" (one top-k over all candidates), "per_tensor" (d spread in proportion to size)
            or "per_row" (the same count per output unit, GPS; see `per_row_select`).
        seed: seed of the `random` score.
        progress: show a progress bar over the data (default: when stderr is a terminal).
        max_batches: score from the first `max_batches` batches of `data` only (SIFT; default: all).
        score_options: keyword options of the score (e.g. {"steps": 100, "lr": 1e-4} for "lt-sft").
        reuse_scores: `reuse_scores(settings, compute)` -> scores, a cache for scores that need data
            (`PrepareContext.reuse_scores`): the settings name the score, its options, the candidate
            tensors and max_batches; the caller's key adds the model, data and seed.
        lean: score one block of the model at a time (`saftune.sparse.blockwise`): the same mask with one
            block's fp32 sums instead of every parameter's, for one more forward pass. Scores "grad" and
            "bias", budgets "global" and "per_tensor"; `reuse_scores` is not used.
        blocks: with `lean`, the name of the model's nn.ModuleList of blocks (default: found).
        chunk_batches: with `lean`, the number of batches whose block boundaries are held at once.

    Returns:
        A `SparseMask` with exactly d entries.

    Example:
        >>> net = nn.Linear(4, 2)
        >>> loss = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")
        >>> data = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]
        >>> select_mask(net, loss, data, sparsity=0.2).num_selected
        2
    """
    if lean:
        from saftune.sparse.blockwise import select_mask_by_block

        return select_mask_by_block(model, loss_fn, data, sparsity=sparsity, score=score, include=include,
                                    exclude=exclude, budget=budget, seed=seed, progress=progress,
                                    max_batches=max_batches, blocks=blocks, chunk_batches=chunk_batches)
    if blocks is not None or chunk_batches is not None:
        raise ValueError("blocks and chunk_batches are options of the lean phase 1: pass lean=True with them")
    spec = get_score(score)
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {', '.join(map(repr, BUDGETS))}; got {budget!r}")
    check_batch_count("max_batches", max_batches)
    score_options = spec.check_options(score, score_options)
    params = candidate_parameters(model, include, exclude, spec.is_candidate)
    if spec.restrict is not None:
        params = spec.restrict(model, params)
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    num_candidates = sum(p.numel() for p in params.values())
    d = selected_count(sparsity, num_candidates)
    if spec.needs_data and d < num_candidates and loss_fn is None:
        raise ValueError(f"score {score!r} needs `loss_fn` and `data`; only 'random' and 'magnitude' work without them")
    meta = mask_meta(score=score, sparsity=sparsity, budget=budget, seed=seed, include=include, exclude=exclude,
                     num_selected=d, num_candidates=num_candidates, max_batches=max_batches)
    if score_options:
        meta["score_options"] = score_options
    if progress is None:
        import sys

        progress = sys.stderr.isatty()

    if d == num_candidates:  # everything is selected: no need to score (e.g. BitFit)
        indices = {n: torch.arange(p.numel()) for n, p in params.items()}
        return SparseMask(indices, shapes, meta)

    def compute() -> dict[str, torch.Tensor]:
        with scoring_mode(model, params.values()), torch.enable_grad():
            batches = itertools.islice(data, max_batches) if max_batches is not None and data is not None else data
            return spec.compute(model, params, loss_fn, batches, seed=seed, progress=progress, **score_options)

    if reuse_scores is not None and spec.needs_data:
        settings = {"score": score, "score_options": score_options, "candidates": list(params), "max_batches": max_batches}
        device = next(iter(params.values())).device
        scores = {n: t.to(device) for n, t in reuse_scores(settings, compute).items()}
    else:
        scores = compute()
    names = list(params)
    for name in names:
        if not bool(torch.isfinite(scores[name]).all()):
            raise FloatingPointError(
                f"the {score!r} score of parameter {name!r} has NaN or Inf entries; check the loss "
                "(e.g. run in fp32 or lower the learning rate that produced these weights)"
            )
    if budget == "global":
        chosen = top_k([scores[n] for n in names], d)
    elif budget == "per_row":
        embeddings = {n for n, module in owner_modules(model, names).items() if isinstance(module, nn.Embedding)}
        chosen = per_row_select([scores[n] for n in names], d, [n in embeddings for n in names])
    else:
        chosen = [top_k([scores[n]], k)[0] for n, k in zip(names, per_tensor_budget([params[n].numel() for n in names], d))]
    del scores
    logger.info("selected %d of %d entries (%s, %s budget)", d, num_candidates, score, budget)
    return SparseMask({n: idx.cpu() for n, idx in zip(names, chosen)}, shapes, meta)
