"""SparseMask: persistence, summary, set operations."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import saftune
import tiny
from saftune import MaskFileError, SparseMask


def _mask():
    case = tiny.bert()
    return saftune.select_mask(case.model, case.loss_fn, case.batches, sparsity=0.01)


def test_save_load_round_trip(tmp_path):
    mask = _mask()
    path = mask.save(tmp_path / "mask.safetensors")
    loaded = SparseMask.load(path)
    assert loaded == mask
    assert list(loaded.indices) == list(mask.indices)  # parameter order survives safetensors' sorted keys
    assert loaded.shapes == mask.shapes
    assert loaded.meta["score"] == "grad" and loaded.meta["sparsity"] == 0.01
    assert all(i.dtype == torch.int64 for i in loaded.indices.values())
    # int32 on disk: 4 bytes per index plus a small header
    assert path.stat().st_size < 4 * mask.num_selected + 8192


def test_summary_counts_per_block():
    mask = _mask()
    rows = {r.block: r for r in mask.summary()}
    assert "bert.encoder.layer.0" in rows and "bert.encoder.layer.1" in rows
    assert sum(r.selected for r in rows.values()) == mask.num_selected
    assert sum(r.total for r in rows.values()) == mask.num_candidates
    layer0 = sum(p.numel() for n, p in tiny.bert().model.named_parameters() if n.startswith("bert.encoder.layer.0."))
    assert rows["bert.encoder.layer.0"].total == layer0
    text = mask.format_summary()
    assert text.splitlines()[-1].split()[:3] == ["all", str(mask.num_selected), str(mask.num_candidates)]


def test_set_operations_and_overlap():
    shapes = {"a": (10,), "b": (4,)}
    m1 = SparseMask({"a": torch.tensor([1, 2, 3]), "b": torch.tensor([0])}, shapes)
    m2 = SparseMask({"a": torch.tensor([3, 4])}, shapes)
    assert (m1 & m2).indices["a"].tolist() == [3] and "b" not in (m1 & m2).indices
    assert (m1 | m2).num_selected == 5
    assert (m1 - m2).indices["a"].tolist() == [1, 2]
    assert m1.overlap(m2) == pytest.approx(1 / 5)
    assert m1.overlap(m1) == 1.0
    assert m1 != m2 and m1 == SparseMask({"b": torch.tensor([0]), "a": torch.tensor([3, 1, 2])}, shapes)


def test_invalid_indices_are_refused():
    with pytest.raises(ValueError, match="outside"):
        SparseMask({"a": torch.tensor([10])}, {"a": (10,)})
    with pytest.raises(ValueError, match="sorted and unique"):
        SparseMask({"a": torch.tensor([2, 2])}, {"a": (10,)})
    with pytest.raises(ValueError, match="no shape"):
        SparseMask({"a": torch.tensor([2])}, {})


def test_damaged_mask_files_are_refused(tmp_path):
    path = _mask().save(tmp_path / "mask.safetensors")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(MaskFileError, match="truncated or corrupt"):
        SparseMask.load(truncated)
    with pytest.raises(MaskFileError, match="does not exist"):
        SparseMask.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(MaskFileError, match="not a saftune mask"):
        SparseMask.load(tmp_path / "other.safetensors")


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.sampled_from(["w", "layer.0.b", "head.weight"]),
                       st.lists(st.integers(0, 99), unique=True, max_size=30)))
def test_save_load_round_trip_property(tmp_path_factory, chosen):
    shapes = {"w": (10, 10), "layer.0.b": (100,), "head.weight": (4, 25)}
    mask = SparseMask({n: torch.tensor(v, dtype=torch.int64) for n, v in chosen.items()}, shapes)
    path = mask.save(tmp_path_factory.mktemp("m") / "m.safetensors")
    assert SparseMask.load(path) == mask
