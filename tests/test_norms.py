"""The RMSNorm scale path: selected entries of a norm's weight trained without keeping its normalised input."""

from collections import Counter

import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import saftune
from saftune.sparse import engine, replay
from saftune.sparse.norms import routable
from test_engine import _llama_case, _select


class OnePlusScaleNorm(nn.Module):
    """Gemma's RMSNorm: the scale is (1 + weight), computed in fp32."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).type_as(x)


def test_only_norms_whose_forward_is_reproduced_bit_for_bit_are_routed():
    norm = LlamaRMSNorm(16)
    nn.init.normal_(norm.weight)
    assert routable(norm) and routable(norm.to(torch.bfloat16))
    assert not routable(OnePlusScaleNorm(16))  # another formula: the hook path
    assert not routable(nn.LayerNorm(16))  # two parameters
    hooked = LlamaRMSNorm(16)
    hooked.register_forward_hook(lambda module, args, out: out * 2)
    assert not routable(hooked)  # the probes would run a user's hook
    gemma = OnePlusScaleNorm(16)
    sm = saftune.sparsify(gemma, saftune.SparseMask({"weight": torch.tensor([1, 5])}, {"weight": (16,)}))
    assert "scale=0" in repr(sm) and "hook=1" in repr(sm)


def _saved_activations(loss: torch.Tensor, at_least: int) -> Counter:
    """Sizes of the distinct floating-point storages of at least `at_least` bytes that the autograd graph behind
    `loss` saves (the kernels' index tensors left out)."""
    sizes, stack, seen = {}, [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        saved = [getattr(node, name) for name in dir(node) if name.startswith("_saved_")]
        saved += list(getattr(node, "saved_tensors", ()))  # a custom Function's
        for tensor in saved:
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                sizes[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        stack += [child for child, _ in node.next_functions]
    return Counter(size for size in sizes.values() if size >= at_least)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_scales_recompute_their_input_bit_identical_and_save_what_the_frozen_model_saves(monkeypatch, dtype):
    """Every RMSNorm of a Llama with selected entries (two per layer and the final one) takes the scale path:
    the same gradients, bit for bit, as the hook path (autograd's own), the projections reading the norms'
    outputs still recompute them, and the graph saves the activations the frozen model's graph saves."""
    from saftune.sparse import kernels

    replayed = []
    apply = kernels.SparseLinearFunction.apply
    monkeypatch.setattr(kernels.SparseLinearFunction, "apply", lambda *args: replayed.append(args[-1] is not None) or apply(*args))
    grads, saved = {}, {}
    for run in ("scale", "hook", "frozen"):
        case = _llama_case(dtype)
        case.model.lm.gradient_checkpointing_disable()
        hidden = case.model.lm.config.hidden_size
        tokens = case.batches[0].numel()
        if run == "frozen":  # the limit: nothing trained, gradients flow to the activations only
            case.model.lm.requires_grad_(False)
            case.model.lm.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_())
        else:
            with monkeypatch.context() as patch:
                if run == "hook":
                    patch.setattr(engine, "routable", lambda module: False)
                sm = saftune.sparsify(case.model, _select(case, sparsity=0.03, score="random"))
            paths = {s.name: s.path for s in sm._slots}
            norms = [n for n in paths if "norm" in n]
            assert len(norms) == 2 * case.model.lm.config.num_hidden_layers + 1
            assert {paths[n] for n in norms} == {run}
        replayed.clear()
        loss = case.loss_fn(case.model, case.batches[0]).mean()
        saved[run] = _saved_activations(loss, at_least=tokens * hidden * dtype.itemsize)
        loss.backward()
        if run != "frozen":
            assert replayed and all(replayed)  # q/k/v and gate/up recompute the norms' outputs through the scale path
            grads[run] = {n: v.grad for n, v in sm.named_trainable_parameters()}
    assert saved["scale"] == saved["frozen"]
    # the hook path keeps each norm's normalised input: one [tokens, hidden] activation per norm on top
    assert sum(saved["hook"].values()) == sum(saved["frozen"].values()) + len(norms)
    for name, grad in grads["hook"].items():
        assert torch.equal(grads["scale"][name], grad), name


def test_a_norm_under_saved_tensor_hooks_keeps_its_input_and_a_wrong_recomputation_is_refused(monkeypatch):
    torch.manual_seed(0)
    norm, reference = LlamaRMSNorm(8), LlamaRMSNorm(8)
    nn.init.normal_(norm.weight)
    reference.load_state_dict(norm.state_dict())
    sm = saftune.sparsify(norm, saftune.SparseMask({"weight": torch.tensor([0, 3, 7])}, {"weight": (8,)}))
    assert "scale=1" in repr(sm)
    h = torch.randn(4, 8)
    with torch.autograd.graph.save_on_cpu():  # the normalised input is kept: the same gradient
        norm(h.requires_grad_()).pow(2).sum().backward()
    reference(h).pow(2).sum().backward()
    assert torch.equal(sm.trainable_parameters()[0].grad, reference.weight.grad[[0, 3, 7]])
    monkeypatch.setattr(replay, "_replay", lambda node, depth: lambda: torch.zeros(2, 8))
    with pytest.raises(RuntimeError, match=r"recomputed \(2, 8\).*normalised input.*REPLAY_INPUTS = False"):
        norm(h).sum().backward()
