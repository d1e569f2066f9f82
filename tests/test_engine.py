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


@pytest.mark.parametrize("name", ["mlp", "bert", "t5", "clip"])
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
