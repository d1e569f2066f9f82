"""Gradients of selected weight entries without the dense weight gradient.

For y = x W^T + b, dL/dW[r, c] = sum_n dy[n, r] * x[n, c]: a dot product over the N rows of the batch
for each selected (r, c). At density 1e-3 this is ~1000x fewer multiply-adds than the dense x^T dy, and
it needs no dense out x in gradient. On the CPU, where few entries share a row, the d dot products read
dy and x where they lie (`native_dots`, a compiled loop over the tokens: no copies). Elsewhere only the
rows of dy and the columns of x that some selected entry uses take part: the forward saves x[:, unique_cols]
(transposed, so each column is one contiguous vector) instead of the whole input, and the backward gathers
dy[:, unique_rows] the same way. The dot products then run as one sampled dense-dense product
(`torch.sparse.sampled_addmm`: a vectorised C++ loop over the selected entries on the CPU, cuSPARSE's
SDDMM on CUDA; nothing materialised), or as chunked gather-multiply-sum elsewhere (other devices,
`torch.compile`).

For an embedding, dL/dE[r, c] = sum of dy[n, c] over positions n whose token is r: the output gradients
are summed per distinct selected token present in the batch (O(N * dim), however many rows the mask
touches), and each selected entry reads its row's sum (zero when its token is absent).

These autograd functions take the (frozen) weight for the forward and the trainable `values` vector
as an extra input, so autograd delivers the selected entries' gradient straight into `values.grad`.
`LinearRoute` ties one sparsely trained weight to its `values` and `LinearSelection`: it is the
forward that `nn.Linear` and `nn.MultiheadAttention`'s projections both call.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from saftune.sparse import native_dots
from saftune.sparse.backward_cache import BackwardCache
from saftune.sparse.replay import input_replay, recomputed

# Upper bound on the temporary [chunk, N] products of the chunked gathered dot products (elements), on the
# CPU (where the chunks should stay in cache) and on other devices (where each chunk costs five kernel
# launches: on an H200, 64M-element chunks made a 6.55B model's SAFT step 1.5-2x faster than 4M ones).
_CHUNK_ELEMENTS = 1 << 22
_DEVICE_CHUNK_ELEMENTS = 1 << 26
# How the dot products run on CUDA: "sddmm" (torch's sampled_addmm: cuSPARSE's sampled dense-dense product,
# fp32/fp64), "gather" (chunked gather-multiply-sum, as on other devices) or "dense" (the used rows' and
# columns' whole product in TF32, the entries picked from it: exact only for inputs widened from bf16).
# Measured side by side by benchmarks/device_dots.py on an H200: sddmm fastest or level at every size.
_DEVICE_DOTS = "sddmm"
# bf16 inputs up to this size are transposed whole before their used columns are gathered (see `_columns`).
_TRANSPOSE_FIRST_BYTES = 5 << 20
# An output gradient's used rows (transposed, in fp32) above this many elements are copied in blocks of
# _ROW_BLOCK_ELEMENTS (see `selected_dots`): a vocabulary projection's whole copy would be [vocab, tokens],
# 96 MiB at 512 tokens. There 4 MiB blocks also run 1.4-2x faster than one copy, while at 4M elements (out
# 8192) one copy is up to 1.5x faster than four blocks (benchmarks/column_copies.py --parts blocks).
_BLOCKS_ABOVE_ELEMENTS = 1 << 22
_ROW_BLOCK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class LinearSelection:
    """Where the selected entries of one [out, in] weight are, in the form the kernel uses them.

    Entry k (in sorted flat-index order) is (unique_rows[row_slot[k]], unique_cols[col_slot[k]]);
    `crow` is the CSR row pointer of the [len(unique_rows), len(unique_cols)] pattern of the entries
    (sorted flat indices are sorted by row then column, so CSR order is the entries' own order).
    """

    unique_rows: torch.Tensor
    row_slot: torch.Tensor
    unique_cols: torch.Tensor
    col_slot: torch.Tensor
    crow: torch.Tensor
    # Save x[:, unique_cols] in the forward (a copy) rather than a reference to x: when at most half the
    # columns are used, this keeps less activation memory alive; when all are read, x itself is cheaper.
    save_columns: bool

    @classmethod
    def from_indices(cls, indices: torch.Tensor, shape: tuple[int, int]) -> LinearSelection:
        """Build from sorted flat indices into a weight of `shape` ([out, in])."""
        out_features, in_features = shape
        rows, cols = indices // in_features, indices % in_features
        unique_rows, row_slot = _used(rows, out_features)
        unique_cols, col_slot = _used(cols, in_features)
        crow = torch.zeros(unique_rows.numel() + 1, dtype=torch.int64, device=indices.device)
        crow[1:] = torch.bincount(row_slot, minlength=unique_rows.numel()).cumsum(0)
        return cls(unique_rows, row_slot, unique_cols, col_slot, crow, unique_cols.numel() < in_features)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.unique_rows, self.row_slot, self.unique_cols, self.col_slot, self.crow

    def columns(self, x2d: torch.Tensor) -> torch.Tensor:
        """x2d[:, unique_cols] transposed: the [len(unique_cols), N] part of an [N, in] input the kernel reads."""
        return _columns(x2d, self.unique_cols)


@functools.cache
def _quiet_csr_warning() -> None:
    """torch warns once per process that sparse CSR support is in beta: take that warning here, silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.sparse_csr_tensor(torch.zeros(1, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.zeros(0), (0, 0),
                                check_invariants=False)


def _sampled_addmm_ok(a: torch.Tensor) -> bool:
    on = a.device.type == "cpu" or (a.device.type == "cuda" and _DEVICE_DOTS == "sddmm")
    return on and a.dtype in (torch.float32, torch.float64) and not torch.compiler.is_compiling()


def sampled_dots(a: torch.Tensor, b: torch.Tensor, row_slot: torch.Tensor, col_slot: torch.Tensor, crow: torch.Tensor) -> torch.Tensor:
    """result[k] = a[row_slot[k]] . b[col_slot[k]] for the entries of a CSR pattern (`crow`, `col_slot`).

    Args:
        a: [R, N] contiguous; b: [C, N] contiguous (same dtype).
        row_slot, col_slot: int64 [d], in CSR order (row_slot sorted).
        crow: int64 [R + 1] CSR row pointer of row_slot.
    """
    d, n = row_slot.numel(), a.shape[1]
    if d == 0 or n == 0:
        return torch.zeros(d, dtype=a.dtype, device=a.device)
    if _sampled_addmm_ok(a):
        _quiet_csr_warning()
        pattern = torch.sparse_csr_tensor(crow, col_slot, torch.zeros(d, dtype=a.dtype, device=a.device),
                                          (a.shape[0], b.shape[0]), check_invariants=False)
        # sampled_addmm wants mat2 as [N, C]; b.t() is a view whose transpose is b itself: no copy.
        return torch.sparse.sampled_addmm(pattern, a, b.t(), beta=0.0).values()
    if a.device.type == "cuda" and _DEVICE_DOTS == "dense" and not torch.compiler.is_compiling():
        return _dense_dots(a, b, row_slot, col_slot)
    step = max(1, (_CHUNK_ELEMENTS if a.device.type == "cpu" else _DEVICE_CHUNK_ELEMENTS) // n)
    result = torch.empty(d, dtype=a.dtype, device=a.device)
    for start in range(0, d, step):
        r, c = row_slot[start : start + step], col_slot[start : start + step]
        result[start : start + step] = (a.index_select(0, r) * b.index_select(0, c)).sum(1)
    return result


def _dense_dots(a: torch.Tensor, b: torch.Tensor, row_slot: torch.Tensor, col_slot: torch.Tensor) -> torch.Tensor:
    """`sampled_dots` as one matrix product a @ b^T, the entries picked from it: tensor-core speed for a
    transient [R, C] fp32 block. TF32 rounds fp32 inputs to 10 mantissa bits: exact for values widened
    from bf16 (7 bits), an approximation for fp32 activations."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        product = torch.mm(a, b.t())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return product.view(-1).index_select(0, row_slot * b.shape[0] + col_slot)


def _used(coordinate: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the rows or columns the kernel reads, each entry's slot among them) for one weight dimension.

    When more than half of the dimension is used, all of it is read: transposing the whole activation
    is one copy, while gathering most of it costs a gather and then a copy of nearly the same size.
    """
    used, slot = torch.unique(coordinate, return_inverse=True)
    if 2 * used.numel() > size:
        return torch.arange(size, device=coordinate.device), coordinate
    return used, slot


def _columns(x2d: torch.Tensor, index: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x2d[:, index] transposed, as a contiguous [len(index), N] tensor in `dtype` (default x2d's); None: every column.

    Gathering the columns first and transposing the [N, len(index)] result is 2-4x faster than a gather
    from the transposed view; `LinearSelection` takes every column when more than half are used. The
    transpose and the change of dtype are one copy (bf16 activations become the fp32 the dots run in),
    except when the rows lie a multiple of 2 KiB apart: that strided copy then keeps hitting the same
    cache sets (1.5-2.2x slower at 512 x 1024..12288 in bf16, AVX-512 host), so those are transposed in their
    own dtype by torch's blocked transpose first and widened after. When some columns are left out, the
    fastest gather depends on the dtype (at 512 tokens, ~40% of the columns): fp32 columns are gathered
    by `index_select` (1.6-3.5x faster than transposing the whole input first, at every width); bf16
    inputs up to 5 MiB (width 4608) are transposed whole and whole rows gathered, and wider ones gathered
    by advanced indexing, whose kernel is vectorised for bf16 where `index_select` along dim 1 is not
    (1.3-1.5x faster than either other way at widths 8192..49152). All measured by
    `benchmarks/column_copies.py`.

    Example:
        >>> x = torch.arange(6.0).view(2, 3)
        >>> _columns(x, torch.tensor([0, 2]), torch.float64)
        tensor([[0., 3.],
                [2., 5.]], dtype=torch.float64)
    """
    dtype = dtype or x2d.dtype
    if index is not None and index.numel() != x2d.shape[1]:
        if x2d.element_size() >= 4:
            x2d = x2d.index_select(1, index)
        elif x2d.numel() * x2d.element_size() <= _TRANSPOSE_FIRST_BYTES:
            return x2d.t().contiguous().index_select(0, index).to(dtype)
        else:
            x2d = x2d[:, index]
    if dtype != x2d.dtype and (x2d.stride(0) * x2d.element_size()) % 2048 == 0:
        return x2d.t().contiguous().to(dtype)
    out = torch.empty(x2d.shape[1], x2d.shape[0], dtype=dtype, device=x2d.device)
    return out.copy_(x2d.t())


_last_copy = BackwardCache()  # the last copy `shared_copy` made: (source, its version then, index, dtype, the copy)


def shared_copy(source: torch.Tensor, index: torch.Tensor | None, dtype: torch.dtype,
                make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """`make()`, a copy of `source` (its `index` columns, in `dtype`), or the same copy made by the call before.

    A decoder layer's q, k and v projections read one input, and so do gate and up: their kernels would
    otherwise each make the same transposed copy of it, one after another. The previous copy is reused
    when it was made from the same memory, unchanged since (same version counter), with the same columns
    and dtype. It keeps one source and its copy alive until the next copy replaces them, or the backward pass
    that made them ends.

    Example:
        >>> x = torch.randn(4, 3)
        >>> cols = torch.arange(3)
        >>> first = shared_copy(x, cols, torch.float64, lambda: _columns(x, cols, torch.float64))
        >>> shared_copy(x.view(4, 3), cols.clone(), torch.float64, lambda: _columns(x, cols, torch.float64)) is first
        True
        >>> _ = x.add_(1)  # changed in place: copied again
        >>> shared_copy(x, cols, torch.float64, lambda: _columns(x, cols, torch.float64)) is first
        False
    """
    if torch.compiler.is_compiling():  # a compiled graph has no Python state to consult
        return make()
    entry = _last_copy.get()
    if entry is not None and _copied_from(entry, source, dtype) and _same_index(entry[2], index):
        return entry[4]
    copy = make()
    _last_copy.put((source, source._version, index, dtype, copy))
    return copy


def _copied_from(entry: tuple, source: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a `_last_copy` entry was copied to `dtype` from `source`'s memory, unchanged since (same version)."""
    old, version, _, old_dtype, _ = entry
    return (old.device == source.device and old.data_ptr() == source.data_ptr() and old.dtype == source.dtype
            and old.shape == source.shape and old.stride() == source.stride() and source._version == version
            and old_dtype == dtype)


def _same_index(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Whether two column indices (None: all columns) are equal. Off the CPU only the same tensor counts:
    comparing values there waits for the device, once per projection (`shared_copy`'s callers pass None
    for all columns, the common case, so nothing is lost there)."""
    if a is b:
        return True
    if a is None or b is None or a.shape != b.shape or a.device != b.device:
        return False
    return a.device.type == "cpu" and torch.equal(a, b)


def shared_columns(x2d: torch.Tensor, unique_cols: torch.Tensor, col_slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x2d's used columns (a `LinearSelection`'s `unique_cols`) transposed to fp32, and each selected entry's
    row in that copy (`col_slot`, or the entry's own column where the copy has every column).

    One copy serves every projection that reads x2d (`shared_copy`): q, k and v read one input, and so do
    gate and up. Their selected entries use different columns, so the first reader copies its own columns
    only; a second reader with other columns copies all of them, in place of the first's copy, and the rest
    read that: with 1e-3 of q, k and v selected, 0.24-0.64x the time of each copying its own columns at widths
    960..2048 (fp32 and bf16) and 576 (bf16); 1.18x at 576 in fp32, where gathers are cheap (`benchmarks/
    column_copies.py --parts shared`). A lone reader (o, down) gathers: cheaper than all columns in fp32.
    "Every column" is keyed as None: off the CPU `shared_copy` compares index tensors by identity only, and
    each projection has its own all-column index.

    Example:
        >>> x = torch.randn(4, 6)
        >>> q = LinearSelection.from_indices(torch.tensor([1, 8]), (3, 6))   # columns 1 and 2
        >>> k = LinearSelection.from_indices(torch.tensor([5]), (2, 6))      # column 5
        >>> shared_columns(x, q.unique_cols, q.col_slot)[0].shape   # q's two columns
        torch.Size([2, 4])
        >>> shared_columns(x, k.unique_cols, k.col_slot)[0].shape   # k reads another: all six copied
        torch.Size([6, 4])
        >>> shared_columns(x, q.unique_cols, q.col_slot)[1]   # q's entries now read rows 1 and 2 of that copy
        tensor([1, 2])
    """
    every = unique_cols.numel() == x2d.shape[1]  # `_used` then numbers the entries by their own column
    if not every and not torch.compiler.is_compiling():
        entry = _last_copy.get()
        # x2d copied before with other columns, or with every column (keyed None): every column, copied once
        if entry is not None and _copied_from(entry, x2d, torch.float32) and not _same_index(entry[2], unique_cols):
            copy = shared_copy(x2d, None, torch.float32, lambda: _columns(x2d, None, torch.float32))
            return copy, unique_cols.index_select(0, col_slot)
    copy = shared_copy(x2d, None if every else unique_cols, torch.float32,
                       lambda: _columns(x2d, unique_cols, torch.float32))
    return copy, col_slot


def gathered_weight_grad(grad_out: torch.Tensor, inputs: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Selected entries of grad_out^T @ inputs, in fp32.

    Args:
        grad_out: [N, out] output gradient.
        inputs: [N, in] layer input (as the forward used it).
        rows, cols: int64 [d] coordinates of the selected entries, sorted by (row, col).

    Example:
        >>> g, x = torch.randn(5, 3), torch.randn(5, 4)
        >>> r, c = torch.tensor([0, 2]), torch.tensor([3, 1])
        >>> torch.allclose(gathered_weight_grad(g, x, r, c), (g.T @ x)[r, c], atol=1e-6)
        True
    """
    selection = LinearSelection.from_indices(rows * inputs.shape[1] + cols, (grad_out.shape[1], inputs.shape[1]))
    return selected_weight_grad(grad_out, selection.columns(inputs), selection)


def selected_weight_grad(grad_out: torch.Tensor, x_columns: torch.Tensor, selection: LinearSelection) -> torch.Tensor:
    """The selected entries of grad_out^T @ x in fp32, given x_columns = `selection.columns(x)`.

    Args:
        grad_out: [N, out] output gradient.
        x_columns: [len(selection.unique_cols), N], the used input columns (transposed).
        selection: the selected entries' `LinearSelection`.
    """
    s = selection
    return selected_dots(grad_out, x_columns.float(), s.unique_rows, s.row_slot, s.col_slot, s.crow)


def selected_dots(grad_2d: torch.Tensor, x_columns: torch.Tensor, unique_rows: torch.Tensor, row_slot: torch.Tensor,
                  col_slot: torch.Tensor, crow: torch.Tensor) -> torch.Tensor:
    """`sampled_dots` of grad_2d's used rows (`unique_rows`, transposed to fp32) with `x_columns`.

    Many used rows are copied a block at a time, `_ROW_BLOCK_ELEMENTS` elements each: a vocabulary
    projection's output gradient is [tokens, vocab], and its whole transposed fp32 copy would come on top of
    the logits, their fp32 copy and their gradient at the step's peak. Entries are sorted by row, so a
    block of rows is one range of entries, read off `crow` (one host read per step for the large projections
    only; small ones take one block).

    Example:
        >>> g, x = torch.randn(5, 3), torch.randn(5, 4)
        >>> s = LinearSelection.from_indices(torch.tensor([3, 9, 10]), (3, 4))  # (0, 3), (2, 1), (2, 2)
        >>> dots = selected_dots(g, s.columns(x), s.unique_rows, s.row_slot, s.col_slot, s.crow)
        >>> torch.allclose(dots, (g.T @ x)[[0, 2, 2], [3, 1, 2]], atol=1e-6)
        True
    """
    rows, n = unique_rows.numel(), grad_2d.shape[0]
    step = max(1, _ROW_BLOCK_ELEMENTS // max(n, 1))
    if rows * n <= _BLOCKS_ABOVE_ELEMENTS or rows <= step:
        return sampled_dots(_columns(grad_2d, unique_rows, torch.float32), x_columns, row_slot, col_slot, crow)
    every = rows == grad_2d.shape[1]  # `_used` then reads all rows: block r0:r1 is columns r0:r1 of grad_2d
    starts = list(range(0, rows, step)) + [rows]
    bounds = crow[starts].tolist()
    result = torch.empty(row_slot.numel(), dtype=torch.float32, device=grad_2d.device)
    for r0, r1, e0, e1 in zip(starts, starts[1:], bounds, bounds[1:]):
        if e0 == e1:
            continue
        block = _columns(grad_2d[:, r0:r1], None, torch.float32) if every else \
            _columns(grad_2d, unique_rows[r0:r1], torch.float32)
        result[e0:e1] = sampled_dots(block, x_columns, row_slot[e0:e1] - r0, col_slot[e0:e1], crow[r0 : r1 + 1] - e0)
    return result


class SparseLinearFunction(torch.autograd.Function):
    """y = F.linear(x, weight, bias), with d(loss)/d(values) = selected entries of dW.

    Call it only when a gradient is wanted (grad mode on, `values` requiring grad); otherwise F.linear
    does the same forward without saving anything.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, values, unique_rows, row_slot, unique_cols, col_slot, crow, save_columns, replay=None):
        out = F.linear(x, weight, bias)  # under autocast this runs in the autocast dtype
        x2d = x.reshape(-1, x.shape[-1])
        ctx.replay = replay if ctx.needs_input_grad[3] else None
        if not ctx.needs_input_grad[3] or replay is not None:  # nothing, or recomputed in the backward (`replay`)
            saved = x2d.new_empty((0, x2d.shape[1]))  # not x2d[:0]: a view would keep all of x alive
        elif save_columns:  # the selected columns only, already in the dtype of the product
            saved = _columns(x2d, unique_cols, out.dtype)
        else:
            saved = x2d
        ctx.save_for_backward(saved, weight, unique_rows, row_slot, unique_cols, col_slot, crow)
        ctx.save_columns = save_columns and replay is None
        ctx.out_dtype = out.dtype
        ctx.x_dtype, ctx.x_shape = x.dtype, x.shape
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        saved, weight, unique_rows, row_slot, unique_cols, col_slot, crow = ctx.saved_tensors
        grad_x = grad_bias = grad_values = None
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[0]:  # one 2-D GEMM, as autograd does for F.linear (a 3-D matmul can turn into bmm)
            grad_x = grad_2d.mm(weight.to(grad_out.dtype)).view(*grad_out.shape[:-1], weight.shape[1]).to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_2d.sum(0).to(ctx.bias_dtype)
        if ctx.needs_input_grad[3]:
            if ctx.replay is not None:  # the input, recomputed bit for bit from what its producers saved
                saved = _replayed_input(ctx).reshape(-1, weight.shape[1])
            grad_values = dots_in_place(grad_2d, saved, ctx.out_dtype, unique_rows, row_slot, unique_cols, col_slot,
                                        columns_saved=ctx.save_columns)
            if grad_values is None:  # the used columns and rows copied to fp32, then the sampled product
                if ctx.save_columns:
                    x_cols = saved.float()
                elif saved.dtype == ctx.out_dtype:  # widening to fp32 is exact: one copy straight to the dots' dtype
                    x_cols, col_slot = shared_columns(saved, unique_cols, col_slot)
                else:  # under autocast: round to the product's dtype first, as the forward's product did
                    x_cols = _columns(saved, unique_cols, ctx.out_dtype).float()
                grad_values = selected_dots(grad_2d, x_cols, unique_rows, row_slot, col_slot, crow)
        return grad_x, None, grad_bias, grad_values, None, None, None, None, None, None, None


def dots_in_place(grad_2d: torch.Tensor, saved: torch.Tensor, dtype: torch.dtype, unique_rows: torch.Tensor,
                  row_slot: torch.Tensor, unique_cols: torch.Tensor, col_slot: torch.Tensor,
                  columns_saved: bool) -> torch.Tensor | None:
    """The selected entries' gradient computed by `native_dots` from grad_2d and the input where they lie, or
    None where the copies and sampled product should run instead.

    `native_dots` runs on the CPU when grad_2d and the input are both in the product's `dtype` (not under
    autocast, where the input must first be rounded as the forward rounded it) and few enough entries share
    each row read that copying the rows would cost more (`native_dots.wanted`). `saved` is the input [N, in],
    or, when `columns_saved`, its used columns transposed ([len(unique_cols), N], read through a view).

    Example:
        >>> g, x = torch.randn(5, 3), torch.randn(5, 4)
        >>> s = LinearSelection.from_indices(torch.tensor([3, 9, 10]), (3, 4))
        >>> got = dots_in_place(g, x, g.dtype, *s.tensors()[:4], columns_saved=False)
        >>> got is None or torch.allclose(got, (g.T @ x)[[0, 2, 2], [3, 1, 2]], atol=1e-6)
        True
    """
    gradient_bytes = grad_2d.numel() * grad_2d.element_size()
    if not (grad_2d.device.type == "cpu" and grad_2d.dtype == saved.dtype == dtype in (torch.bfloat16, torch.float32)
            and not torch.compiler.is_compiling()
            and native_dots.wanted(row_slot.numel(), unique_rows.numel(), gradient_bytes)):
        return None
    x, cols = (saved.t(), col_slot) if columns_saved else (saved, unique_cols.index_select(0, col_slot))
    return native_dots.dots(grad_2d, x, unique_rows.index_select(0, row_slot), cols)


def _replayed_input(ctx) -> torch.Tensor:
    """The forward's input, recomputed by `ctx.replay` (dropped after)."""
    try:
        return recomputed(ctx.replay, ctx.x_shape, ctx.x_dtype, "a sparsely trained layer's input")
    finally:
        ctx.replay = None


@dataclass
class LinearRoute:
    """One sparsely trained [out, in] weight (an nn.Linear's or an attention projection): its value vector and
    where its selected entries are. `sparsify` makes one per such weight; `apply` is the forward both use."""

    weight: torch.Tensor
    values: torch.Tensor  # the slot's value vector (sorted flat-index order)
    indices: torch.Tensor  # sorted flat indices into `weight`
    selection: LinearSelection
    # True while the model recomputes activations (gradient checkpointing): the forward's saved tensors are
    # then dropped and saved again by the recomputation, so a reference to x costs nothing lasting, and the
    # dropped pass skips gathering x's columns (the backward gathers them, widening to fp32 in one copy).
    checkpointing: Callable[[], bool] = lambda: False
    _blocks: dict = field(default_factory=dict)

    def apply(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """F.linear(x, weight, bias) with the selected entries' gradient sent to `values`.

        `weight` is the routed weight itself or a block of its rows (`in_proj_weight.split(...)`).
        """
        if weight is self.weight:
            values, selection = self.values, self.selection
        else:
            values, selection = self._block(weight)
        if self.checkpointing():  # x is dropped and recomputed with the block: keep the reference
            save_columns, replay = False, None
        else:  # recompute x from its producers' saved factors where it is such a product; else keep its columns
            replay = input_replay(x)
            save_columns = selection.save_columns and replay is None
        return SparseLinearFunction.apply(x, weight, bias, values, *selection.tensors(), save_columns, replay)

    def _block(self, view: torch.Tensor) -> tuple[torch.Tensor, LinearSelection]:
        """The values and selection of the rows of `self.weight` that `view` covers."""
        in_features = self.weight.shape[1]
        offset = view.storage_offset() - self.weight.storage_offset()
        first, rows = offset // in_features, view.shape[0]
        if offset % in_features or view.shape[1] != in_features or not view.is_contiguous():
            raise RuntimeError(f"saftune cannot route a {tuple(view.shape)} view of a {tuple(self.weight.shape)} projection; "
                               "sparsify with kernels='off'")
        if (first, rows) not in self._blocks:
            # Sorted flat indices: the entries of rows [first, first + rows) are one contiguous range.
            bounds = torch.tensor([first * in_features, (first + rows) * in_features], device=self.indices.device)
            start, stop = torch.searchsorted(self.indices, bounds).tolist()
            local = self.indices[start:stop] - first * in_features
            self._blocks[first, rows] = (start, stop, LinearSelection.from_indices(local, (rows, in_features)))
        start, stop, selection = self._blocks[first, rows]
        return self.values[start:stop], selection


class SparseEmbeddingFunction(torch.autograd.Function):
    """y = F.embedding(ids, weight, padding_idx), with d(loss)/d(values) = selected entries of dE."""

    @staticmethod
    def forward(ctx, ids, weight, values, unique_rows, row_slot, cols, padding_idx):
        ctx.save_for_backward(ids, unique_rows, row_slot, cols)
        ctx.padding_idx = padding_idx
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad_out):
        ids, unique_rows, row_slot, cols = ctx.saved_tensors
        if not ctx.needs_input_grad[2]:
            return None, None, None, None, None, None, None
        ids = ids.reshape(-1)
        result = torch.zeros(row_slot.numel(), dtype=torch.float32, device=grad_out.device)
        if ids.numel() == 0 or unique_rows.numel() == 0:
            return None, None, result, None, None, None, None
        grad_2d = grad_out.reshape(ids.numel(), -1)
        # Positions whose token is a selected row; their output gradients summed per distinct such token
        # (at most one row per position: O(N * dim) work and memory, whatever the number of selected rows).
        slot = torch.searchsorted(unique_rows, ids).clamp_max_(unique_rows.numel() - 1)
        hit = unique_rows[slot] == ids
        if ctx.padding_idx is not None:  # F.embedding gives the padding row no gradient
            hit &= ids != ctx.padding_idx
        present, position = torch.unique(slot[hit], return_inverse=True)
        if present.numel() == 0:
            return None, None, result, None, None, None, None
        summed = torch.zeros(present.numel(), grad_2d.shape[1], dtype=torch.float32, device=grad_out.device)
        summed.index_add_(0, position, grad_2d[hit].float())
        # Selected entries whose row occurred in the batch: look their row up among the present ones.
        where = torch.searchsorted(present, row_slot).clamp_max_(present.numel() - 1)
        found = present[where] == row_slot
        result[found] = summed[where[found], cols[found]]
        return None, None, result, None, None, None, None
