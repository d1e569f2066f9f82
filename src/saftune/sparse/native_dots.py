"""Selected entries' gradients read straight from the output gradient and the input, with no copies (CPU).

dL/dW[r, c] = sum_n dy[n, r] * x[n, c] for each selected (r, c). `kernels.selected_dots` runs these as
torch's sampled dense-dense product, which wants the used rows of dy and columns of x transposed and in
fp32: two copies of the activations per projection. Where few entries share a row (at density 1e-3 on
Llama shapes, 1.3-2.4 per used row at widths 576..2048), those copies cost far more than the products
(7-10% of a SmolLM2-135M bf16 step). No torch op reads a row-major bf16 tensor and multiplies in fp32
without them, so this one loop is written here, in C (`native_dots.c`): it walks the tokens in order, and
for each reads dy's and x's row where they already lie, widens each bf16 value exactly (its bits are the
upper half of an fp32) and adds the exact product to an fp32 sum per entry. Nothing the size of an
activation is written.

Why C through ctypes and not a JIT: the loop is 30 lines, and the library gcc makes of it is a few KiB in
the process. numba, which ran it before, cost 63 MiB of RSS on import and ~60 MiB more (its LLVM) on the
first call: on a 113M-parameter model in bf16 that alone took SAFT's memory from 0.74x LoRA's to 0.82x.
The library is compiled on first use with gcc (or $CC) for this CPU and cached beside the assets
($SAFTUNE_HOME, default ~/.cache/saftune, in native/); without a compiler the copies and sampled product
run, as `available()` then says (with one warning).

Each entry's sum runs over the tokens in order within each of `TOKEN_CHUNKS` ranges, and the ranges'
sums are added in order: the same result on any number of threads. It differs from the sampled product's
only in the order of the additions (a few fp32 ulps). Threads: ctypes releases the GIL, so up to
`torch.get_num_threads()` Python threads take the work's items (an entry block over a token range) one at
a time, side by side; on one thread (saftune's grid workers), and for small calls, the caller's thread
does it all. No thread spins waiting for work.

Used by `kernels` for bf16 and fp32 inputs where `wanted` says the copies would cost more
(`benchmarks/column_copies.py --parts native` measures both).

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

import ctypes
import hashlib
import itertools
import logging
import os
import platform
import shlex
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from saftune.assets.cache import cache_dir

log = logging.getLogger(__name__)

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
# Handing a share to a pool thread costs ~40 us (waking it, the GIL): below this many products a thread,
# one thread does all (at 512 tokens, 331 entries ran as fast on one thread as on two, 884 ran 1.4x faster on two).
PRODUCTS_PER_THREAD = 1 << 17

SOURCE = Path(__file__).with_name("native_dots.c")
# -ffp-contract=off: fp32 products rounded before each addition on every host, with FMA or without (the
# same sums everywhere). -march=native: the library is built on, and cached for, this CPU.
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fPIC", "-shared",
         f"-DTOKEN_CHUNKS={TOKEN_CHUNKS}", f"-DENTRY_BLOCK={ENTRY_BLOCK}"]

_library: ctypes.CDLL | None = None
_unavailable: str | None = None  # why the library could not be built, once known
_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (process id, workers, pool)


def available() -> bool:
    """Whether the compiled loop can run here (built on first call; False, with one warning, if it cannot)."""
    return _load() is not None


def wanted(entries: int, rows_read: int, gradient_bytes: int = 0) -> bool:
    """Whether this loop beats copying `rows_read` rows of a `gradient_bytes` output gradient for `entries`
    products (never where the loop cannot be built, or MAX_ENTRIES_PER_ROW is set to 0).

    Example:
        >>> wanted(40, 10), wanted(40, 10, gradient_bytes=UNCACHED_BYTES) == available()
        (False, True)
    """
    most = MAX_ENTRIES_PER_ROW_UNCACHED if gradient_bytes >= UNCACHED_BYTES else MAX_ENTRIES_PER_ROW
    return MAX_ENTRIES_PER_ROW > 0 and entries <= most * max(rows_read, 1) and available()


def dots(grad_2d: torch.Tensor, x2d: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """result[k] = sum_n grad_2d[n, rows[k]] * x2d[n, cols[k]] in fp32, for bf16 or fp32 CPU tensors.

    Args:
        grad_2d: [N, out]; x2d: [N, in] (same dtype, any strides; row-major reads fastest).
        rows, cols: int64 [d], the entries' coordinates, sorted by row (each entry block then reads a
            narrow range of each gradient row).
    """
    library = _load()
    if library is None:
        raise RuntimeError(f"saftune's native dot products are not available here: {_unavailable}")
    if grad_2d.dtype != x2d.dtype or grad_2d.dtype not in (torch.bfloat16, torch.float32):
        raise TypeError(f"dots takes two bf16 or two fp32 tensors, got {grad_2d.dtype} and {x2d.dtype}")
    d = rows.numel()
    result = torch.empty(d, dtype=torch.float32)
    if d == 0:
        return result
    rows, cols = rows.to(torch.int64).contiguous(), cols.to(torch.int64).contiguous()
    partial = torch.empty(TOKEN_CHUNKS, d, dtype=torch.float32)
    run = library.saftune_dots_bf16 if grad_2d.dtype == torch.bfloat16 else library.saftune_dots_f32
    args = (grad_2d.data_ptr(), *grad_2d.stride(), x2d.data_ptr(), *x2d.stride(), grad_2d.shape[0],
            rows.data_ptr(), cols.data_ptr(), d, partial.data_ptr())
    items = -(-d // ENTRY_BLOCK) * TOKEN_CHUNKS
    threads = max(1, min(torch.get_num_threads(), items, d * grad_2d.shape[0] // PRODUCTS_PER_THREAD))
    if threads == 1:
        run(*args, 0, items)
    else:
        _share(run, args, items, threads)
    library.saftune_total(partial.data_ptr(), result.data_ptr(), d)
    return result


def _share(run, args: tuple, items: int, threads: int) -> None:
    """Items 0..items-1 run by this thread and `threads - 1` pool threads, each taking the next item left.

    Taken one at a time rather than split in advance: a pool thread wakes ~40 us after it is asked, and by
    then this thread has done the first items of a small call. This thread returns once every item is done,
    without waiting for a pool thread that found none left.
    """
    take, done = itertools.count().__next__, [0]
    finished = threading.Condition()

    def work() -> None:
        while (item := take()) < items:  # next() on a count is atomic under the GIL
            run(*args, item, item + 1)
            with finished:
                done[0] += 1
                finished.notify()

    pool = _workers(threads - 1)
    for _ in range(threads - 1):
        pool.submit(work)
    work()
    with finished:
        finished.wait_for(lambda: done[0] == items)


def _workers(count: int) -> ThreadPoolExecutor:
    """A pool of at least `count` threads, made again after a fork (a forked child has none of its threads)."""
    global _pool
    if _pool is None or _pool[0] != os.getpid() or _pool[1] < count:
        if _pool is not None and _pool[0] == os.getpid():  # replaced by a larger one: let its idle threads end
            _pool[2].shutdown(wait=False)
        _pool = (os.getpid(), count, ThreadPoolExecutor(max_workers=count, thread_name_prefix="saftune-dots"))
    return _pool[2]


def _load() -> ctypes.CDLL | None:
    """The compiled library, built into the cache on first use; None where it cannot be built."""
    global _library, _unavailable
    if _library is None and _unavailable is None:
        try:
            _library = _declare(ctypes.CDLL(str(_built())))
        except (OSError, subprocess.CalledProcessError) as error:
            detail = getattr(error, "stderr", None) or error
            _unavailable = f"{detail}".strip()[-800:]
            log.warning("saftune could not build its native dot products (%s); the sparse kernels copy the "
                        "activations instead, which is slower. Install gcc, or point $CC at a C compiler.",
                        _unavailable)
    return _library


def _built() -> Path:
    """Path of the library for this source, compiler, flags and CPU, compiled there if missing."""
    compiler = shlex.split(os.environ.get("CC") or "gcc")
    key = hashlib.sha256("\n".join([SOURCE.read_text(), *compiler, *FLAGS, platform.machine(), _cpu()]).encode())
    cache = cache_dir() / "native"
    target = cache / f"native_dots-{key.hexdigest()[:16]}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        # built under a temporary name and renamed: processes building at once each get a whole library
        handle, scratch = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(handle)
        try:
            subprocess.run([*compiler, *FLAGS, str(SOURCE), "-o", scratch], check=True, capture_output=True, text=True)
            os.replace(scratch, target)
        finally:
            if os.path.exists(scratch):
                os.remove(scratch)
    return target


def _cpu() -> str:
    """This CPU's instruction-set flags (the library is built with -march=native)."""
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.processor()


def _declare(library: ctypes.CDLL) -> ctypes.CDLL:
    """Argument types for the library's three functions (pointers as addresses, sizes as int64)."""
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    for name in ("saftune_dots_bf16", "saftune_dots_f32"):
        getattr(library, name).argtypes = [pointer, size, size, pointer, size, size, size, pointer, pointer, size,
                                           pointer, size, size]
        getattr(library, name).restype = None
    library.saftune_total.argtypes, library.saftune_total.restype = [pointer, pointer, size], None
    return library
