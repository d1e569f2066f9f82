"""The release of glibc's free heap pages after a checkpointed training forward pass."""

import ctypes
import os

import pytest
import torch
import torch.nn.functional as F

import saftune
from saftune.sparse import heap

glibc = pytest.mark.skipif(heap._malloc_trim() is None, reason="needs glibc's malloc_trim")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@glibc
def test_release_hands_back_freed_pages_that_glibc_keeps():
    # 64 touched 96 KiB blocks (under glibc's initial 128 KiB mmap threshold: heap), then a small block above
    # them: freeing the 64 leaves 6 MiB of free pages below the heap's top, which glibc keeps resident.
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(96 * 1024) for _ in range(64)]
    for block in blocks:
        ctypes.memset(block, 1, 96 * 1024)
    top = libc.malloc(96 * 1024)  # no free chunk of this size below: it comes from the top, and pins it
    ctypes.memset(top, 1, 96 * 1024)
    for block in blocks:
        libc.free(block)
    kept = _rss_mib()
    assert heap.release_free_heap() is True
    released = _rss_mib()
    libc.free(top)
    assert kept - released > 4, (kept, released)


def _llama(checkpointing: bool):
    from saftune.models.tiny_lm import tiny_causal_lm

    lm = tiny_causal_lm("llama", layers=2, seed=5)
    if checkpointing:
        lm.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return lm.train()


def _loss(lm, ids):  # the Hugging Face model itself, not the wrapper the mask was made on
    logits = lm.lm(input_ids=ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:])


@pytest.mark.parametrize("checkpointing, release_heap, train, grad, releases", [
    (True, True, True, True, 2),     # once per training forward pass
    (True, False, True, True, 0),    # turned off
    (False, True, True, True, 0),    # no checkpointing: the activations are still held
    (True, True, False, True, 0),    # eval mode: transformers does not checkpoint
    (True, True, True, False, 0),    # no grad: no backward pass follows
])
def test_the_engine_releases_once_per_checkpointed_training_forward(monkeypatch, checkpointing, release_heap, train, grad,
                                                                     releases):
    calls = []
    monkeypatch.setattr(heap, "release_free_heap", lambda: calls.append(1) or True)
    lm = _llama(checkpointing)
    mask = saftune.SparseMask({"lm.model.layers.0.mlp.down_proj.weight": torch.tensor([0, 7, 9])},
                              {"lm.model.layers.0.mlp.down_proj.weight": tuple(lm.lm.model.layers[0].mlp.down_proj.weight.shape)})
    sm = saftune.sparsify(lm, mask, release_heap=release_heap)
    lm.train(train)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        with torch.set_grad_enabled(grad):
            loss = _loss(lm, ids)
        if grad:
            loss.backward()
    assert len(calls) == releases
    sm.unsparsify()
    _loss(lm.train(), ids).backward()
    assert len(calls) == releases  # unsparsify removes the hook


def test_the_release_changes_no_gradient():
    grads = {}
    for release_heap in (True, False):
        lm = _llama(checkpointing=True)
        name = "lm.model.layers.1.self_attn.q_proj.weight"
        shape = tuple(dict(lm.named_parameters())[name].shape)
        sm = saftune.sparsify(lm, saftune.SparseMask({name: torch.arange(0, 40, 3)}, {name: shape}), release_heap=release_heap)
        _loss(lm, torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))).backward()
        grads[release_heap] = sm.trainable_parameters()[0].grad
    assert grads[True].abs().sum() > 0
    assert torch.equal(grads[True], grads[False])


def test_the_release_hooks_the_stack_even_when_it_is_the_model_given(monkeypatch):
    calls = []
    monkeypatch.setattr(heap, "release_free_heap", lambda: calls.append(1) or True)
    stack = _llama(checkpointing=True).lm.model  # the decoder stack itself, which transformers marks, as its layers
    name = "layers.0.mlp.up_proj.weight"
    saftune.sparsify(stack, saftune.SparseMask({name: torch.tensor([1, 2])}, {name: tuple(stack.layers[0].mlp.up_proj.weight.shape)}))
    stack(input_ids=torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))).last_hidden_state.sum().backward()
    assert len(calls) == 1  # the stack's hook, not its layers' (whose forward runs again in the backward pass)
