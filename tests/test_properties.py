"""Property-based tests: mask selection and sparse-delta round trips, on inputs hypothesis chooses.

Already covered elsewhere and not repeated: the threshold search against a full sort with ties and
signed zeros (test_select.py::test_top_k_matches_a_full_sort) and mask save/load on random index sets
(test_mask.py::test_save_load_round_trip_property).
"""

import math
import tempfile
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import saftune
from saftune import SparseDelta, SparseMask
from saftune.sparse.select import selected_count

FAST = settings(max_examples=50, deadline=None)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit pattern: equal bits, unlike ==, tell -0.0 from 0.0."""
    return t.detach().contiguous().view(INT_VIEW[t.dtype])


def _module(tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A module holding `tensors` as parameters; dotted names go into nested submodules."""
    root = nn.Module()
    for name, t in tensors.items():
        *path, leaf = name.split(".")
        owner = root
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        owner.register_parameter(leaf, nn.Parameter(t.clone()))
    return root


NAMES = ["w", "block.0.weight", "block.0.bias", "head.weight"]
# Many repeated values (ties, signed zeros) as well as arbitrary ones.
VALUES = st.one_of(st.sampled_from([0.0, -0.0, 0.5, -0.5, 1.0, -2.0]), st.floats(-8, 8, width=32))


@st.composite
def tensors(draw, min_size=1):
    """Parameter name -> 1-D float32 tensor, in a fixed name order (the model's parameter order)."""
    chosen = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=len(NAMES), unique=True))
    chosen = [n for n in NAMES if n in chosen]
    return {n: torch.tensor(draw(st.lists(VALUES, min_size=min_size, max_size=12)), dtype=torch.float32)
            for n in chosen}


# -- mask selection ----------------------------------------------------------------------------------

@FAST
@given(numerator=st.integers(1, 10**6), exponent=st.integers(0, 9), total=st.integers(1, 10**9))
def test_selected_count_is_the_floor_of_the_written_decimal(numerator, exponent, total):
    sparsity = numerator / 10**exponent
    if sparsity > 1:
        with pytest.raises(ValueError, match=r"sparsity must be in \(0, 1\]"):
            selected_count(sparsity, total)
        return
    exact = Fraction(numerator, 10**exponent) * total  # the decimal as written, no binary rounding
    if exact < 1:
        with pytest.raises(ValueError, match="= 0 entries"):
            selected_count(sparsity, total)
    else:
        assert selected_count(sparsity, total) == math.floor(exact)


@FAST
@given(weights=tensors(), share=st.floats(0.01, 1.0), budget=st.sampled_from(["global", "per_tensor"]))
def test_a_mask_holds_exactly_the_top_scores_with_ties_to_the_lower_index(weights, share, budget):
    model = _module(weights)
    total = sum(t.numel() for t in weights.values())
    d = math.floor(Fraction(repr(share)) * total)
    if d < 1:
        return
    mask = saftune.select_mask(model, sparsity=share, score="magnitude", budget=budget)
    assert mask.num_selected == d and mask.num_candidates == total
    # The magnitude score is -|w|: the smallest weights rank first; equal scores go by (tensor, index).
    names = list(weights)
    quotas = ([d] if budget == "global" else saftune.sparse.select.per_tensor_budget([weights[n].numel() for n in names], d))
    groups = [names] if budget == "global" else [[n] for n in names]
    for group, k in zip(groups, quotas):
        ranked = sorted(((float(weights[n][i].abs()), g, i) for g, n in enumerate(group)
                         for i in range(weights[n].numel())))
        expected = {(group[g], i) for _, g, i in ranked[:k]}
        chosen = {(n, int(i)) for n in group for i in mask.indices.get(n, torch.empty(0, dtype=torch.long))}
        assert chosen == expected


@FAST
@given(weights=tensors(min_size=2), seed=st.integers(0, 2**16))
def test_the_same_input_gives_the_same_mask(weights, seed):
    a = saftune.select_mask(_module(weights), sparsity=0.5, score="random", seed=seed)
    b = saftune.select_mask(_module(weights), sparsity=0.5, score="random", seed=seed)
    assert a == b and a.meta == b.meta
    assert saftune.select_mask(_module(weights), sparsity=0.5, score="magnitude") == \
        saftune.select_mask(_module(weights), sparsity=0.5, score="magnitude")


@FAST
@given(weights=tensors(), share=st.floats(0.05, 1.0))
def test_a_selected_mask_survives_save_and_load_with_its_order_and_settings(weights, share):
    if math.floor(Fraction(repr(share)) * sum(t.numel() for t in weights.values())) < 1:
        return
    mask = saftune.select_mask(_module(weights), sparsity=share, score="magnitude")
    with tempfile.TemporaryDirectory() as out:
        loaded = SparseMask.load(mask.save(f"{out}/mask.safetensors"))
    assert loaded == mask
    assert list(loaded.shapes.items()) == list(mask.shapes.items())  # parameter order, not safetensors' sorted keys
    assert loaded.meta == mask.meta


# -- delta round trips --------------------------------------------------------------------------------

@st.composite
def deltas(draw):
    """(base model, delta of it): random shapes, dtype, selected entries and trained values."""
    dtype = DTYPES[draw(st.sampled_from(list(DTYPES)))]
    base = {n: t.to(dtype) for n, t in draw(tensors()).items()}
    indices, values, pretrained = {}, {}, {}
    for name, t in base.items():
        chosen = sorted(draw(st.sets(st.integers(0, t.numel() - 1), min_size=1, max_size=t.numel())))
        indices[name] = torch.tensor(chosen, dtype=torch.int64)
        pretrained[name] = t[indices[name]].clone()
        values[name] = torch.tensor(draw(st.lists(VALUES, min_size=len(chosen), max_size=len(chosen))))
    delta = SparseDelta(indices, values, pretrained, {n: tuple(t.shape) for n, t in base.items()},
                        {"method": "saft", "base_model": "random"})
    return _module(base), delta


@FAST
@given(case=deltas())
def test_apply_then_remove_restores_the_base_bit_for_bit(case):
    model, delta = case
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta.apply_to(model)
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        untouched = torch.ones(flat.numel(), dtype=torch.bool)
        untouched[delta.indices[name]] = False
        assert torch.equal(_bits(flat[delta.indices[name]]), _bits(delta.values[name].to(p.dtype)))
        assert torch.equal(_bits(flat[untouched]), _bits(before[name].reshape(-1)[untouched]))
    delta.apply_to(model)  # applying twice changes nothing
    delta.remove_from(model)
    for name, p in model.named_parameters():
        assert p.dtype == before[name].dtype and torch.equal(_bits(p), _bits(before[name])), name


# scaled() compares by value: 0.0 and -0.0 are the same weight there, as for `apply_to`'s check.
@FAST
@given(case=deltas())
def test_scaled_is_exact_at_both_ends(case):
    """alpha 0 gives the base, alpha 1 the delta itself (lerp; pre + 1 * (trained - pre) would round)."""
    _, delta = case
    base, same = delta.scaled(0.0), delta.scaled(1.0)
    for name in delta.indices:
        assert torch.equal(base.values[name], delta.pretrained[name].float()), name
        assert torch.equal(same.values[name], delta.values[name]), name


@FAST
@given(case=deltas())
def test_save_then_load_gives_the_same_delta(case):
    _, delta = case
    with tempfile.TemporaryDirectory() as out:
        loaded = SparseDelta.from_pretrained(delta.save_pretrained(out))
    assert loaded.fingerprint == delta.fingerprint and loaded.config == delta.config
    assert list(loaded.indices) == list(delta.indices) and loaded.shapes == delta.shapes
    for name in delta.indices:
        assert torch.equal(loaded.indices[name], delta.indices[name])
        assert torch.equal(_bits(loaded.values[name]), _bits(delta.values[name]))
        assert loaded.pretrained[name].dtype == delta.pretrained[name].dtype
        assert torch.equal(_bits(loaded.pretrained[name]), _bits(delta.pretrained[name]))
