"""SparseDelta: save/load/apply reproduces the fine-tuned model; unmerge is exact; wrong bases are refused."""

import json

import pytest
import torch
from torch import nn

import saftune
import tiny
from saftune import DeltaError, SparseDelta


def _finetune(name, seed=0, steps=10, sparsity=0.05, mask=None):
    case = tiny.BUILDERS[name](seed)
    mask = mask or saftune.select_mask(case.model, case.loss_fn, case.batches, sparsity=sparsity)
    sm = saftune.sparsify(case.model, mask)
    opt = torch.optim.AdamW(sm.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(steps):
        opt.zero_grad()
        case.loss_fn(case.model, case.batches[step % len(case.batches)]).mean().backward()
        opt.step()
    return case, sm


def _outputs(case):
    with torch.no_grad():
        return case.loss_fn(case.model, case.batches[0])


@pytest.mark.parametrize("name", list(tiny.BUILDERS))
def test_save_load_apply_reproduces_the_finetuned_model(name, tmp_path):
    case, sm = _finetune(name)
    finetuned = _outputs(case)
    sm.delta(method="saft", base_model=f"tiny-{name}").save_pretrained(tmp_path)
    base = tiny.BUILDERS[name]()  # same seed: the same pretrained model
    pretrained_state = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    delta = SparseDelta.from_pretrained(tmp_path)
    delta.apply_to(base.model)
    assert torch.equal(_outputs(base), finetuned)
    delta.apply_to(base.model)  # idempotent
    assert torch.equal(_outputs(base), finetuned)
    delta.remove_from(base.model)
    for n, p in base.model.named_parameters():
        assert torch.equal(p.detach(), pretrained_state[n]), n


def test_config_records_the_run(tmp_path):
    case, sm = _finetune("mlp")
    sm.delta(method="saft", base_model="tiny-mlp").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "saftune_config.json").read_text())
    assert config["format"] == "saftune.sparse_delta" and config["library_version"] == saftune.__version__
    assert config["method"] == "saft" and config["score"] == "grad" and config["sparsity"] == 0.05
    assert config["base_fingerprint"].startswith("sha256:")
    assert config["num_entries"] == sm.num_trainable


def test_wrong_base_model_is_refused_and_left_untouched(tmp_path):
    case, sm = _finetune("bert")
    sm.delta(base_model="tiny-bert seed 0").save_pretrained(tmp_path)
    other = tiny.bert(seed=1).model  # same architecture, other weights
    before = {n: p.detach().clone() for n, p in other.named_parameters()}
    with pytest.raises(DeltaError, match="not the base model the delta was trained from"):
        SparseDelta.from_pretrained(tmp_path).apply_to(other)
    assert all(torch.equal(p, before[n]) for n, p in other.named_parameters())
    with pytest.raises(DeltaError, match="which this model does not have"):
        SparseDelta.from_pretrained(tmp_path).apply_to(tiny.mlp().model)


def test_shape_mismatch_is_refused():
    case, sm = _finetune("mlp")
    wider = nn.Sequential(nn.Linear(6, 17), nn.ReLU(), nn.Linear(17, 16), nn.Tanh(), nn.Linear(16, 3))
    with pytest.raises(DeltaError, match="has shape"):
        sm.delta().apply_to(wider)


def test_damaged_delta_files_are_refused(tmp_path):
    case, sm = _finetune("mlp")
    sm.delta().save_pretrained(tmp_path)
    weights = tmp_path / "delta.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-7])
    with pytest.raises(DeltaError, match="truncated or corrupt"):
        SparseDelta.from_pretrained(tmp_path)
    weights.write_bytes(data)
    config_path = tmp_path / "saftune_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(DeltaError, match="format 99"):
        SparseDelta.from_pretrained(tmp_path)
    config_path.write_text(json.dumps({**config, "base_fingerprint": "sha256:0"}))
    with pytest.raises(DeltaError, match="does not match the fingerprint"):
        SparseDelta.from_pretrained(tmp_path)
    with pytest.raises(DeltaError, match="is missing"):
        SparseDelta.from_pretrained(tmp_path / "nowhere")


def test_delta_is_small():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1000, 1000), nn.ReLU(), nn.Linear(1000, 10))
    mask = saftune.select_mask(model, sparsity=0.001, score="random")
    delta = saftune.sparsify(model, mask).delta()
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as out:
        delta.save_pretrained(out)
        size = sum(f.stat().st_size for f in Path(out).iterdir())
    fp32_bytes = 4 * sum(p.numel() for p in model.parameters())
    assert size <= 0.005 * fp32_bytes, (size, fp32_bytes)


def test_bf16_base_accepts_an_fp32_trained_delta():
    case, sm = _finetune("mlp")
    delta = sm.delta()
    base = tiny.mlp().model.to(torch.bfloat16)
    delta.apply_to(base)
    for n, idx in delta.indices.items():
        assert torch.equal(base.get_parameter(n).detach().reshape(-1)[idx], delta.values[n].bfloat16())


def test_scaled_delta_interpolates():
    case, sm = _finetune("mlp")
    delta = sm.delta()
    base = tiny.mlp()
    pretrained = _outputs(base)
    delta.scaled(0.0).apply_to(base.model)
    assert torch.equal(_outputs(base), pretrained)
    delta.scaled(0.0).remove_from(base.model)
    delta.scaled(1.0).apply_to(base.model)
    assert torch.equal(_outputs(base), _outputs(case))
    half = delta.scaled(0.5)
    for n in delta.indices:
        torch.testing.assert_close(half.values[n], (delta.values[n] + delta.pretrained[n]) / 2)


def test_compose_adds_the_changes_of_several_deltas():
    mask = saftune.select_mask(tiny.mlp().model, sparsity=0.2, score="random", seed=1)
    other = saftune.select_mask(tiny.mlp().model, sparsity=0.2, score="random", seed=2)
    _, sm1 = _finetune("mlp", mask=mask)
    case2, sm2 = _finetune("mlp", mask=other, steps=5)
    d1, d2 = sm1.delta(method="a"), sm2.delta(method="b")
    both = SparseDelta.compose([d1, d2])
    assert both.num_entries == (mask | other).num_selected
    base = tiny.mlp().model
    both.apply_to(base)
    for n in both.indices:
        pre = tiny.mlp().model.get_parameter(n).detach().reshape(-1).clone()
        expected = pre.clone()
        for d in (d1, d2):
            if n in d.indices:
                expected[d.indices[n]] += d.values[n] - d.pretrained[n]
        torch.testing.assert_close(base.get_parameter(n).detach().reshape(-1), expected)
    with pytest.raises(DeltaError, match="different pretrained values"):
        SparseDelta.compose([d1, _finetune("mlp", seed=3, mask=mask)[1].delta()])
