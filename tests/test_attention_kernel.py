"""nn.MultiheadAttention's projections on the sparse Linear kernel (`saftune.sparse.attention`)."""

import re

import pytest
import torch
from torch import nn

import saftune
from saftune.sparse import attention

E, HEADS = 16, 4


def _mask(mha: nn.MultiheadAttention, density: float = 0.04, seed: int = 0) -> saftune.SparseMask:
    """Random entries of every projection weight (and two of the in-projection bias, if any)."""
    g = torch.Generator().manual_seed(seed)
    params = dict(mha.named_parameters())
    indices = {}
    for name, p in params.items():
        if p.dim() == 2:
            indices[name] = torch.randperm(p.numel(), generator=g)[: max(1, int(density * p.numel()))]
    if "in_proj_bias" in params:
        indices["in_proj_bias"] = torch.tensor([1, 2 * E + 3])
    return saftune.SparseMask(indices, {n: tuple(p.shape) for n, p in params.items()})


def _run(make, call, kernels, *, train=True):
    """(output, attention weights, values.grad per tensor, repr) of one forward/backward."""
    torch.manual_seed(0)
    mha = make()
    mha.train(train)
    sm = saftune.sparsify(mha, _mask(mha), kernels=kernels)
    out, weights = call(mha)
    (out.square().sum() + (weights.sum() if weights is not None else 0)).backward()
    return out.detach(), weights, {n: v.grad.clone() for n, v in sm.named_trainable_parameters()}, repr(sm)


g = torch.Generator().manual_seed(1)
X, Y, Z = (torch.randn(3, 5, E, generator=g) for _ in range(3))  # [batch, seq, E] (or [seq, batch, E])
KV = torch.randn(3, 7, E, generator=g)
PADDING = torch.zeros(3, 5, dtype=torch.bool)
PADDING[0, -2:] = True
CAUSAL = torch.ones(5, 5, dtype=torch.bool).triu(1)  # True: may not attend

CASES = {
    "self, batch_first": (lambda: nn.MultiheadAttention(E, HEADS, batch_first=True), lambda m: m(X, X, X, need_weights=False)),
    "self, sequence first, weights": (lambda: nn.MultiheadAttention(E, HEADS), lambda m: m(X, X, X)),
    "self, masks": (lambda: nn.MultiheadAttention(E, HEADS, batch_first=True),
                    lambda m: m(X, X, X, key_padding_mask=PADDING, attn_mask=CAUSAL, average_attn_weights=False)),
    "self, causal": (lambda: nn.MultiheadAttention(E, HEADS, batch_first=True),
                     lambda m: m(X, X, X, attn_mask=CAUSAL, is_causal=True, need_weights=False)),
    "cross, key is value": (lambda: nn.MultiheadAttention(E, HEADS, batch_first=True), lambda m: m(X, KV, KV)),
    "q, k, v all different": (lambda: nn.MultiheadAttention(E, HEADS, batch_first=True), lambda m: m(X, Y, Z)),
    "kdim and vdim": (lambda: nn.MultiheadAttention(E, HEADS, batch_first=True, kdim=6, vdim=10),
                      lambda m: m(X, KV[..., :6].contiguous(), KV[..., 6:].contiguous())),
    "no bias": (lambda: nn.MultiheadAttention(E, HEADS, bias=False, batch_first=True), lambda m: m(X, X, X)),
    "bias_kv and zero attention": (lambda: nn.MultiheadAttention(E, HEADS, add_bias_kv=True, add_zero_attn=True), lambda m: m(X, X, X)),
}


@pytest.mark.parametrize("case", CASES)
def test_attention_kernel_matches_the_dense_gradient(case):
    make, call = CASES[case]
    out, weights, got, paths = _run(make, call, "on")
    ref_out, ref_weights, expected, _ = _run(make, call, "off")
    assert "attention=0" not in paths and re.search(r"hook=[01]\)", paths)  # the only hook: in_proj_bias, if any
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=1e-6)
    if weights is not None:
        torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=1e-6)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-5, msg=name)


def test_attention_output_is_the_unsparsified_modules():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, HEADS, batch_first=True).eval()
    routed_reference = mha(X, X, X)[0].detach()  # torch's slow path (the input-free fast path needs no grad)
    with torch.no_grad():
        fused_reference = mha(X, X, X)[0]  # torch's fused fast path
    saftune.sparsify(mha, _mask(mha))
    # grad on: routed (F.linear runs inside an autograd.Function, with grad mode off: same math, fp32 rounding)
    torch.testing.assert_close(mha(X, X, X)[0].detach(), routed_reference, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        assert torch.equal(mha(X, X, X)[0], fused_reference)  # no grad: torch's own forward, fast path included


def test_attention_kernel_forms_no_dense_weight_gradient():
    mha = nn.MultiheadAttention(E, HEADS, batch_first=True)
    sm = saftune.sparsify(mha, _mask(mha))
    mha(X, X, X)[0].sum().backward()
    assert "attention=2" in repr(sm)
    assert not mha.in_proj_weight.requires_grad and mha.in_proj_weight.grad is None
    assert not mha.out_proj.weight.requires_grad and mha.out_proj.weight.grad is None


def test_eval_mode_training_does_not_take_the_fused_fast_path():
    """In eval mode, with nothing requiring grad but the values, torch would run its fused kernel and skip
    the projections: the routed call turns the fast path off for that call only."""
    make, call = CASES["self, batch_first"]
    _, _, got, _ = _run(make, call, "on", train=False)
    _, _, expected, _ = _run(make, call, "off", train=False)
    for name in expected:
        assert got[name].abs().sum() > 0, name
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-5, msg=name)
    assert torch.backends.mha.get_fastpath_enabled()


def test_a_training_step_changes_only_the_selected_projection_entries():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, HEADS, batch_first=True)
    before = {n: p.detach().clone() for n, p in mha.named_parameters()}
    mask = _mask(mha)
    sm = saftune.sparsify(mha, mask)
    optimizer = torch.optim.SGD(sm.trainable_parameters(), lr=0.5)
    mha(X, Y, Z)[0].square().sum().backward()
    optimizer.step()
    for name, p in mha.named_parameters():
        changed = (p.detach() != before[name]).reshape(-1).nonzero().squeeze(1)
        selected = set(mask.indices.get(name, torch.tensor([], dtype=torch.int64)).tolist())
        assert set(changed.tolist()) <= selected, name
        if name.endswith("weight"):
            assert changed.numel() > 0.9 * len(selected), name


def test_unsparsify_gives_back_torchs_forward():
    mha = nn.MultiheadAttention(E, HEADS, batch_first=True)
    sm = saftune.sparsify(mha, _mask(mha))
    assert "forward" in mha.__dict__
    sm.unsparsify()
    assert "forward" not in mha.__dict__


def test_a_changed_torch_attention_fails_loudly(monkeypatch):
    """If torch stopped calling `linear` for the projections, the values would silently get no gradient."""
    mha = nn.MultiheadAttention(E, HEADS, batch_first=True)
    saftune.sparsify(mha, _mask(mha))
    monkeypatch.setattr(attention, "_ROUTED_FORWARD", nn.MultiheadAttention.forward)  # a forward that routes nothing
    with pytest.raises(RuntimeError, match="kernels='off'"):
        mha(X, X, X)


def test_the_routed_forward_is_torchs_own_code():
    assert attention._ROUTED_FORWARD.__code__ is nn.MultiheadAttention.forward.__code__
    assert attention._ROUTED_FORWARD.__globals__["F"].multi_head_attention_forward.__code__ is (
        torch.nn.functional.multi_head_attention_forward.__code__)


def test_dense_projections_stay_on_the_hook_path():
    mha = nn.MultiheadAttention(E, HEADS, batch_first=True)
    sm = saftune.sparsify(mha, _mask(mha, density=0.5))  # above LINEAR_KERNEL_MAX_DENSITY
    assert "attention=0" in repr(sm)


def test_training_mode_leaves_the_process_wide_fast_path_flag_alone(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.backends.mha, "set_fastpath_enabled", lambda value: calls.append(value))
    mha = nn.MultiheadAttention(E, HEADS, batch_first=True)
    saftune.sparsify(mha, _mask(mha))
    mha(X, X, X)[0].sum().backward()
    assert calls == []
    mha.eval()
    mha(X, X, X)[0].sum().backward()
    assert calls == [False, True]
