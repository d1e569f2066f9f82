"""SAFT on an int8 or nf4 base (`saftune.sparse.quantized`): scored and trained through the dequantized weights."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("torchao")

import saftune  # noqa: E402
import tiny  # noqa: E402
from saftune.models import create  # noqa: E402
from saftune.models.tiny_lm import tiny_causal_lm  # noqa: E402
from saftune.sparse import SparseDelta, SparseMask, sparsify  # noqa: E402
from saftune.sparse import quantized as q  # noqa: E402
from saftune.sparse.delta import DeltaError  # noqa: E402


def _case(tie: bool = True, seed: int = 0):
    lm = tiny_causal_lm("llama", layers=2, tie=tie, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, 256, (3, 12), generator=generator) for _ in range(4)]

    def loss_fn(model, ids):
        logits = model.lm(input_ids=ids, use_cache=False).logits.float()
        return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(1)

    return lm, loss_fn, batches


SCHEMES = ["int8", "nf4"]


def _dequantized_copy(model: nn.Module) -> nn.Module:
    """A plain model whose Linear weights are exactly the quantized model's dequantized weights."""
    plain = q.copy_model(model)
    for module in plain.modules():
        if type(module) is nn.Linear and q.is_quantized(module.weight):
            module.weight = nn.Parameter(q.dequantize(module.weight.detach()).clone(), requires_grad=False)
    return plain


def _train(model, mask, loss_fn, batches, steps=3, lr=1e-2):
    sm = sparsify(model, mask)
    optimizer = torch.optim.AdamW(sm.trainable_parameters(), lr=lr)
    for step in range(steps):
        optimizer.zero_grad()
        loss_fn(model, batches[step % len(batches)]).mean().backward()
        optimizer.step()
    return sm


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantize_freezes_every_unshared_linear_and_keeps_a_tied_output_layer(scheme):
    lm, _, _ = _case(tie=True)
    q.quantize(lm, scheme)
    quantized = set(q.quantized_parameter_names(lm))
    linears = {f"{n}.weight" for n, m in lm.named_modules() if type(m) is nn.Linear}
    assert "lm.lm_head.weight" not in dict(lm.named_parameters())  # tied: named once, as the embedding
    assert quantized == linears - {"lm.lm_head.weight"} and len(quantized) == 14  # 2 blocks x 7 projections
    assert not q.is_quantized(lm.lm.get_input_embeddings().weight)
    assert {q.scheme_of(lm.get_parameter(n)) for n in quantized} == {scheme}
    with pytest.raises(q.QuantizationError, match="unknown quantization 'int4'"):
        q.quantize(nn.Linear(4, 4), "int4")
    with pytest.raises(q.QuantizationError, match="no unshared nn.Linear"):
        q.quantize(nn.Sequential(nn.Embedding(4, 4)), "int8")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_engine_rebuilds_torchaos_dequantized_weight_bit_for_bit(dtype):
    layer = nn.Linear(48, 20).to(dtype)
    q.quantize(nn.Sequential(layer), "int8")
    assert torch.equal(q.dense_weight(layer.weight, dtype), layer.weight.dequantize())
    # nf4: torchao's NF4Tensor dequantizes itself with get_original_weight; 576 x 576 has 5184 blocks of 64,
    # which groups of 256 do not divide (SmolLM2's attention projections), so its scales go in groups of 64.
    for shape in [(20, 48), (576, 576)]:
        layer = nn.Linear(shape[1], shape[0]).to(dtype)
        q.quantize(nn.Sequential(layer), "nf4")
        assert q.scheme_of(layer.weight) == "nf4" and layer.weight.dtype == dtype
        assert torch.equal(q.dense_weight(layer.weight, dtype), layer.weight.get_original_weight())
        assert (q.dense_weight(layer.weight, dtype) - layer.weight.get_original_weight()).abs().max() == 0
    assert layer.weight.scaler_block_size == 64
    # An entry count that fills no whole block of 64 stays in full precision.
    odd = nn.Sequential(nn.Linear(5, 3), nn.Linear(64, 4))
    q.quantize(odd, "nf4")
    assert [q.scheme_of(m.weight) for m in odd] == [None, "nf4"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saftunes_nf4_quantizer_makes_torchaos_nf4_tensor_bit_for_bit(dtype):
    ao = q._torchao()
    generator = torch.Generator().manual_seed(0)
    for shape, group in [((64, 96), 32), ((256, 512), 256), ((48, 64), 16)]:
        weight = (torch.randn(shape, generator=generator) * 0.02).to(dtype)
        weight.view(-1)[:64] = torch.linspace(-1, 1, 64).to(dtype)  # one block with entries on and between the levels
        ours, theirs = q.to_nf4(weight), ao.to_nf4(weight, 64, group)
        assert ours.scaler_block_size == group and ours.shape == weight.shape and ours.dtype == dtype
        for name in ["quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean", "nf4"]:
            assert torch.equal(getattr(ours, name), getattr(theirs, name)), name


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_rounding_bound_holds_every_entry_of_a_quantized_weight(scheme):
    weight = torch.randn(64, 96) * torch.linspace(0.01, 3.0, 64).view(-1, 1)  # rows of very different scales
    layer = nn.Linear(96, 64, bias=False)
    layer.weight.data.copy_(weight)
    q.quantize(nn.Sequential(layer), scheme)
    everything = torch.arange(weight.numel())
    error = (q.dequantize(layer.weight).reshape(-1) - weight.reshape(-1)).abs()
    bound = q.rounding_bound(layer.weight, everything)
    # Holds (up to 1e-3: torchao clamps the largest int8 entry, a hair past half a step), and is not vacuous.
    assert bool((error <= bound * (1 + 1e-3)).all()) and float((error / bound).max()) > 0.3


def test_the_model_option_quantizes_and_a_bad_value_is_refused_before_loading():
    lm = create("tiny-llama", quantize="int8")
    assert len(q.quantized_parameter_names(lm)) == 14
    lm = create("tiny-llama", quantize="nf4")
    assert {q.scheme_of(p) for n, p in lm.named_parameters() if q.is_quantized(p)} == {"nf4"}
    with pytest.raises(ValueError, match="quantize"):
        create("tiny-llama", quantize="int4")


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("lean", [False, True])
def test_phase_1_scores_a_quantized_weight_by_the_gradient_of_its_dequantized_values(lean, scheme):
    lm, loss_fn, batches = _case(tie=False)
    q.quantize(lm, scheme)
    plain = _dequantized_copy(lm)
    mask = saftune.select_mask(lm, loss_fn, batches, sparsity=0.01, lean=lean)
    reference = saftune.select_mask(plain, loss_fn, batches, sparsity=0.01)
    # torchao computes (x Q^T) * scale, the plain copy x (Q * scale)^T: equal up to rounding, so an entry at the
    # top-k's threshold may trade places (on this machine the masks are equal; on SmolLM2 one entry in 134515).
    shared = (mask & reference).num_selected
    assert mask.num_selected == reference.num_selected and shared >= mask.num_selected - 2
    assert any(q.is_quantized(dict(lm.named_parameters())[n]) for n in mask.indices)
    assert all("forward" not in m.__dict__ for m in lm.modules())  # the scoring routes are gone


@pytest.mark.parametrize("scheme", SCHEMES)
def test_training_changes_only_the_side_term_and_follows_the_dequantized_model(scheme):
    lm, loss_fn, batches = _case(tie=False)
    q.quantize(lm, scheme)
    plain = _dequantized_copy(lm)
    mask = saftune.select_mask(lm, loss_fn, batches, sparsity=0.01)
    stored_before = {n: [t.clone() for t in q.stored_tensors(p)] for n, p in lm.named_parameters() if q.is_quantized(p)}
    plain_before = {n: p.detach().clone() for n, p in lm.named_parameters() if not q.is_quantized(p)}
    sm = _train(lm, mask, loss_fn, batches)
    reference = _train(plain, mask, loss_fn, batches)
    assert [s.path for s in sm._slots].count("quantized") > 0
    # The quantized data and scales are untouched; full-precision tensors change only at their selected entries.
    for n, p in lm.named_parameters():
        if n in stored_before:
            assert len(stored_before[n]) > 1 and all(torch.equal(a, b) for a, b in zip(q.stored_tensors(p), stored_before[n]))
        else:
            changed = (p.detach() != plain_before[n]).reshape(-1).nonzero().reshape(-1)
            assert set(changed.tolist()) <= set(mask.indices.get(n, torch.tensor([])).tolist())
    # The same training on the dequantized weights: the side term is the same function and the same gradient.
    for (name, values), (_, ref_values) in zip(sm.named_trainable_parameters(), reference.named_trainable_parameters()):
        assert torch.allclose(values, ref_values, atol=1e-5, rtol=1e-4), name
    ids = batches[0]
    assert torch.allclose(lm.lm(input_ids=ids).logits, plain.lm(input_ids=ids).logits, atol=1e-4)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_side_terms_reading_one_input_share_one_copy_of_its_columns(monkeypatch, copies_path, scheme, checkpointing):
    # q, k and v read one input, and so do gate and up: their side terms recompute it in the backward (under
    # checkpointing: keep a reference) and gather and widen it once there, and the gradients are those of
    # training on the dequantized weights.
    from saftune.sparse import kernels

    lm, loss_fn, batches = _case(tie=False)
    q.quantize(lm, scheme)
    plain = _dequantized_copy(lm)
    mask = tiny.all_columns_mask(lm)
    saved, made = [], []
    shared_copy = kernels.shared_copy
    counting = lambda source, index, dtype, make: shared_copy(source, index, dtype, lambda: made.append(1) or make())  # noqa: E731
    monkeypatch.setattr(q, "shared_copy", counting)
    monkeypatch.setattr(kernels, "shared_copy", counting)  # `kernels.shared_columns`, the backward's under checkpointing
    save_for_backward = torch.autograd.function.FunctionCtx.save_for_backward
    monkeypatch.setattr(torch.autograd.function.FunctionCtx, "save_for_backward",
                        lambda ctx, *tensors: saved.append(tensors[0]) or save_for_backward(ctx, *tensors))
    for model in (lm, plain):
        if checkpointing:
            model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    sm = sparsify(lm, mask)
    loss_fn(lm, batches[0]).mean().backward()
    layers, tokens = lm.lm.config.num_hidden_layers, batches[0].numel()
    columns = [t for t in saved if t.dim() == 2 and t.shape[1] == tokens]  # side terms' saved input columns
    if checkpointing:  # nothing gathered in the forward: each input gathered and widened once in the backward
        assert not columns and len(made) == 4 * layers
    else:  # recomputed in the backward from the producers' saved tensors (`replay`), gathered and widened once;
        # the first layer's q/k/v input has no autograd history (nothing below it trains): one copy of its columns
        # saved in the forward by the three
        assert len(columns) == 3 and len({t.data_ptr() for t in columns}) == 1
        assert len(made) == 1 + 4 * layers
    reference = sparsify(plain, mask)
    loss_fn(plain, batches[0]).mean().backward()
    for (name, values), (_, ref_values) in zip(sm.named_trainable_parameters(), reference.named_trainable_parameters()):
        assert torch.allclose(values.grad, ref_values.grad, atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("scheme", SCHEMES)
def test_side_terms_recompute_their_inputs_bit_identical_to_keeping_them(monkeypatch, scheme):
    from saftune.sparse import replay

    grads, replayed = {}, []
    input_replay = q.input_replay
    monkeypatch.setattr(q, "input_replay", lambda x: (found := input_replay(x)) is not None and replayed.append(1) or found)
    for recompute in (True, False):
        monkeypatch.setattr(replay, "REPLAY_INPUTS", recompute)
        lm, loss_fn, batches = _case(tie=False)
        q.quantize(lm, scheme)
        sm = sparsify(lm, saftune.select_mask(lm, loss_fn, batches, sparsity=0.03, score="random"))
        loss_fn(lm, batches[0]).mean().backward()
        grads[recompute] = {n: v.grad for n, v in sm.named_trainable_parameters()}
        if recompute:  # every side term: all 7 projections of every layer (and the untied output layer in int8)
            sides = sum(s.path == "quantized" for s in sm._slots)
            assert len(replayed) == sides >= 7 * lm.lm.config.num_hidden_layers
    for name, grad in grads[True].items():
        assert torch.equal(grad, grads[False][name]), name


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_delta_from_a_quantized_base_applies_as_a_side_term_there_and_rebases_onto_the_full_precision_base(
        tmp_path, scheme):
    full, loss_fn, batches = _case(tie=True)
    lm = q.quantize(copy.deepcopy(full), scheme)
    mask = saftune.select_mask(lm, loss_fn, batches, sparsity=0.01)
    sm = _train(lm, mask, loss_fn, batches)
    ids = batches[1]
    trained_logits = lm.lm(input_ids=ids).logits.detach()
    delta = sm.delta(method="saft")
    assert set(delta.quantized_tensors) and delta.quantized_tensors <= set(mask.indices)
    assert delta.quantized_scheme == scheme
    delta = SparseDelta.from_pretrained(delta.save_pretrained(tmp_path / "delta"))
    sm.unsparsify()  # the int8 model keeps its trained entries as a fixed side term
    assert torch.allclose(lm.lm(input_ids=ids).logits, trained_logits, atol=1e-5)

    # On a fresh quantized base: the side term, the trained model's function; applying twice changes nothing.
    base = q.quantize(copy.deepcopy(full), scheme)
    pretrained_logits = base.lm(input_ids=ids).logits.detach()
    delta.apply_to(base).lm(input_ids=ids)
    delta.apply_to(base)
    assert torch.allclose(base.lm(input_ids=ids).logits, trained_logits, atol=1e-5)
    delta.remove_from(base)
    assert torch.equal(base.lm(input_ids=ids).logits, pretrained_logits)

    # On the full-precision base: W + (trained - Q(W)), within the rounding of what the quantized model computes,
    # and close to SAFT trained on the full-precision base itself with the same mask.
    merged = delta.apply_to(copy.deepcopy(full))
    full_trained = copy.deepcopy(full)
    reference = _train(full_trained, mask, loss_fn, batches)
    for name, idx in delta.indices.items():
        got = merged.get_parameter(name).detach().reshape(-1)[idx]
        change = delta.values[name] - delta.pretrained[name].float()
        if name in delta.quantized_tensors:
            assert torch.equal(got, full.get_parameter(name).detach().reshape(-1)[idx] + change)
        else:  # trained in full precision (the tied embedding, the norms): the trained values themselves
            assert torch.equal(got, delta.values[name])
        want = dict(reference.named_trainable_parameters())[name].detach()
        before = full.get_parameter(name).detach().reshape(-1)[idx]
        # The learned changes agree to 10% (int8) or 35% (nf4) of their size: the gradients differ only by the
        # rounding of the weights, sixteen levels per block of 64 entries for nf4.
        assert (change - (want - before)).norm() <= {"int8": 0.1, "nf4": 0.35}[scheme] * (want - before).norm(), name
    with pytest.raises(DeltaError, match="not undone bit for bit"):
        delta.remove_from(merged)
    rebased = delta.rebased(copy.deepcopy(full))
    unmerged = rebased.remove_from(rebased.apply_to(copy.deepcopy(full)))
    assert all(torch.equal(a, b) for a, b in zip(unmerged.state_dict().values(), full.state_dict().values()))
    other = q.quantize(copy.deepcopy(full), {"int8": "nf4", "nf4": "int8"}[scheme])
    with pytest.raises(DeltaError, match=f"trained beside {scheme} weights.*quantize='{scheme}'"):
        delta.apply_to(other)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_full_precision_delta_applies_to_the_quantized_base_as_a_side_term(scheme):
    full, loss_fn, batches = _case(tie=False)
    mask = saftune.select_mask(full, loss_fn, batches, sparsity=0.01)
    trained = copy.deepcopy(full)
    delta = _train(trained, mask, loss_fn, batches).delta()
    base = q.quantize(copy.deepcopy(full), scheme)
    delta.apply_to(base)
    assert sum(q.attached(m) is not None for m in base.modules()) > 0
    other = q.quantize(tiny_causal_lm("llama", layers=2, tie=False, seed=5), scheme)
    with pytest.raises(DeltaError, match="not the base"):
        delta.apply_to(other)


def test_bad_quantized_inputs_are_refused_with_the_fix():
    lm, loss_fn, batches = _case(tie=False)
    q.quantize(lm, "int8")
    name = "lm.model.layers.0.self_attn.q_proj.weight"
    shape = tuple(lm.get_parameter(name).shape)
    with pytest.raises(q.QuantizationError, match="quantized data or scales"):
        sparsify(lm, SparseMask({f"{name}.scale": torch.tensor([0])}, {f"{name}.scale": (shape[0], 1)}))
    with pytest.raises(q.QuantizationError, match="score 'grad'"):
        saftune.select_mask(lm, loss_fn, batches, sparsity=0.01, score="lt-sft")

    class Params4bit(torch.Tensor):  # stands for a bitsandbytes weight (packed 4-bit): not routable
        pass

    Params4bit.__module__ = "bitsandbytes.nn.modules"
    layer = nn.Linear(4, 4)
    layer.weight = nn.Parameter(layer.weight.detach().as_subclass(Params4bit), requires_grad=False)
    with pytest.raises(q.QuantizationError, match="cannot route.*quantize='int8' or quantize='nf4'"):
        sparsify(layer, SparseMask({"weight": torch.tensor([1])}, {"weight": (4, 4)}))
    mixed = _case(tie=False)[0]
    q.quantize(mixed.lm.model.layers[0], "int8")
    q.quantize(mixed.lm.model.layers[1], "nf4")
    both = saftune.select_mask(mixed, loss_fn, batches, sparsity=0.01)
    with pytest.raises(q.QuantizationError, match="quantized in 2 ways.*one way"):
        sparsify(mixed, both)
    assert all(p.requires_grad for p in mixed.parameters() if not q.is_quantized(p))  # refused before any change
    nf4 = q.quantize(_case(tie=False)[0], "nf4")
    scales = f"{name}.quantized_scalers"
    with pytest.raises(q.QuantizationError, match="quantized data or scales"):
        sparsify(nf4, SparseMask({scales: torch.tensor([0])}, {scales: (shape[0] * shape[1] // 64,)}))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_saft_run_on_a_quantized_base_evaluates_and_merges_on_both_bases(tmp_path, capsys, scheme):
    from saftune.cli import main
    from saftune.run import RunConfig, run_experiment
    from saftune.train.trainer import TrainConfig

    config = RunConfig(model="tiny-llama", model_options={"quantize": scheme}, dataset="toy-lm", method="saft",
                       method_options={"lr": 3e-3, "sparsity": 1e-2}, train=TrainConfig(epochs=2, batch_size=4),
                       eval_batch_size=8, save_result=True)
    record = run_experiment(config, tmp_path / "run")
    delta = SparseDelta.from_pretrained(tmp_path / "run" / "result")
    assert delta.quantized_tensors and delta.config["quantized_base"]["scheme"] == scheme

    def evaluated(*extra):
        out = tmp_path / f"eval{len(extra)}.json"
        assert main(["eval", "--result", str(tmp_path / "run"), "--batch-size", "8", "--out", str(out), *extra]) == 0
        import json

        return json.loads(out.read_text())["metrics"]

    # On its own quantized base the result's side terms reproduce the run's metrics exactly; on the
    # full-precision base (rebased delta) the metrics move by the rounding only.
    assert evaluated() == pytest.approx(record.metrics, abs=1e-9)
    full = evaluated("--quantize", "none")
    assert set(full) == set(record.metrics)
    for out, base in (("merged-quantized", []), ("merged-full", ["--quantize", "none"])):
        assert main(["merge", "--result", str(tmp_path / "run"), "--out", str(tmp_path / out), *base]) == 0
    printed = capsys.readouterr().out
    assert f"its {scheme} weights dequantized" in printed
    merged = create(f"causal-lm:{tmp_path / 'merged-quantized'}")
    assert not q.quantized_parameter_names(merged)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_evaluation_cache_tells_a_quantized_model_with_trained_entries_from_its_base(scheme):
    from saftune.eval.cache import weights_digest

    lm, loss_fn, batches = _case(tie=False)
    q.quantize(lm, scheme)
    base = weights_digest(lm)
    other = q.quantize(_case(tie=False, seed=3)[0], scheme)
    assert weights_digest(other) != base  # the digest reads the quantized data, not just names and shapes
    mask = saftune.select_mask(lm, loss_fn, batches, sparsity=0.01)
    sm = _train(lm, mask, loss_fn, batches)
    trained = weights_digest(lm)  # the quantized data are the base's: only the side terms differ
    assert trained != base
    sm.unsparsify()
    assert weights_digest(lm) == trained
    for module in lm.modules():
        q.detach(module)
    assert weights_digest(lm) != trained


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_delta_from_a_quantized_base_exports_as_a_peft_adapter_of_the_full_precision_base(tmp_path, scheme):
    from peft import PeftModel

    from saftune.integrations.peft_export import PeftExportError, export_peft_adapter

    full, loss_fn, batches = _case(tie=False)
    lm = q.quantize(copy.deepcopy(full), scheme)
    mask = saftune.select_mask(lm, loss_fn, batches, sparsity=0.01, include=["*_proj.weight"])  # SHiRA: Linear only
    delta = _train(lm, mask, loss_fn, batches).delta()
    with pytest.raises(PeftExportError, match="full-precision base"):
        export_peft_adapter(delta, q.quantize(copy.deepcopy(full), scheme), tmp_path / "refused")
    export_peft_adapter(delta, full, tmp_path / "adapter")
    merged = PeftModel.from_pretrained(copy.deepcopy(full.lm), str(tmp_path / "adapter")).merge_and_unload()
    expected = delta.apply_to(copy.deepcopy(full)).lm
    for (name, got), (_, want) in zip(merged.state_dict().items(), expected.state_dict().items()):
        assert torch.equal(got, want), name


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("lean", [False, True])
def test_no_quantized_layer_keeps_a_dense_copy_of_its_weight_for_the_backward(lean, scheme):
    # torchao's own forward under autograd saves each weight converted to the compute dtype (int8) or the
    # quantized weight itself (nf4); saftune's routes rebuild the dense copy in the backward instead, for
    # layers with trained entries and without, in both phases.
    lm, loss_fn, batches = _case(tie=False)
    q.quantize(lm, scheme)
    shapes = {tuple(p.shape) for p in lm.parameters() if q.is_quantized(p)}
    saved = []

    def pack(tensor):
        if tensor.is_floating_point() and not q.is_quantized(tensor):
            saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mask = saftune.select_mask(lm, loss_fn, batches, sparsity=0.001, lean=lean)
        trained_int8 = [n for n in mask.indices if q.is_quantized(lm.get_parameter(n))]
        assert 0 < len(trained_int8) < len(q.quantized_parameter_names(lm))  # layers with entries and without
        _train(lm, mask, loss_fn, batches, steps=1)
    assert saved and not shapes & set(saved)
    if scheme == "nf4":  # torchao's NF4 forward saves the 4-bit weight, not a dense copy: nothing to compare with
        return
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # what the routes prevent
        lm.lm.model.layers[0].mlp.down_proj.__dict__.pop("forward", None)
        loss_fn(lm, batches[0]).sum().backward()
    assert shapes & set(saved)


def test_a_copied_nf4_model_keeps_its_exact_4_bit_data():
    # torchao's NF4Tensor clones by quantizing its dequantized values again with groups of 256 (here failing:
    # 8 blocks); the grid's model cache copies the pretrained model for every run, so copies must be exact.
    lm = q.quantize(_case(tie=False)[0], "nf4")
    with pytest.raises(AssertionError):
        copy.deepcopy(lm)
    twin = q.copy_model(lm)
    for (name, p), (_, t) in zip(lm.named_parameters(), twin.named_parameters()):
        assert type(p.data) is type(t.data) and p.requires_grad == t.requires_grad, name
        for a, b in zip(q.stored_tensors(p), q.stored_tensors(t)):
            assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name
