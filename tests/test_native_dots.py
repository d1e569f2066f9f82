"""The selected entries' gradient read in place from the output gradient and input (`native_dots`)."""

from __future__ import annotations

import copy
import os
import threading
import time

import pytest
import torch
from torch import nn

import saftune
from saftune.sparse import kernels, native_dots

pytestmark = pytest.mark.skipif(not native_dots.available(), reason="no C compiler to build the native loop")


def _entries(out_features: int, in_features: int, count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    flat = torch.randperm(out_features * in_features, generator=torch.Generator().manual_seed(seed))[:count].sort().values
    return flat // in_features, flat % in_features


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, 4, 13, 64])
def test_dots_are_the_exact_products_summed_in_fp32(dtype, tokens):
    # 5000 entries: two entry blocks of 4096; 1..64 tokens: fewer tokens than chunks, and leftovers of four.
    g = torch.Generator().manual_seed(tokens)
    dy, x = torch.randn(tokens, 96, generator=g).to(dtype), torch.randn(tokens, 80, generator=g).to(dtype)
    rows, cols = _entries(96, 80, 5000)
    products = dy.double()[:, rows] * x.double()[:, cols]  # exact: bf16 and fp32 products fit a double
    got = native_dots.dots(dy, x, rows, cols)
    assert got.dtype == torch.float32 and got.shape == (5000,)
    # fp32 sums of exact products: off by at most ~tokens rounding steps of the running sum
    bound = tokens * 2**-23 * products.abs().sum(0) + 1e-30
    assert ((got.double() - products.sum(0)).abs() <= bound).all()


def test_dots_do_not_depend_on_the_number_of_threads(monkeypatch):
    # 9000 entries: three entry blocks, twelve items; every call is split (no call is too small to share)
    monkeypatch.setattr(native_dots, "PRODUCTS_PER_THREAD", 1)
    dy, x = torch.randn(50, 160).bfloat16(), torch.randn(50, 96).bfloat16()
    rows, cols = _entries(160, 96, 9000)
    shared = []
    share = native_dots._share
    monkeypatch.setattr(native_dots, "_share", lambda *a: shared.append(a[3]) or share(*a))
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(native_dots.dots(dy, x, rows, cols))
    finally:
        torch.set_num_threads(previous)
    assert shared == [2, 3]  # one thread ran it alone, then two and three threads shared the items
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_small_calls_run_on_the_calling_thread_alone(monkeypatch):
    # 50 tokens x 300 entries: fewer products than PRODUCTS_PER_THREAD, so waking a pool thread would cost more
    shared = []
    monkeypatch.setattr(native_dots, "_share", lambda *a: shared.append(a))
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        dy, x = torch.randn(50, 64), torch.randn(50, 32)
        rows, cols = _entries(64, 32, 300)
        got = native_dots.dots(dy, x, rows, cols)
    finally:
        torch.set_num_threads(previous)
    assert shared == []
    torch.testing.assert_close(got, (dy.T @ x)[rows, cols], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dots_read_a_transposed_view_as_they_read_the_row_major_input(dtype):
    dy, x = torch.randn(20, 16).to(dtype), torch.randn(20, 12).to(dtype)
    rows, cols = _entries(16, 12, 40)
    columns_first = x.t().contiguous().t()  # what a saved [in, N] copy of the columns looks like through .t()
    assert not columns_first.is_contiguous()
    assert torch.equal(native_dots.dots(dy, columns_first, rows, cols), native_dots.dots(dy, x, rows, cols))


def test_no_entries_give_an_empty_gradient():
    got = native_dots.dots(torch.randn(4, 3), torch.randn(4, 2), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
    assert got.shape == (0,) and got.dtype == torch.float32


def _linear_grads(per_row: int, dtype, monkeypatch, autocast: bool = False) -> tuple[dict, list]:
    """The selected entries' gradients of a Linear(64, 8) with `per_row` entries in each row, through the
    kernel and through autograd's dense gradient, and the calls the kernel made to `native_dots.dots`."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 8)).to(dtype)
    flat = torch.cat([r * 64 + torch.randperm(64)[:per_row].sort().values for r in range(8)])
    mask = saftune.SparseMask({"0.weight": flat}, {"0.weight": (8, 64)})
    x = torch.randn(2, 9, 64, dtype=dtype)
    calls = []
    dots = native_dots.dots
    monkeypatch.setattr(native_dots, "dots", lambda *a: calls.append(a[0].shape) or dots(*a))
    grads = {}
    for engine in ("on", "off"):
        trained = copy.deepcopy(net)
        sm = saftune.sparsify(trained, mask, kernels=engine)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            trained(x).float().square().sum().backward()
        grads[engine] = next(v.grad for _, v in sm.named_trainable_parameters())
    return grads, calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_linear_kernel_reads_in_place_where_few_entries_share_a_row(monkeypatch, dtype):
    grads, calls = _linear_grads(2, dtype, monkeypatch)
    assert calls == [(18, 8)]  # the output gradient, as it lies: [tokens, out]
    if dtype == torch.float32:
        torch.testing.assert_close(grads["on"], grads["off"], rtol=1e-5, atol=1e-5)
    else:  # without the kernels the gradient is a bf16 product's, rounded; the kernel's sums exact products in fp32
        torch.testing.assert_close(grads["on"], grads["off"].float(), rtol=1e-2, atol=1e-2)


def test_the_linear_kernel_copies_where_many_entries_share_a_row(monkeypatch):
    grads, calls = _linear_grads(int(native_dots.MAX_ENTRIES_PER_ROW) + 1, torch.float32, monkeypatch)
    assert calls == []  # more than MAX_ENTRIES_PER_ROW per row read: the rows are copied once, sampled product
    torch.testing.assert_close(grads["on"], grads["off"], rtol=1e-5, atol=1e-5)


def test_under_autocast_the_kernel_reads_the_columns_the_forward_rounded(monkeypatch):
    # fp32 input, bf16 product: the forward saves the used columns rounded to bf16, which are read in place
    grads, calls = _linear_grads(2, torch.float32, monkeypatch, autocast=True)
    assert calls == [(18, 8)]
    torch.testing.assert_close(grads["on"], grads["off"], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_linear_kernel_gives_the_copies_path_gradient_up_to_the_order_of_additions(monkeypatch, dtype):
    both = {}
    for most in (native_dots.MAX_ENTRIES_PER_ROW, 0):  # 0: never in place
        monkeypatch.setattr(native_dots, "MAX_ENTRIES_PER_ROW", most)
        both[most], calls = _linear_grads(2, dtype, monkeypatch)
        assert bool(calls) == (most > 0)
    torch.testing.assert_close(both[native_dots.MAX_ENTRIES_PER_ROW]["on"], both[0]["on"], rtol=1e-6, atol=1e-6)


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """native_dots as in a new process, with an empty cache: the next call builds (or fails to build) the library."""
    monkeypatch.setenv("SAFTUNE_HOME", str(tmp_path))
    monkeypatch.setattr(native_dots, "_library", None)
    monkeypatch.setattr(native_dots, "_unavailable", None)
    return tmp_path


def test_the_library_is_built_once_into_the_cache_and_reused(fresh_build, monkeypatch):
    assert native_dots.available()
    built = list((fresh_build / "native").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # the library alone: no temporary file left behind
    monkeypatch.setattr(native_dots, "_library", None)
    monkeypatch.setattr(native_dots.subprocess, "run", lambda *a, **k: pytest.fail("rebuilt a cached library"))
    assert native_dots.available()


def test_without_a_compiler_the_copies_path_runs_after_one_warning(fresh_build, monkeypatch, caplog):
    monkeypatch.setenv("CC", str(fresh_build / "no-such-compiler"))
    with caplog.at_level("WARNING", logger=native_dots.__name__):
        assert not native_dots.available() and not native_dots.wanted(1, 100)
        grads, calls = _linear_grads(2, torch.float32, monkeypatch)
    assert calls == []
    torch.testing.assert_close(grads["on"], grads["off"], rtol=1e-5, atol=1e-5)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "install gcc" in warnings[0].lower() and "no-such-compiler" in warnings[0]
    with pytest.raises(RuntimeError, match="not available here"):
        native_dots.dots(torch.randn(2, 2), torch.randn(2, 2), torch.tensor([0]), torch.tensor([1]))


def test_a_compiler_error_is_reported_and_leaves_no_library(fresh_build, monkeypatch, caplog):
    broken = fresh_build / "broken.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(native_dots, "SOURCE", broken)
    with caplog.at_level("WARNING", logger=native_dots.__name__):
        assert not native_dots.available()
    assert "error" in caplog.records[0].getMessage()  # the compiler's own message, for the user to act on
    assert list((fresh_build / "native").iterdir()) == []


def test_dots_refuse_mixed_or_other_dtypes():
    rows = torch.tensor([0])
    with pytest.raises(TypeError, match="two bf16 or two fp32"):
        native_dots.dots(torch.randn(2, 2), torch.randn(2, 2).bfloat16(), rows, rows)
    with pytest.raises(TypeError, match="two bf16 or two fp32"):
        native_dots.dots(torch.randn(2, 2).double(), torch.randn(2, 2).double(), rows, rows)


def _threads_sharing(items: int = 8) -> set[int]:
    """The threads that ran `native_dots._share`'s items, each item taking 20 ms (time for a pool thread to wake)."""
    ran = []

    def run(item, end):
        ran.append(threading.get_ident())
        time.sleep(0.02)

    native_dots._share(run, (), items, 2)
    return set(ran)


def test_two_threads_share_the_items():
    assert len(_threads_sharing()) == 2


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX-only")
def test_a_forked_child_shares_the_items_with_threads_of_its_own():
    assert len(_threads_sharing()) == 2  # the parent's pool now has a thread, which a forked child lacks
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        os._exit(0 if len(_threads_sharing()) == 2 else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_dots_in_place_declines_other_devices_dtypes_and_crowded_rows():
    s = kernels.LinearSelection.from_indices(torch.tensor([3, 9, 10]), (3, 4))
    g, x = torch.randn(5, 3), torch.randn(5, 4)
    assert kernels.dots_in_place(g, x, torch.float32, *s.tensors()[:4], columns_saved=False) is not None
    assert kernels.dots_in_place(g.double(), x.double(), torch.float64, *s.tensors()[:4], columns_saved=False) is None
    assert kernels.dots_in_place(g, x.bfloat16(), torch.bfloat16, *s.tensors()[:4], columns_saved=False) is None
    crowded = kernels.LinearSelection.from_indices(torch.arange(4), (3, 4))  # four entries in one row
    assert kernels.dots_in_place(g, x, torch.float32, *crowded.tensors()[:4], columns_saved=False) is None


def test_a_gradient_too_large_for_any_cache_is_read_in_place_with_more_entries_a_row():
    rows = 1000
    assert native_dots.wanted(int(native_dots.MAX_ENTRIES_PER_ROW * rows), rows)
    assert not native_dots.wanted(4 * rows, rows)  # the copies win at 4.1 a row where the gradient is cached ...
    assert native_dots.wanted(4 * rows, rows, native_dots.UNCACHED_BYTES)  # ... and lose for a vocabulary's
    assert not native_dots.wanted(6 * rows, rows, native_dots.UNCACHED_BYTES)
