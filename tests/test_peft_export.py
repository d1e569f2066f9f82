"""A sparse delta exported as a PEFT SHiRA adapter: loads with PeftModel, merges bit for bit like saftune."""

import json

import pytest
import torch
from safetensors import safe_open

from saftune.integrations.peft_export import PeftExportError, exact_offsets, export_peft_adapter
from saftune.model_card import model_card, write_model_card
from saftune.models.tiny_lm import tiny_causal_lm
from saftune.sparse.delta import SparseDelta

peft = pytest.importorskip("peft")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
INFO = {"method": "saft", "base_model": "tiny-llama", "dataset": "toy-qa", "sparsity": 0.01, "seed": 3}


def _bits(x):
    return x.contiguous().view({2: torch.int16, 4: torch.int32}[x.element_size()])


def random_delta(lm, names, *, seed=0, scale=0.02, per_tensor=(1, 60)):
    """Random entries of `names` with trained = pretrained + noise; a few unchanged and a few sign flips."""
    g = torch.Generator().manual_seed(seed)
    indices, values, pretrained, shapes = {}, {}, {}, {}
    for name in names:
        p = lm.get_parameter(name).detach()
        k = int(torch.randint(*per_tensor, (1,), generator=g))
        idx = torch.randperm(p.numel(), generator=g)[:k].sort().values
        pre = p.reshape(-1)[idx].clone()
        trained = pre.float() + torch.randn(k, generator=g) * scale
        trained[::7] = pre[::7].float()  # unchanged entries (SAFT leaves some)
        trained[3::11] = -pre[3::11].float()  # crossing zero
        indices[name], values[name], pretrained[name], shapes[name] = idx, trained, pre, tuple(p.shape)
    return SparseDelta(indices, values, pretrained, shapes, INFO)


def linear_names(lm):
    return [n for n, _ in lm.named_parameters() if n.rsplit(".", 2)[-2] in LINEARS]


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(_bits(sa[k]), _bits(sb[k])), k  # bit for bit, signed zeros included


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_exported_adapter_merges_bit_for_bit(tmp_path, dtype):
    lm = tiny_causal_lm("llama", dtype=dtype)
    delta = random_delta(lm, linear_names(lm))
    assert {n.rsplit(".", 2)[-2] for n in delta.indices} == set(LINEARS)
    out = export_peft_adapter(delta, lm, tmp_path / "adapter")

    reference = tiny_causal_lm("llama", dtype=dtype)
    delta.apply_to(reference)  # saftune's merge
    peft_model = peft.PeftModel.from_pretrained(tiny_causal_lm("llama", dtype=dtype).lm, out)
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference.lm(x).logits
        unmerged = peft_model(x).logits  # the adapter's own forward: base + sparse change
        merged = peft_model.merge_and_unload()
        assert_same_weights(merged, reference.lm)
        assert torch.equal(merged(x).logits, expected)
    assert torch.equal(unmerged, expected)


def test_base_model_is_left_unchanged_and_bare_hf_model_works(tmp_path):
    lm = tiny_causal_lm("llama")
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    delta = random_delta(lm, linear_names(lm), seed=1)
    out = export_peft_adapter(delta, lm.lm, tmp_path / "a")  # the transformers model: "lm." is dropped
    assert all(torch.equal(before[k], v) for k, v in lm.state_dict().items())
    model = peft.PeftModel.from_pretrained(tiny_causal_lm("llama").lm, out, adapter_name="sft").merge_and_unload()
    assert_same_weights(model, delta.apply_to(tiny_causal_lm("llama")).lm)


def test_untied_output_projection_is_a_linear(tmp_path):
    lm = tiny_causal_lm("llama", tie=False)
    delta = random_delta(lm, ["lm.lm_head.weight", "lm.model.layers.1.mlp.up_proj.weight"], seed=2)
    out = export_peft_adapter(delta, lm, tmp_path / "a")
    merged = peft.PeftModel.from_pretrained(tiny_causal_lm("llama", tie=False).lm, out).merge_and_unload()
    assert_same_weights(merged, delta.apply_to(tiny_causal_lm("llama", tie=False)).lm)


def test_file_layout_matches_peft_own_save(tmp_path):
    """Same tensor names, dtypes and shapes as PEFT writes for a SHiRA adapter on the same layers."""
    lm = tiny_causal_lm("llama")
    names = ["lm.model.layers.0.self_attn.q_proj.weight", "lm.model.layers.1.mlp.down_proj.weight"]
    out = export_peft_adapter(random_delta(lm, names, per_tensor=(40, 41)), lm, tmp_path / "ours")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "SHIRA" and config["r"] == 1 and config["task_type"] == "CAUSAL_LM"
    assert sorted(config["target_modules"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    theirs = peft.get_peft_model(tiny_causal_lm("llama").lm, peft.ShiraConfig(r=1, target_modules=config["target_modules"]))
    theirs.save_pretrained(tmp_path / "theirs")

    def layout(path):
        with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as f:
            return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}

    assert layout(out) == layout(tmp_path / "theirs")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1e-4, 1e-2, 1.0])
def test_exact_offsets_on_random_weights(dtype, scale):
    """base + d == trained bit for bit, computed as PEFT does: dense weight += sparse float32 adapter."""
    g = torch.Generator().manual_seed(0)
    n = 20_000
    base = (torch.randn(n, generator=g) * 0.02).to(dtype)
    target = (base.float() + torch.randn(n, generator=g) * 0.02 * scale).to(dtype)
    target[:50] = base[:50]
    base[50:60], target[50:60] = -0.0, -0.0  # a signed zero stays itself
    d, reached, portable = exact_offsets(base, target)
    assert bool(reached.all()) and d.dtype == torch.float32
    weight = base.reshape(1, n).clone()
    weight += torch.sparse_coo_tensor(torch.stack([torch.zeros(n, dtype=torch.long), torch.arange(n)]), d, (1, n))
    assert torch.equal(_bits(weight.reshape(-1)), _bits(target))
    # Entries marked portable are exact also with the adapter kept in the model's dtype.
    narrow = base + d.to(dtype)
    assert torch.equal(_bits(narrow[portable]), _bits(target[portable]))
    if dtype == torch.float32:
        assert bool(portable.all())


def test_padding_keeps_signed_zeros(tmp_path):
    lm = tiny_causal_lm("llama")
    weight = lm.get_parameter("lm.model.layers.0.mlp.up_proj.weight")
    with torch.no_grad():
        weight.view(-1)[:40] = torch.tensor([-0.0, 0.0]).repeat(20)  # the padding takes the first free entries
    name = "lm.model.layers.0.mlp.up_proj.weight"
    idx = torch.tensor([100, 200])
    pre = weight.detach().reshape(-1)[idx].clone()
    delta = SparseDelta({name: idx}, {name: pre + 0.5}, {name: pre}, {name: tuple(weight.shape)}, INFO)
    out = export_peft_adapter(delta, lm, tmp_path / "a")
    fresh = tiny_causal_lm("llama")
    fresh.lm.load_state_dict(lm.lm.state_dict())
    merged = peft.PeftModel.from_pretrained(fresh.lm, out).merge_and_unload()
    assert_same_weights(merged, delta.apply_to(lm).lm)
    assert torch.equal(_bits(merged.get_parameter("model.layers.0.mlp.up_proj.weight").reshape(-1)[:2]),
                       _bits(torch.tensor([-0.0, 0.0])))


@pytest.mark.parametrize("names, named", [
    (["lm.model.embed_tokens.weight", "lm.model.layers.0.self_attn.q_proj.weight"], "lm.model.embed_tokens.weight (Embedding"),
    (["lm.model.layers.1.input_layernorm.weight"], "lm.model.layers.1.input_layernorm.weight (LlamaRMSNorm"),
])
def test_refuses_tensors_outside_linear_layers(tmp_path, names, named):
    lm = tiny_causal_lm("llama")
    with pytest.raises(PeftExportError, match="holds only torch.nn.Linear weights") as e:
        export_peft_adapter(random_delta(lm, names), lm, tmp_path / "a")
    assert named in str(e.value) and "saftune merge" in str(e.value)
    assert not (tmp_path / "a").exists()  # nothing written


def test_refuses_linear_biases_and_gpt2_conv1d(tmp_path):
    llama = tiny_causal_lm("llama", bias=True)
    with pytest.raises(PeftExportError, match=r"q_proj.bias \(Linear.bias\)"):
        export_peft_adapter(random_delta(llama, ["lm.model.layers.0.self_attn.q_proj.bias"]), llama, tmp_path / "a")
    gpt2 = tiny_causal_lm("gpt2")
    with pytest.raises(PeftExportError, match=r"c_attn.weight \(Conv1D.weight\)"):
        export_peft_adapter(random_delta(gpt2, ["lm.transformer.h.0.attn.c_attn.weight"]), gpt2, tmp_path / "b")


def test_refuses_a_model_that_is_not_the_base(tmp_path):
    lm = tiny_causal_lm("llama")
    delta = random_delta(lm, linear_names(lm))
    with pytest.raises(PeftExportError, match="not its pretrained values"):
        export_peft_adapter(delta, tiny_causal_lm("llama", seed=1), tmp_path / "a")
    with pytest.raises(PeftExportError, match="not its pretrained values"):
        export_peft_adapter(delta, delta.apply_to(tiny_causal_lm("llama")), tmp_path / "b")


def test_unreachable_value_is_refused_unless_exact_false(tmp_path):
    """fp32: 1.0 + d is a multiple of 2**-24 for every d near -1, so it can never round to 1e-9."""
    lm = tiny_causal_lm("llama")
    name = "lm.model.layers.0.self_attn.o_proj.weight"
    weight = lm.get_parameter(name)
    with torch.no_grad():
        weight.view(-1)[5] = 1.0
    idx = torch.tensor([5, 9])
    pre = weight.detach().reshape(-1)[idx].clone()
    delta = SparseDelta({name: idx}, {name: torch.tensor([1e-9, float(pre[1]) + 0.1])}, {name: pre},
                        {name: tuple(weight.shape)}, INFO)
    with pytest.raises(PeftExportError, match=r"o_proj.weight \(1 of 2\).*exact=False"):
        export_peft_adapter(delta, lm, tmp_path / "a")
    out = export_peft_adapter(delta, lm, tmp_path / "b", exact=False)
    fresh = tiny_causal_lm("llama")
    fresh.lm.load_state_dict(lm.lm.state_dict())
    merged = peft.PeftModel.from_pretrained(fresh.lm, out).merge_and_unload()
    got = merged.get_parameter("model.layers.0.self_attn.o_proj.weight").reshape(-1)[idx]
    assert abs(float(got[0]) - 1e-9) < 2**-24 and float(got[1]) == float(delta.values[name][1])


def test_export_from_a_run_directory_writes_a_card_with_metrics(tmp_path):
    lm = tiny_causal_lm("llama")
    delta = random_delta(lm, linear_names(lm))
    delta.save_pretrained(tmp_path / "run" / "result")
    (tmp_path / "run" / "metrics.json").write_text(json.dumps({"metrics": {"id": 0.61234, "ood": {"tweets": 0.5}}}))
    out = export_peft_adapter(tmp_path / "run", lm, tmp_path / "adapter")
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: tiny-llama\nlibrary_name: peft\n")
    for field in ("| Method | `saft` |", f"| Trained values | {delta.num_entries:,} (sparsity 0.01) |",
                  "| Data | toy-qa |", "| Seed | 3 |", "| id | 0.6123 |", "| ood/tweets | 0.5000 |",
                  "PeftModel.from_pretrained"):
        assert field in card, field
    merged = peft.PeftModel.from_pretrained(tiny_causal_lm("llama").lm, out).merge_and_unload()
    assert_same_weights(merged, delta.apply_to(tiny_causal_lm("llama")).lm)


def test_model_card_fields(tmp_path):
    card = model_card(base_model="HuggingFaceTB/SmolLM2-135M", method="saft", dataset="med-generality",
                      trained_values=1_000, total_values=1_000_000, seed=0, metrics={"val": 0.25, "loss": None},
                      details={"Score": "grad"})
    assert card.splitlines()[:2] == ["---", "base_model: HuggingFaceTB/SmolLM2-135M"]
    assert "library_name: saftune" in card and "- saft" in card
    for field in ("| Base model | `HuggingFaceTB/SmolLM2-135M` |", "| Method | `saft` |", "| Data | med-generality |",
                  "| Trained values | 1,000 (sparsity 0.001) |", "| Seed | 0 |", "| Score | grad |", "| val | 0.2500 |"):
        assert field in card, field
    assert "loss" not in card and "None" not in card  # unknown values are left out, not shown as placeholders
    minimal = model_card(base_model="m", method="ft")
    assert "Trained values" not in minimal and "## Metrics" not in minimal
    path = write_model_card(tmp_path / "result", base_model="m", method="lora", metrics={"id": 1.0})
    assert path == tmp_path / "result" / "README.md" and "| id | 1.0000 |" in path.read_text()


def _trained_saft_delta(dtype, lr, steps=20):
    """A real SAFT delta on the Linear weights of a tiny Llama (mask by gradient, AdamW steps)."""
    import saftune
    from saftune.data.llm import collate_sft, encode_sft, sft_loss

    lm = tiny_causal_lm("llama", dtype=dtype)
    pairs = [("Capital of France?", " Paris"), ("2 + 2 =", " 4"), ("Colour of the sky?", " blue"),
             ("Opposite of hot?", " cold")]
    encoded = encode_sft(lm, pairs)
    rows = list(zip(encoded.input_ids, encoded.answer_starts))
    batches = [collate_sft(rows[i: i + 2], pad_id=lm.tokenizer.pad_token_id) for i in range(0, len(rows), 2)]
    mask = saftune.select_mask(lm, sft_loss, batches, sparsity=0.02, include=["*proj.weight"], progress=False)
    sparse = saftune.sparsify(lm, mask)
    opt = torch.optim.AdamW(sparse.trainable_parameters(), lr=lr, weight_decay=0.1)
    for step in range(steps):
        opt.zero_grad()
        sft_loss(lm, batches[step % len(batches)]).mean().backward()
        opt.step()
    return sparse.delta(**INFO)


def test_trained_bf16_saft_delta_is_exact(tmp_path):
    delta = _trained_saft_delta("bfloat16", lr=1e-3)
    out = export_peft_adapter(delta, tiny_causal_lm("llama", dtype="bfloat16"), tmp_path / "a")
    merged = peft.PeftModel.from_pretrained(tiny_causal_lm("llama", dtype="bfloat16").lm, out).merge_and_unload()
    assert_same_weights(merged, delta.apply_to(tiny_causal_lm("llama", dtype="bfloat16")).lm)
    assert "| Exact merge | bit for bit" in (out / "README.md").read_text()


def test_trained_fp32_saft_delta_unreachable_entries_are_refused_or_nearest(tmp_path):
    """float32: entries trained to much nearer zero cannot be reached by an addition; exact=False is ~1 ulp off."""
    delta = _trained_saft_delta("float32", lr=1e-3)
    with pytest.raises(PeftExportError, match="no change rounds to the trained value"):
        export_peft_adapter(delta, tiny_causal_lm("llama"), tmp_path / "a")
    out = export_peft_adapter(delta, tiny_causal_lm("llama"), tmp_path / "b", exact=False)
    merged = peft.PeftModel.from_pretrained(tiny_causal_lm("llama").lm, out).merge_and_unload()
    reference = delta.apply_to(tiny_causal_lm("llama")).lm
    for name, idx in delta.indices.items():
        got = merged.get_parameter(name.removeprefix("lm.")).detach().reshape(-1)[idx]
        want = reference.get_parameter(name.removeprefix("lm.")).detach().reshape(-1)[idx]
        # base + d is off by at most half a spacing of d and half of the result: one spacing of |b| + |t|.
        size = delta.pretrained[name].abs() + want.abs()
        assert bool(((got - want).abs() <= torch.nextafter(size, torch.tensor(float("inf"))) - size).all()), name
    assert "| Exact merge | no: " in (out / "README.md").read_text()


def test_cli_exports_a_trained_attention_scope_result_that_peft_merges_like_saftune(tmp_path, capsys):
    from peft import PeftModel

    from saftune.cli import main
    from saftune.models import create
    from saftune.results import load_result

    run = tmp_path / "run"
    assert main(["train", "--model", "tiny-llama", "--dataset", "toy-lm", "--method", "saft",
                 "--method-option", "sparsity=0.05", "--method-option", "scope=attention", "--method-option", "lr=1e-2",
                 "--set", "train.epochs=1", "--set", "train.batch_size=8", "--set", "train.progress=false",
                 "--out", str(run)]) == 0
    card = (run / "result" / "README.md").read_text()
    assert "tiny-llama" in card and "saft" in card and "toy-lm" in card  # every result gets its model card
    assert main(["export-peft", "--result", str(run), "--out", str(tmp_path / "adapter"), "--nearest"]) == 0
    assert "PEFT (SHiRA) adapter" in capsys.readouterr().out
    merged = create("tiny-llama", seed=1)
    load_result(run / "result", merged, merge=True)
    peft = PeftModel.from_pretrained(create("tiny-llama", seed=1).lm, str(tmp_path / "adapter")).merge_and_unload()
    ours = {n.removeprefix("lm."): p for n, p in merged.named_parameters()}
    close = [torch.allclose(p, ours[n], rtol=0, atol=1e-6) for n, p in peft.named_parameters()]
    assert close and all(close)
    # A result of another method is refused with what to do instead.
    assert main(["train", "--model", "tiny-llama", "--dataset", "toy-lm", "--method", "zeroshot",
                 "--out", str(tmp_path / "zs")]) == 0
    assert main(["export-peft", "--result", str(tmp_path / "zs"), "--out", str(tmp_path / "a2")]) == 2
    assert "only a sparse delta" in capsys.readouterr().err
