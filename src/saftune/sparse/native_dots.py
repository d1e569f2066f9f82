"""Selected entries' gradients read straight from the output gradient and the input, with no copies (CPU).

dL/dW[r, c] = sum_n dy[n, r] * x[n, c] for each selected (r, c). `kernels.selected_dots` runs these as
torch's sampled dense-dense product, which wants the used rows of dy and columns of x transposed and in
fp32: two copies of the activations per projection. Where few entries share a row (at density 1e-3 on
Llama shapes, 1.3-2.4 per used row at widths 576..2048), those copies cost far more than the products
(7-10% of a SmolLM2-135M bf16 step). No torch op reads a row-major bf16 tensor and multiplies in fp32
without them, so this one loop is written here, compiled by numba: it walks the tokens in order, and for
each reads dy's and x's row where they already lie, widens each bf16 value exactly (its bits are the upper
half of an fp32) and adds the exact product to an fp32 sum per entry. Nothing the size of an activation
is written.

Each entry's sum runs over the tokens in order within each of `TOKEN_CHUNKS` ranges, and the ranges'
sums are added in order: the same result on any number of threads. It differs from the sampled product's
only in the order of the additions (a few fp32 ulps).

Used by `kernels` on the CPU when numba is installed (it is a dependency; without it the sampled product
runs), for bf16 and fp32 inputs, where `wanted` says the copies would cost more (`benchmarks/
column_copies.py --parts native` measures both).

Example:
    >>> import torch
    >>> dy, x = torch.randn(6, 3).bfloat16(), torch.randn(6, 4).bfloat16()
    >>> rows, cols = torch.tensor([0, 2, 2]), torch.tensor([3, 1, 2])
    >>> if available():
    ...     got = dots(dy, x, rows, cols)
    ...     print(torch.allclose(got, (dy.float().T @ x.float())[rows, cols], atol=1e-5))
    ... else:
    ...     print(True)
    True
"""

from __future__ import annotations

import torch

try:
    import numba
    import numpy as np
    from llvmlite import ir
    from numba import njit, prange, types
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover - numba is a dependency; a platform without its wheels runs the fallback
    njit = None

# Token ranges summed separately (in parallel) and then added in order: fixed, so that results do not
# depend on the number of threads. Entries are processed ENTRY_BLOCK at a time: their sums stay in cache.
TOKEN_CHUNKS = 4
ENTRY_BLOCK = 4096
# The copies cost ~rows read x tokens, this loop ~entries x tokens: it wins up to about 3.5 entries per row
# read, and where the output gradient is too large for any cache (a vocabulary's: the copies then stream it
# from memory) up to at least 4.1 (`benchmarks/column_copies.py --parts native`, 512 tokens, bf16 and fp32:
# 0.25-0.95x the copies' time up to 3.07 per row; at 4.1, 1.1-1.4x for [4096, 4096] and [10944, 4096] bf16,
# 0.55-0.75x for a [49152, 4096] vocabulary).
MAX_ENTRIES_PER_ROW = 3.5
MAX_ENTRIES_PER_ROW_UNCACHED = 5.0
UNCACHED_BYTES = 32 << 20


def available() -> bool:
    """Whether numba is importable (the loop is then compiled on first use and cached on disk)."""
    return njit is not None


def wanted(entries: int, rows_read: int, gradient_bytes: int = 0) -> bool:
    """Whether this loop beats copying `rows_read` rows of a `gradient_bytes` output gradient for `entries`
    products (never where numba is missing, or MAX_ENTRIES_PER_ROW is set to 0).

    Example:
        >>> wanted(40, 10), wanted(40, 10, gradient_bytes=UNCACHED_BYTES) == available()
        (False, True)
    """
    most = MAX_ENTRIES_PER_ROW_UNCACHED if gradient_bytes >= UNCACHED_BYTES else MAX_ENTRIES_PER_ROW
    return available() and entries <= most * max(rows_read, 1) and MAX_ENTRIES_PER_ROW > 0


def dots(grad_2d: torch.Tensor, x2d: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """result[k] = sum_n grad_2d[n, rows[k]] * x2d[n, cols[k]] in fp32, for bf16 or fp32 CPU tensors.

    Args:
        grad_2d: [N, out]; x2d: [N, in] (same dtype, any strides; row-major reads fastest).
        rows, cols: int64 [d], the entries' coordinates, sorted by row (each entry block then reads a
            narrow range of each gradient row).
    """
    result = torch.empty(rows.numel(), dtype=torch.float32)
    if rows.numel() == 0:
        return result
    if grad_2d.dtype == torch.bfloat16:  # numpy has no bf16: hand over the bits
        grad_2d, x2d = grad_2d.view(torch.uint16), x2d.view(torch.uint16)
    arrays = grad_2d.numpy(), x2d.numpy(), rows.numpy(), cols.numpy(), result.numpy()
    # numba's threads are a pool of their own, as many as torch may use. On one thread (saftune's grid
    # workers, a DataLoader's) the serial loop runs: numba's OpenMP threads, once started, spin between
    # the many short parallel loops, and took a core from a one-thread worker beside another.
    threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    if threads <= 1:
        _dots_serial(*arrays)
    else:
        numba.set_num_threads(threads)
        _dots_parallel(*arrays)
    return result


if njit is not None:

    @intrinsic
    def _as_f32(typingctx, value):
        """A bf16 (its uint16 bits) or fp32 value as fp32: bf16 is the upper half of an fp32, so widening is a shift."""
        if value == types.uint16:
            def widen(context, builder, signature, args):
                bits = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
                return builder.bitcast(bits, ir.FloatType())
            return types.float32(value), widen
        if value == types.float32:
            return types.float32(value), lambda context, builder, signature, args: args[0]
        return None

    @njit(cache=True, nogil=True, boundscheck=False)
    def _item(dy, x, rows, cols, partial, item):  # pragma: no cover - compiled; tested through `dots`
        """One entry block's sums over one token range, into its row of `partial`."""
        n_tok, d = dy.shape[0], rows.shape[0]
        per = (n_tok + TOKEN_CHUNKS - 1) // TOKEN_CHUNKS
        block, chunk = item // TOKEN_CHUNKS, item % TOKEN_CHUNKS
        k0, k1 = block * ENTRY_BLOCK, min(d, (block + 1) * ENTRY_BLOCK)
        acc, r, q = partial[chunk, k0:k1], rows[k0:k1], cols[k0:k1]
        acc[:] = 0
        n, n1 = chunk * per, min(n_tok, (chunk + 1) * per)
        while n + 4 <= n1:  # four tokens a pass: each entry's indices and sum loaded once for four products
            d0, d1, d2, d3 = dy[n], dy[n + 1], dy[n + 2], dy[n + 3]
            x0, x1, x2, x3 = x[n], x[n + 1], x[n + 2], x[n + 3]
            for k in range(k1 - k0):
                i, j = r[k], q[k]
                s = acc[k]
                s += _as_f32(d0[i]) * _as_f32(x0[j])
                s += _as_f32(d1[i]) * _as_f32(x1[j])
                s += _as_f32(d2[i]) * _as_f32(x2[j])
                s += _as_f32(d3[i]) * _as_f32(x3[j])
                acc[k] = s
            n += 4
        for m in range(n, n1):
            dm, xm = dy[m], x[m]
            for k in range(k1 - k0):
                acc[k] += _as_f32(dm[r[k]]) * _as_f32(xm[q[k]])

    @njit(cache=True, nogil=True, boundscheck=False)
    def _total(partial, out, k):  # pragma: no cover - compiled
        s = partial[0, k]
        for chunk in range(1, TOKEN_CHUNKS):
            s += partial[chunk, k]
        out[k] = s

    # The same items and sums on numba's threads or on the caller's alone: the same numbers either way. Two
    # definitions (prange / range), not one compiled twice: numba's disk cache keys compiled code by function.
    @njit(parallel=True, cache=True, nogil=True, boundscheck=False)
    def _dots_parallel(dy, x, rows, cols, out):  # pragma: no cover - compiled
        d = rows.shape[0]
        partial = np.empty((TOKEN_CHUNKS, d), np.float32)
        for item in prange((d + ENTRY_BLOCK - 1) // ENTRY_BLOCK * TOKEN_CHUNKS):
            _item(dy, x, rows, cols, partial, item)
        for k in prange(d):
            _total(partial, out, k)

    @njit(cache=True, nogil=True, boundscheck=False)
    def _dots_serial(dy, x, rows, cols, out):  # pragma: no cover - compiled
        d = rows.shape[0]
        partial = np.empty((TOKEN_CHUNKS, d), np.float32)
        for item in range((d + ENTRY_BLOCK - 1) // ENTRY_BLOCK * TOKEN_CHUNKS):
            _item(dy, x, rows, cols, partial, item)
        for k in range(d):
            _total(partial, out, k)
