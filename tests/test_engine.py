"""Phase 2: only the masked entries train, exactly as a dense masked trainer would train them."""

import copy

import pytest
import torch
from torch import nn

import saftune
import tiny

MODELS = list(tiny.BUILDERS)


def _select(case, sparsity=0.05, score="grad"):
    return saftune.select_mask(case.model, case.loss_fn, case.batches, sparsity=sparsity, score=score)


def _train_sparse(case, mask, steps, lr=1e-3, clip=None, kernels="auto", optimizer=None):
    sm = saftune.sparsify(case.model, mask, kernels=kernels)
    opt = (optimizer or (lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=0.1)))(sm.trainable_parameters())
    for step in range(steps):
        batch = case.batches[step % len(case.batches)]
        opt.zero_grad()
        case.loss_fn(case.model, batch).mean().backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(sm.trainable_parameters(), clip)
        opt.step()
    return sm


def _train_naive(case, mask, steps, lr=1e-3, clip=None):
    """The published recipe: dense AdamW on masked gradients, then reset the unselected entries."""
    model = case.model
    pretrained = {n: p.detach().clone() for n, p in model.named_parameters()}
    keep = {n: mask.boolean(n) for n in pretrained}
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    for step in range(steps):
        batch = case.batches[step % len(case.batches)]
        opt.zero_grad()
        case.loss_fn(model, batch).mean().backward()
        for n, p in model.named_parameters():
            p.grad = torch.where(keep[n], p.grad, 0.0) if p.grad is not None else torch.zeros_like(p)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(torch.where(keep[n], p, pretrained[n]))
    return model


@pytest.mark.parametrize("name", MODELS)
def test_unselected_entries_stay_bit_identical_after_adamw(name):
    case = tiny.BUILDERS[name]()
    mask = _select(case)
    pretrained = {n: p.detach().clone() for n, p in case.model.named_parameters()}
    _train_sparse(case, mask, steps=20, lr=1e-2)
    changed = 0
    for n, p in case.model.named_parameters():
        frozen = ~mask.boolean(n)
        assert torch.equal(p.detach()[frozen], pretrained[n][frozen]), n
        changed += int((p.detach() != pretrained[n]).sum())
    assert changed > 0.9 * mask.num_selected  # the selected entries did train


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("clip", [None, 0.05])
def test_engine_matches_naive_dense_masked_adamw(name, clip):
    case = tiny.BUILDERS[name]()
    mask = _select(case)
    reference = tiny.Case(copy.deepcopy(case.model), case.loss_fn, case.batches)
    _train_sparse(case, mask, steps=20, clip=clip)
    _train_naive(reference, mask, steps=20, clip=clip)
    for (n, p), (_, q) in zip(case.model.named_parameters(), reference.model.named_parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), atol=2e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize("name", ["mlp", "mha", "bert", "t5", "clip"])
def test_gradient_kernels_equal_the_hook_path(name):
    """The Linear/Embedding kernels give the same values.grad as gathering the dense gradient."""
    grads = {}
    for kernels in ("on", "off"):
        case = tiny.BUILDERS[name]()
        sm = saftune.sparsify(case.model, _select(case, sparsity=0.02), kernels=kernels)
        case.loss_fn(case.model, case.batches[0]).mean().backward()
        grads[kernels] = {n: v.grad.clone() for n, v in sm.named_trainable_parameters()}
        paths = repr(sm)
    assert "hook=" in paths
    for n in grads["off"]:
        torch.testing.assert_close(grads["on"][n], grads["off"][n], atol=1e-6, rtol=1e-5, msg=n)


def test_no_dense_gradients_are_kept():
    case = tiny.bert()
    sm = saftune.sparsify(case.model, _select(case, sparsity=0.02), kernels="on")
    case.loss_fn(case.model, case.batches[0]).mean().backward()
    touched = set(sm.mask.indices)
    for n, p in case.model.named_parameters():
        assert p.grad is None, n  # hook paths free the dense gradient, kernel paths never form it
        if n not in touched:
            assert not p.requires_grad, n
    assert all(v.grad is not None for v in sm.trainable_parameters())


def test_gradient_accumulation_equals_one_big_batch():
    case = tiny.mlp()
    mask = _select(case, sparsity=0.1)
    x = torch.cat([b[0] for b in case.batches])
    y = torch.cat([b[1] for b in case.batches])
    sm = saftune.sparsify(case.model, mask)
    for b in case.batches:  # sum of per-example losses, batch by batch
        case.loss_fn(case.model, b).sum().backward()
    accumulated = [v.grad.clone() for v in sm.trainable_parameters()]
    for v in sm.trainable_parameters():
        v.grad = None
    case.loss_fn(case.model, (x, y)).sum().backward()
    for a, v in zip(accumulated, sm.trainable_parameters()):
        torch.testing.assert_close(a, v.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=False),
        lambda ps: torch.optim.Adagrad(ps, lr=0.1),
    ],
    ids=["sgd-momentum", "adamw-fused", "adamw-loop", "adagrad"],
)
def test_any_optimizer_updates_the_model_weights(make_optimizer):
    case = tiny.mlp()
    mask = _select(case, sparsity=0.1)
    sm = _train_sparse(case, mask, steps=3, optimizer=make_optimizer)
    for n, v in sm.named_trainable_parameters():
        weight = case.model.get_parameter(n)
        assert torch.equal(weight.detach().reshape(-1)[mask.indices[n]], v.detach())


def test_lr_scheduler_and_state_dict_round_trip():
    case = tiny.mlp()
    sm = saftune.sparsify(case.model, _select(case, sparsity=0.1))
    opt = torch.optim.AdamW(sm.trainable_parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)
    for b in case.batches:
        opt.zero_grad()
        case.loss_fn(case.model, b).mean().backward()
        opt.step()
        scheduler.step()
    state = sm.state_dict()
    out_before = case.model(case.batches[0][0])
    sm.reset()
    assert not torch.equal(case.model(case.batches[0][0]), out_before)
    sm.load_state_dict(state)
    assert torch.equal(case.model(case.batches[0][0]), out_before)


def test_bf16_model_keeps_fp32_master_values_and_frozen_entries():
    case = tiny.bert()
    mask = _select(case, sparsity=0.05)
    case.model.to(torch.bfloat16)
    pretrained = {n: p.detach().clone() for n, p in case.model.named_parameters()}
    sm = saftune.sparsify(case.model, mask)
    assert all(v.dtype == torch.float32 for v in sm.trainable_parameters())
    opt = torch.optim.AdamW(sm.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    for b in case.batches * 3:
        opt.zero_grad()
        case.loss_fn(case.model, b).float().mean().backward()
        opt.step()
    for n, p in case.model.named_parameters():
        assert p.dtype == torch.bfloat16
        assert torch.equal(p.detach()[~mask.boolean(n)], pretrained[n][~mask.boolean(n)]), n
    for n, v in sm.named_trainable_parameters():
        assert torch.equal(case.model.get_parameter(n).detach().reshape(-1)[mask.indices[n]], v.detach().bfloat16())


@pytest.mark.parametrize("name", ["mlp", "clip"])
def test_autocast_bf16_training_changes_only_the_mask(name):
    case = tiny.BUILDERS[name]()
    mask = _select(case)
    pretrained = {n: p.detach().clone() for n, p in case.model.named_parameters()}
    sm = saftune.sparsify(case.model, mask, kernels="on")
    opt = torch.optim.AdamW(sm.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for _ in range(10):
        for b in case.batches:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = case.loss_fn(case.model, b).float().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, p in case.model.named_parameters():
        assert p.dtype == torch.float32
        assert torch.equal(p.detach()[~mask.boolean(n)], pretrained[n][~mask.boolean(n)]), n


def test_unsparsify_restores_flags_and_keeps_trained_weights():
    case = tiny.mlp()
    flags = {n: p.requires_grad for n, p in case.model.named_parameters()}
    sm = _train_sparse(case, _select(case, sparsity=0.1), steps=3)
    trained = {n: p.detach().clone() for n, p in case.model.named_parameters()}
    model = sm.unsparsify()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(p, trained[n]) for n, p in model.named_parameters())
    assert "forward" not in model[0].__dict__ and "forward" not in model[4].__dict__


def test_sparsify_refuses_a_mask_of_another_model():
    mask = _select(tiny.mlp(), sparsity=0.1)
    with pytest.raises(ValueError, match="not in the model"):
        saftune.sparsify(tiny.bert().model, mask)
    wider = nn.Sequential(nn.Linear(6, 17), nn.ReLU(), nn.Linear(17, 16), nn.Tanh(), nn.Linear(16, 3))
    with pytest.raises(ValueError, match="does not match"):
        saftune.sparsify(wider, mask)


def test_torch_compile_trains_the_same_values():
    """torch.compile traces the sparse kernels; its updates match eager mode."""
    results = []
    for compile_model in (False, True):
        case = tiny.mlp()
        mask = _select(case, sparsity=0.1)
        sm = saftune.sparsify(case.model, mask, kernels="on")
        forward = torch.compile(case.model) if compile_model else case.model
        opt = torch.optim.AdamW(sm.trainable_parameters(), lr=1e-2, weight_decay=0.1)
        for step in range(4):
            x, y = case.batches[step % len(case.batches)]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(forward(x), y).backward()
            opt.step()
        results.append([p.detach().clone() for p in case.model.parameters()])
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- Linear kernel
def _linear_grads(linear: nn.Linear, idx: torch.Tensor, make_input, *, bias_selected=False, autocast=False, kernels="on"):
    """values.grad of the sparse engine vs the selected entries of the dense gradient, same input and loss."""
    out_f, in_f = linear.weight.shape
    indices = {"weight": idx}
    if bias_selected:
        indices["bias"] = torch.arange(0, out_f, 2)
    mask = saftune.SparseMask(indices, {"weight": (out_f, in_f), "bias": (out_f,)})
    dense = copy.deepcopy(linear)
    torch.manual_seed(1)
    x = make_input()
    upstream = None

    def run(module, x):
        nonlocal upstream
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = module(x)
        if upstream is None:
            upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
        (y.float() * upstream).sum().backward()

    x_dense = x.detach().clone().requires_grad_(x.requires_grad)
    run(dense, x_dense)
    sm = saftune.sparsify(linear, mask, kernels=kernels)
    x_sparse = x.detach().clone().requires_grad_(x.requires_grad)
    run(linear, x_sparse)
    got = dict(sm.named_trainable_parameters())
    expected = {"weight": dense.weight.grad.reshape(-1)[idx]}
    if bias_selected:
        expected["bias"] = dense.bias.grad[indices["bias"]]
    return sm, {n: v.grad for n, v in got.items()}, expected, (x_sparse.grad, x_dense.grad)


def _random_indices(shape, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randperm(shape[0] * shape[1], generator=g)[:d]).values


@pytest.mark.parametrize("d", [1, 7, 60, 300], ids=["one", "few-columns", "some", "most-columns"])
@pytest.mark.parametrize("leading", [(13,), (3, 5), (2, 3, 4)], ids=["2d", "3d", "4d"])
def test_linear_kernel_equals_dense_gradient(d, leading):
    """Saved-columns (few columns used) and saved-input (most used) paths, 2-D..4-D inputs, input grads."""
    torch.manual_seed(0)
    linear = nn.Linear(24, 20)
    idx = _random_indices((20, 24), d)
    sm, got, expected, (gx, gx_ref) = _linear_grads(linear, idx, lambda: torch.randn(*leading, 24, requires_grad=True))
    assert sm._slots[0].path == "linear"
    torch.testing.assert_close(got["weight"], expected["weight"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, gx_ref, atol=1e-6, rtol=1e-5)


def test_linear_kernel_with_selected_bias_and_frozen_input():
    torch.manual_seed(0)
    linear = nn.Linear(16, 12)
    idx = _random_indices((12, 16), 9)
    sm, got, expected, (gx, _) = _linear_grads(linear, idx, lambda: torch.randn(4, 7, 16), bias_selected=True)
    assert [s.path for s in sm._slots] == ["linear", "hook"]
    assert gx is None  # the input needs no gradient: none is computed
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], atol=1e-5, rtol=1e-5, msg=n)


def test_linear_kernel_under_bf16_autocast_matches_dense_autocast():
    torch.manual_seed(0)
    linear = nn.Linear(32, 24)
    idx = _random_indices((24, 32), 40)
    _, got, expected, _ = _linear_grads(linear, idx, lambda: torch.randn(6, 5, 32), autocast=True)
    assert got["weight"].dtype == torch.float32
    # the dense bf16 GEMM rounds its output to bf16; the kernel accumulates bf16 products in fp32
    torch.testing.assert_close(got["weight"], expected["weight"], atol=2e-2, rtol=1e-2)


def test_linear_kernel_on_bf16_weights():
    torch.manual_seed(0)
    linear = nn.Linear(32, 24).to(torch.bfloat16)
    idx = _random_indices((24, 32), 30)
    _, got, expected, _ = _linear_grads(linear, idx, lambda: torch.randn(6, 32, dtype=torch.bfloat16))
    assert got["weight"].dtype == torch.float32
    torch.testing.assert_close(got["weight"], expected["weight"].float(), atol=2e-2, rtol=1e-2)


def test_linear_kernel_chunked_fallback_equals_sampled_addmm(monkeypatch):
    """The gather-multiply-sum path (other devices, torch.compile) gives the same values, chunk by chunk."""
    from saftune.sparse import kernels

    torch.manual_seed(0)
    g, x = torch.randn(37, 20), torch.randn(37, 24)
    idx = _random_indices((20, 24), 150)
    rows, cols = idx // 24, idx % 24
    fast = kernels.gathered_weight_grad(g, x, rows, cols)
    monkeypatch.setattr(kernels, "_sampled_addmm_ok", lambda a: False)
    monkeypatch.setattr(kernels, "_CHUNK_ELEMENTS", 37 * 16)  # 16 entries per chunk
    slow = kernels.gathered_weight_grad(g, x, rows, cols)
    reference = (g.T @ x)[rows, cols]
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(slow, reference, atol=1e-5, rtol=1e-5)


def test_dot_products_route_by_device_and_dtype(monkeypatch):
    """sampled_addmm on the CPU and (as cuSPARSE's SDDMM) on CUDA in fp32/fp64; the chunked gather elsewhere."""
    from types import SimpleNamespace

    from saftune.sparse import kernels

    def on(device: str, dtype=torch.float32) -> bool:
        return kernels._sampled_addmm_ok(SimpleNamespace(device=torch.device(device), dtype=dtype))

    assert on("cpu") and on("cpu", torch.float64) and on("cuda") and on("cuda", torch.float64)
    assert not on("cuda", torch.bfloat16) and not on("meta") and not on("mps")
    monkeypatch.setattr(kernels, "_DEVICE_DOTS", "gather")
    assert on("cpu") and not on("cuda")


def test_dense_dot_products_pick_the_selected_entries_of_the_product():
    from saftune.sparse import kernels

    torch.manual_seed(0)
    a, b = torch.randn(6, 9), torch.randn(5, 9)
    rows, cols = torch.tensor([0, 0, 3, 5]), torch.tensor([4, 1, 0, 2])
    torch.testing.assert_close(kernels._dense_dots(a, b, rows, cols), (a @ b.T)[rows, cols])


def test_shared_copies_compare_index_values_only_on_the_cpu():
    """Off the CPU, comparing values would wait for the device once per projection: only the same tensor counts."""
    from saftune.sparse.kernels import _same_index

    index = torch.tensor([1, 4, 7])
    assert _same_index(None, None) and _same_index(index, index) and _same_index(index, index.clone())
    assert not _same_index(index, None) and not _same_index(index, torch.tensor([1, 4, 8]))
    on_meta = index.to("meta")
    assert _same_index(on_meta, on_meta) and not _same_index(on_meta, index.to("meta"))


def test_linear_kernel_empty_batch_gives_zero_gradient():
    linear = nn.Linear(8, 6)
    idx = torch.tensor([3, 10, 40])
    sm = saftune.sparsify(linear, saftune.SparseMask({"weight": idx}, {"weight": (6, 8)}), kernels="on")
    linear(torch.randn(0, 8)).sum().backward()
    assert torch.equal(sm.trainable_parameters()[0].grad, torch.zeros(3))


def test_linear_selection_reads_a_whole_dimension_when_most_of_it_is_used():
    """Gather the rows (columns) the entries use when at most half are; otherwise read them all, no gather."""
    from saftune.sparse.kernels import LinearSelection, selected_weight_grad

    idx = torch.tensor([0 * 10 + 1, 0 * 10 + 2, 1 * 10 + 1, 3 * 10 + 7])  # rows 0, 1, 3 of 4; columns 1, 2, 7 of 10
    s = LinearSelection.from_indices(idx, (4, 10))
    assert s.unique_rows.tolist() == [0, 1, 2, 3] and s.row_slot.tolist() == [0, 0, 1, 3]
    assert s.unique_cols.tolist() == [1, 2, 7] and s.col_slot.tolist() == [0, 1, 0, 2] and s.save_columns
    assert s.crow.tolist() == [0, 2, 3, 3, 4]
    g, x = torch.randn(9, 4), torch.randn(9, 10)
    got = selected_weight_grad(g, s.columns(x), s)
    torch.testing.assert_close(got, (g.T @ x).reshape(-1)[idx], atol=1e-6, rtol=1e-6)
    wide = LinearSelection.from_indices(torch.arange(0, 40, 3), (4, 10))  # 10 of 10 columns
    assert wide.unique_cols.tolist() == list(range(10)) and not wide.save_columns


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [40, 900], ids=["some-rows", "every-row"])
def test_linear_kernel_copies_the_output_gradient_block_by_block(monkeypatch, dtype, d):
    """A wide output (a vocabulary) is read a block of rows at a time, blocks without entries skipped: the
    same values as one block, through the autograd function too."""
    from saftune.sparse import kernels

    g = torch.Generator().manual_seed(0)
    grad, x = torch.randn(9, 100, generator=g).to(dtype), torch.randn(9, 16, generator=g).to(dtype)
    idx = _random_indices((100, 16), d)
    idx = idx[(idx // 16 < 30) | (idx // 16 >= 50)]  # rows 30..49 unused: whole blocks without entries
    s = kernels.LinearSelection.from_indices(idx, (100, 16))
    assert (s.unique_rows.numel() == 100) == (d == 900)
    whole = kernels.selected_dots(grad, s.columns(x).float(), s.unique_rows, s.row_slot, s.col_slot, s.crow)
    calls = []
    sampled_dots = kernels.sampled_dots
    monkeypatch.setattr(kernels, "sampled_dots", lambda *a: calls.append(a[0].shape[0]) or sampled_dots(*a))
    monkeypatch.setattr(kernels, "_ROW_BLOCK_ELEMENTS", 9 * 7)  # 7 rows a block
    monkeypatch.setattr(kernels, "_BLOCKS_ABOVE_ELEMENTS", 9 * 20)  # more than 20 rows: blocks
    blocked = kernels.selected_dots(grad, s.columns(x).float(), s.unique_rows, s.row_slot, s.col_slot, s.crow)
    read, used = s.unique_rows.tolist(), set((idx // 16).tolist())
    with_entries = [b for b in range(0, len(read), 7) if used & set(read[b : b + 7])]
    assert max(calls) == 7 and len(calls) == len(with_entries)
    if d == 900:  # every row is read, and the blocks of rows 30..49 have no entry: skipped
        assert len(with_entries) < -(-len(read) // 7)
    reference = (grad.float().T @ x.float())[idx // 16, idx % 16]
    torch.testing.assert_close(whole, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(blocked, reference, atol=1e-5, rtol=1e-5)
    linear = nn.Linear(16, 100).to(dtype)
    _, got, expected, _ = _linear_grads(linear, idx, lambda: torch.randn(3, 3, 16).to(dtype))
    torch.testing.assert_close(got["weight"], expected["weight"].float(), atol=2e-2 if dtype == torch.bfloat16 else 1e-5,
                               rtol=1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [24, 1024, 6000])  # 6000 x 512 bf16 passes the transpose-first size
def test_columns_copy_is_the_transposed_gather_whatever_the_way(dtype, width):
    """Every way `_columns` picks (index_select, transpose first, advanced indexing, all columns; with and
    without the two-copy widening) gives x[:, index].T exactly, in the asked dtype."""
    from saftune.sparse import kernels

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, width, generator=g).to(dtype)
    for index in (torch.sort(torch.randperm(width, generator=g)[: width // 3]).values, torch.arange(width)):
        for out_dtype in (torch.float32, dtype):
            got = kernels._columns(x, index, out_dtype)
            assert got.dtype == out_dtype and got.is_contiguous()
            assert torch.equal(got, x[:, index].t().to(out_dtype))


def test_linear_kernel_saves_only_the_used_columns():
    """With few columns in the mask, the backward keeps x[:, cols] alive, not the whole input."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 64, bias=False)
    idx = torch.tensor([5, 64 + 5, 3 * 64 + 9, 50 * 64 + 9])  # columns 5 and 9 only
    saftune.sparsify(linear, saftune.SparseMask({"weight": idx}, {"weight": (64, 64)}), kernels="on")
    x = torch.randn(32, 64)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = linear(x)
    activation = [t for t in saved if t.dtype.is_floating_point and t.data_ptr() != linear.weight.data_ptr()]
    assert sum(t.numel() for t in activation) == 2 * 32
    y.sum().backward()


def test_linear_kernel_saves_nothing_without_grad():
    linear = nn.Linear(8, 6)
    sm = saftune.sparsify(linear, saftune.SparseMask({"weight": torch.tensor([1, 2])}, {"weight": (6, 8)}), kernels="on")
    x = torch.randn(4, 8)
    with torch.no_grad():
        y = linear(x)
    assert y.grad_fn is None
    torch.testing.assert_close(y, x @ linear.weight.T + linear.bias)
    for v in sm.trainable_parameters():
        v.requires_grad_(False)
    assert linear(x).grad_fn is None  # frozen values: plain F.linear, nothing saved


def test_auto_kernels_follow_the_density_threshold():
    """kernels='auto' uses the sparse Linear kernel up to LINEAR_KERNEL_MAX_DENSITY, the dense hook above."""
    from saftune.sparse.engine import LINEAR_KERNEL_MAX_DENSITY

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 50), nn.Tanh(), nn.Linear(50, 40))
    low = max(1, int(LINEAR_KERNEL_MAX_DENSITY * 2000 * 0.5))
    high = min(2000, int(LINEAR_KERNEL_MAX_DENSITY * 2000 * 3) + 1)
    mask = saftune.SparseMask({"0.weight": _random_indices((50, 40), low), "2.weight": _random_indices((40, 50), high, seed=1)},
                              {"0.weight": (50, 40), "2.weight": (40, 50)})
    reference = copy.deepcopy(model)
    sm = saftune.sparsify(model, mask)
    assert [s.path for s in sm._slots] == ["linear", "hook"]
    x = torch.randn(9, 40)
    model(x).square().sum().backward()
    reference(x).square().sum().backward()
    for n, v in sm.named_trainable_parameters():
        torch.testing.assert_close(v.grad, reference.get_parameter(n).grad.reshape(-1)[mask.indices[n]], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- Embedding kernel
@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding_kernel_equals_dense_gradient(padding_idx):
    """Repeated tokens, the padding row, selected rows absent from the batch, unselected rows present."""
    torch.manual_seed(0)
    emb = nn.Embedding(20, 6, padding_idx=padding_idx)
    reference = copy.deepcopy(emb)
    idx = torch.tensor([0, 5, 6 * 3 + 1, 6 * 3 + 5, 6 * 7, 6 * 12 + 2, 6 * 19 + 5])  # rows 0, 3, 7, 12, 19
    sm = saftune.sparsify(emb, saftune.SparseMask({"weight": idx}, {"weight": (20, 6)}))
    assert sm._slots[0].path == "embedding"
    ids = torch.tensor([[3, 3, 0, 5], [7, 0, 3, 11]])  # 12 and 19 absent, 5 and 11 unselected
    upstream = torch.randn(2, 4, 6)
    (emb(ids) * upstream).sum().backward()
    (reference(ids) * upstream).sum().backward()
    torch.testing.assert_close(sm.trainable_parameters()[0].grad, reference.weight.grad.reshape(-1)[idx])
    assert sm.trainable_parameters()[0].grad[-2:].abs().sum() == 0


def test_embedding_kernel_on_a_batch_without_selected_tokens():
    emb = nn.Embedding(10, 4)
    sm = saftune.sparsify(emb, saftune.SparseMask({"weight": torch.tensor([8, 9])}, {"weight": (10, 4)}))
    emb(torch.tensor([[5, 6]])).sum().backward()
    assert torch.equal(sm.trainable_parameters()[0].grad, torch.zeros(2))
    emb(torch.zeros(0, 3, dtype=torch.long)).sum().backward()
    assert torch.equal(sm.trainable_parameters()[0].grad, torch.zeros(2))


def test_no_autograd_graph_below_the_lowest_selected_parameter():
    """Layers under the lowest trained tensor run without saving anything for backward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    saftune.sparsify(model, saftune.SparseMask({"4.weight": torch.tensor([0, 9])}, {"4.weight": (3, 8)}))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        hidden = model[:4](torch.randn(5, 8))
        assert not hidden.requires_grad and not saved
        model[4](hidden).sum().backward()
    assert saved  # only the top layer saved its (column of the) input


@pytest.mark.parametrize("name", MODELS)
def test_to_installs_every_route_again_and_trains_the_same(name):
    """`SparseModel.to` (how a model sparsified in host memory reaches its device: FSDP2 moves the shards,
    the engine its own tensors) takes the kernels and hooks down and installs them again; training after it
    is bit-identical to training without it, on every route (tied embeddings, attention, linear, hooks)."""
    case = tiny.BUILDERS[name]()
    mask = _select(case)
    twin = copy.deepcopy(case)
    plain = _train_sparse(case, mask, steps=5, lr=1e-2)

    moved = saftune.sparsify(twin.model, mask)
    routes = sorted(type(m).__name__ for m in moved._forwards), len(moved._handles)
    values = moved.trainable_parameters()
    assert moved.to("cpu") is moved
    assert (sorted(type(m).__name__ for m in moved._forwards), len(moved._handles)) == routes
    assert all(a is b for a, b in zip(moved.trainable_parameters(), values))  # an optimizer built before still holds them
    opt = torch.optim.AdamW(moved.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(5):
        opt.zero_grad()
        twin.loss_fn(twin.model, twin.batches[step % len(twin.batches)]).mean().backward()
        opt.step()
    for (n, a), b in zip(case.model.named_parameters(), twin.model.parameters()):
        assert torch.equal(a, b), n
    assert plain.num_trainable == moved.num_trainable


def _llama_case(dtype):
    """A tiny tied Llama (grouped-query attention: 4 query heads, 2 key/value heads) with gradient checkpointing."""
    import torch.nn.functional as F

    from saftune.models.tiny_lm import tiny_causal_lm

    lm = tiny_causal_lm("llama", layers=2, seed=5)
    lm.lm.to(dtype)
    lm.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.train()
    generator = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, 256, (2, 12), generator=generator) for _ in range(3)]

    def loss_fn(model, ids):
        logits = model.lm(input_ids=ids, use_cache=False).logits.float()
        return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(1)

    return tiny.Case(lm, loss_fn, batches)


def test_under_checkpointing_the_linear_kernel_keeps_its_input_without_it_recomputes_it(monkeypatch):
    # The forward's saved tensors are dropped and recomputed under checkpointing, so gathering the columns
    # (or finding a recipe for the input) there is wasted work: the kernel keeps a reference. Without
    # checkpointing every projection input of a Llama is recomputed from its producers' saved tensors.
    from saftune.sparse import kernels

    modes = []  # (save_columns, replayed) per projection
    apply = kernels.SparseLinearFunction.apply
    monkeypatch.setattr(kernels.SparseLinearFunction, "apply",
                        lambda *args: modes.append((args[-2], args[-1] is not None)) or apply(*args))
    case = _llama_case(torch.float32)
    mask = _select(case, sparsity=0.002, score="random")  # few entries: most layers read few input columns
    sm = saftune.sparsify(case.model, mask)
    grads = {}
    for checkpointing in (True, False):
        if not checkpointing:
            case.model.lm.gradient_checkpointing_disable()
        modes.clear()
        for values in sm.trainable_parameters():
            values.grad = None
        case.loss_fn(case.model, case.batches[0]).mean().backward()
        grads[checkpointing] = [v.grad.clone() for v in sm.trainable_parameters()]
        assert modes and all(mode == (False, not checkpointing) for mode in modes), modes
    for with_ckpt, without in zip(grads[True], grads[False]):
        torch.testing.assert_close(with_ckpt, without, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recomputed_inputs_give_bit_identical_gradients_and_are_not_kept(monkeypatch, dtype):
    """Every projection input of a Llama (the norms' outputs, SwiGLU's product, attention's output, the final
    norm's) is recomputed in the backward pass from what its producers saved: bit-identical gradients, and
    after the forward pass the engine keeps no input memory that the frozen model's own graph does not."""
    from torch.multiprocessing.reductions import StorageWeakRef

    from saftune.sparse import replay

    grads, alive = {}, {}
    for run in ("replayed", "kept", "frozen"):
        monkeypatch.setattr(replay, "REPLAY_INPUTS", run == "replayed")
        case = _llama_case(dtype)
        case.model.lm.gradient_checkpointing_disable()
        if run == "frozen":  # the limit: nothing trained, gradients flow to the activations only
            case.model.lm.requires_grad_(False)
            case.model.lm.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_())
        else:
            sm = saftune.sparsify(case.model, tiny.all_columns_mask(case.model))
        storages = []

        def note(module, args, storages=storages):
            storages.append(StorageWeakRef(args[0].untyped_storage()))

        hooks = [m.register_forward_pre_hook(note) for m in case.model.lm.modules() if isinstance(m, nn.Linear)]
        loss = case.loss_fn(case.model, case.batches[0]).mean()
        for hook in hooks:
            hook.remove()
        alive[run] = len({ref.cdata for ref in storages if not ref.expired()})  # distinct live storages
        loss.backward()
        if run != "frozen":
            grads[run] = {n: v.grad for n, v in sm.named_trainable_parameters()}
    layers = case.model.lm.config.num_hidden_layers
    # kept, the engine holds each layer's two norm outputs and its SwiGLU product on top
    assert alive["replayed"] == alive["frozen"] == alive["kept"] - 3 * layers
    for name, grad in grads["replayed"].items():
        assert torch.equal(grad, grads["kept"][name]), name


def test_inputs_are_kept_under_saved_tensor_hooks_and_a_released_producer_is_named():
    """Under saved_tensors_hooks (CPU offloading here) reading a producer's saved tensor would run the hooks:
    the input is kept instead. A producer whose saved tensors an earlier backward call released cannot be
    replayed: the error names the switch that keeps inputs instead."""
    from saftune.sparse import replay

    torch.manual_seed(0)
    linear = nn.Linear(8, 6, bias=False)
    saftune.sparsify(linear, saftune.SparseMask({"weight": torch.arange(0, 48, 5)}, {"weight": (6, 8)}), kernels="on")
    a, b = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    x = a * b
    assert replay.input_replay(x) is not None
    with torch.autograd.graph.save_on_cpu():
        assert replay.input_replay(a * b) is None
        linear(a * b).sum().backward()  # trains through the kept input
    y = linear(x)
    torch.autograd.grad(x.sum(), a)  # runs the product's backward: its saved factors are released
    with pytest.raises(RuntimeError, match="REPLAY_INPUTS = False"):
        y.sum().backward()


def test_a_recomputed_input_of_another_shape_is_refused(monkeypatch):
    """A recipe that does not reproduce what the forward read (shape or dtype) stops the backward with an error
    rather than training on the wrong values."""
    from saftune.sparse import replay

    linear = nn.Linear(8, 6, bias=False)
    saftune.sparsify(linear, saftune.SparseMask({"weight": torch.arange(0, 48, 5)}, {"weight": (6, 8)}), kernels="on")
    monkeypatch.setattr(replay, "_replay", lambda node, depth: lambda: torch.zeros(2, 8))
    a = torch.randn(4, 8, requires_grad=True)
    y = linear(a * 2.0 * a)
    with pytest.raises(RuntimeError, match=r"recomputed \(2, 8\).*the forward had \(4, 8\)"):
        y.sum().backward()


@pytest.mark.parametrize("checkpointing", [True, False])
def test_projections_reading_one_input_share_one_copy_of_its_columns(monkeypatch, copies_path, checkpointing):
    # q, k and v read one input, and so do gate and up: one fp32 copy of it serves each group's backward.
    from saftune.sparse import kernels

    calls, made = [], []
    shared_copy = kernels.shared_copy
    monkeypatch.setattr(kernels, "shared_copy", lambda source, index, dtype, make: calls.append(1) or shared_copy(
        source, index, dtype, lambda: made.append(1) or make()))
    grads = {}
    for engine in ("auto", "off"):
        case = _llama_case(torch.float32)
        if not checkpointing:
            case.model.lm.gradient_checkpointing_disable()
        sm = saftune.sparsify(case.model, tiny.all_columns_mask(case.model), kernels=engine)
        case.loss_fn(case.model, case.batches[0]).mean().backward()
        grads[engine] = {n: v.grad.clone() for n, v in sm.named_trainable_parameters()}
    layers = case.model.lm.config.num_hidden_layers
    assert len(calls) == 7 * layers  # one per projection ...
    assert len(made) == 4 * layers  # ... one copy per distinct input: q/k/v, o, gate/up, down
    for name, grad in grads["auto"].items():
        torch.testing.assert_close(grad, grads["off"][name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_projections_reading_different_columns_of_one_input_share_a_copy_of_every_column(monkeypatch, copies_path, dtype):
    # q reads columns 0-2, k 4-5, v 6: the first gathers its own, the second copies all 16 for itself and v.
    from saftune.sparse import kernels

    torch.manual_seed(0)
    net = nn.ModuleDict({"q": nn.Linear(16, 8), "k": nn.Linear(16, 4), "v": nn.Linear(16, 4)}).to(dtype)
    columns = {"q": [0, 1, 2, 1], "k": [4, 5], "v": [6]}  # entry (row i, columns[i])
    mask = saftune.SparseMask({f"{n}.weight": torch.tensor([i * 16 + c for i, c in enumerate(cs)]) for n, cs in columns.items()},
                              {f"{n}.weight": tuple(net[n].weight.shape) for n in columns})
    a, b = torch.randn(5, 16, dtype=dtype, requires_grad=True), torch.randn(5, 16, dtype=dtype, requires_grad=True)

    def gradients(names):
        trained = copy.deepcopy(net)
        sm = saftune.sparsify(trained, mask, kernels="on")
        x = a * b  # a product: recomputed in the backward, not saved
        sum(trained[n](x).float().square().sum() for n in names).backward()
        return {n: v.grad for n, v in sm.named_trainable_parameters() if v.grad is not None}

    made = []
    columns_of = kernels._columns
    monkeypatch.setattr(kernels, "_columns", lambda x2d, index, dtype=None: x2d.shape[1] == 16 and made.append(
        "every" if index is None else index.numel()) or columns_of(x2d, index, dtype))  # x's copies, not dy's
    together = gradients(["q", "k", "v"])
    assert sorted(made, key=str) == [1, "every"]  # v (first in the backward) gathers its one column, k copies all
    for name in columns:  # the same numbers as each projection reading its own gathered columns, bit for bit
        alone = gradients([name])
        assert torch.equal(together[f"{name}.weight"], alone[f"{name}.weight"])


@pytest.mark.parametrize("checkpointing", [True, False])
def test_shared_copies_and_recomputed_inputs_do_not_outlive_the_backward_pass(monkeypatch, copies_path, checkpointing):
    # Kept into the next step's forward, the last layer input (and its copy) would add to the forward's peak.
    from saftune.sparse import kernels, replay

    case = _llama_case(torch.float32)
    if not checkpointing:
        case.model.lm.gradient_checkpointing_disable()
    saftune.sparsify(case.model, tiny.all_columns_mask(case.model))
    kept = []
    for cache in (kernels._last_copy, replay._last_replay):
        put = cache.put
        monkeypatch.setattr(cache, "put", lambda entry, put=put, cache=cache: kept.append(cache) or put(entry))
    case.loss_fn(case.model, case.batches[0]).mean().backward()
    assert kernels._last_copy in kept and (replay._last_replay in kept) == (not checkpointing)
    assert kernels._last_copy.get() is None and replay._last_replay.get() is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_checkpointed_llama_trains_through_the_kernels_and_forms_no_dense_gradient(dtype):
    """q/k/v/o (narrow GQA k/v included) and gate/up/down take the Linear kernel, the tied embedding both
    kernels, RMSNorm the scale path; with checkpointing and (bf16) weights the gradients equal the hook path's."""
    grads = {}
    for kernels in ("auto", "off"):
        case = _llama_case(dtype)
        mask = _select(case, sparsity=0.03, score="random")  # entries in every tensor, k_proj's included
        sm = saftune.sparsify(case.model, mask, kernels=kernels)
        case.loss_fn(case.model, case.batches[0]).mean().backward()
        grads[kernels] = {n: v.grad.clone() for n, v in sm.named_trainable_parameters()}
        paths = {s.name: s.path for s in sm._slots}
        if kernels == "auto":
            assert all(p.grad is None for p in case.model.parameters())  # no dense weight gradient, none kept
            assert {paths[n] for n in paths if n.endswith("_proj.weight")} == {"linear"}
            assert any(n.endswith("k_proj.weight") for n in paths)  # the narrow GQA projection is among them
            assert paths["lm.model.embed_tokens.weight"] == "tied"
            assert {paths[n] for n in paths if "norm" in n} == {"scale"}
            # Recomputing, the Linear kernel saves a reference to its input (not its columns): read per forward.
            assert sm._recomputing()
            case.model.eval()
            assert not sm._recomputing()
            case.model.train()
            case.model.lm.gradient_checkpointing_disable()
            assert not sm._recomputing()
    tolerance = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-2)
    for n in grads["off"]:
        torch.testing.assert_close(grads["auto"][n], grads["off"][n], msg=n, **tolerance)
    # and training keeps every unselected entry bit-identical, the weights in their own dtype
    case = _llama_case(dtype)
    mask = _select(case, sparsity=0.02)
    pretrained = {n: p.detach().clone() for n, p in case.model.named_parameters()}
    _train_sparse(case, mask, steps=6, lr=1e-2)
    changed = 0
    for n, p in case.model.named_parameters():
        assert p.dtype == dtype
        assert torch.equal(p.detach()[~mask.boolean(n)], pretrained[n][~mask.boolean(n)]), n
        changed += int((p.detach() != pretrained[n]).sum())
    assert changed > 0.5 * mask.num_selected
