"""Fine-tuning methods on causal LMs (tiny Llama and GPT-2) through the library API: every method changes only
what it may; SAFT (select_mask + sparsify, the `saft` method, random masks, scopes and budgets), logit
distillation (`kd`), the penalties to the pretrained weights (`l1`, `l2sp`), WiSE-FT whole-model and per
layer, LoRA on Conv1D and Linear projections, `bitfit`'s refusal of a model without biases, training keys."""

import pytest
import torch

import saftune
from saftune import SparseDelta
from saftune.data.base import Split
from saftune.data.llm import collate_sft, encode_sft, sft_loss
from saftune.methods import create_method
from saftune.methods.base import PrepareContext
from saftune.models.tiny_lm import tiny_causal_lm
from saftune.train import TrainConfig, fit

PAIRS = [
    ("Capital of France?", " Paris"), ("Capital of Italy?", " Rome"), ("2 + 2 =", " 4"),
    ("Colour of the sky?", " blue"), ("Opposite of hot?", " cold"), ("Plural of mouse?", " mice"),
]


def _batches(lm, size=3):
    encoded = encode_sft(lm, PAIRS)
    rows = list(zip(encoded.input_ids, encoded.answer_starts))
    return [collate_sft(rows[i: i + size], pad_id=lm.tokenizer.pad_token_id) for i in range(0, len(rows), size)]


def _mean_loss(lm, batches):
    with torch.no_grad():
        return float(torch.cat([sft_loss(lm, b) for b in batches]).mean())


def _snapshot(lm):
    return {n: p.detach().clone() for n, p in lm.named_parameters()}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_saft_with_the_sft_loss_changes_exactly_the_selected_entries(arch):
    lm = tiny_causal_lm(arch, seed=0)
    batches = _batches(lm)
    before, start_loss = _snapshot(lm), _mean_loss(lm, batches)
    mask = saftune.select_mask(lm, sft_loss, batches, sparsity=0.02, progress=False)
    assert mask.num_selected == int(0.02 * sum(p.numel() for p in lm.parameters()))
    sm = saftune.sparsify(lm, mask)
    opt = torch.optim.AdamW(sm.trainable_parameters(), lr=2e-2, weight_decay=0.1)
    for step in range(12):
        opt.zero_grad()
        sft_loss(lm, batches[step % len(batches)]).mean().backward()
        opt.step()
    assert _mean_loss(lm, batches) < start_loss - 0.1
    for name, p in lm.named_parameters():
        changed = (p.detach() != before[name]).reshape(-1).nonzero()[:, 0]
        selected = mask.indices.get(name, torch.empty(0, dtype=torch.long))
        assert set(changed.tolist()) <= set(selected.tolist()), name
    assert sum(int((p.detach() != before[n]).sum()) for n, p in lm.named_parameters()) > 0.9 * mask.num_selected


def _train(method, lm, batches, steps=10):
    method.prepare(lm, PrepareContext(batches=lambda: iter(batches)))
    opt = torch.optim.AdamW(method.parameter_groups(lm), lr=method.config.lr)
    lm.train()
    for step in range(steps):
        opt.zero_grad()
        terms = method.training_step(lm, batches[step % len(batches)])
        sum(terms.values()).backward()
        opt.step()
    lm.eval()
    return terms


def test_saft_method_trains_a_causal_lm_and_saves_a_delta_that_reproduces_it(tmp_path):
    lm = tiny_causal_lm("llama", seed=1)
    batches = _batches(lm)
    before, start_loss = _snapshot(lm), _mean_loss(lm, batches)
    method = create_method("saft", sparsity="0.01", lr="2e-2")
    terms = _train(method, lm, batches)
    assert set(terms) == {"ce_loss"}
    assert _mean_loss(lm, batches) < start_loss - 0.05
    changed = sum(int((p.detach() != before[n]).sum()) for n, p in lm.named_parameters())
    assert 0 < changed <= method.mask.num_selected == int(0.01 * sum(p.numel() for p in lm.parameters()))
    method.save_result(lm, tmp_path / "delta", {"method": "saft", "base_model": "tiny-llama seed 1"})
    base = tiny_causal_lm("llama", seed=1)
    SparseDelta.from_pretrained(tmp_path / "delta").apply_to(base)
    assert _mean_loss(base, batches) == _mean_loss(lm, batches)


def test_full_finetuning_trains_every_parameter_and_keeps_embeddings_tied():
    lm = tiny_causal_lm("llama", seed=2)
    batches = _batches(lm)
    before, start_loss = _snapshot(lm), _mean_loss(lm, batches)
    _train(create_method("ft", lr="1e-2"), lm, batches)
    assert _mean_loss(lm, batches) < start_loss - 0.5
    assert all(not torch.equal(p, before[n]) for n, p in lm.named_parameters())
    assert lm.lm.lm_head.weight is lm.lm.model.embed_tokens.weight


def test_bitfit_refuses_a_model_without_biases_and_trains_gpt2_biases_only():
    llama = tiny_causal_lm("llama")
    with pytest.raises(ValueError, match="bitfit trains biases, but LlamaForCausalLM has no bias parameters; choose"):
        create_method("bitfit").prepare(llama, PrepareContext(batches=lambda: iter(_batches(llama))))
    gpt2 = tiny_causal_lm("gpt2", seed=3)
    batches = _batches(gpt2)
    before = _snapshot(gpt2)
    _train(create_method("bitfit", lr="1e-2"), gpt2, batches, steps=3)
    changed = {n for n, p in gpt2.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.endswith("bias") for n in changed)


def test_collate_builds_sft_batches_from_pairs():
    lm = tiny_causal_lm("gpt2")
    batch = lm.collate(PAIRS[:2])
    assert torch.equal(batch["targets"], _batches(lm, size=2)[0]["targets"])
    assert torch.equal(lm.loss(batch), sft_loss(lm, batch))


@pytest.mark.parametrize("scope", ["attention", "mlp", "embeddings"])
def test_saft_scopes_of_a_causal_lm_select_inside_the_scope(scope):
    lm = tiny_causal_lm("gpt2", seed=4)
    method = create_method("saft", sparsity="0.05", scope=scope)
    method.prepare(lm, PrepareContext(batches=lambda: iter(_batches(lm))))
    allowed = lm.scope_parameters(scope)
    assert method.mask.num_selected > 0 and set(method.mask.indices) <= set(allowed)
    assert method.mask.num_candidates == sum(p.numel() for p in allowed.values())


def test_a_classifier_scope_on_a_causal_lm_is_refused():
    lm = tiny_causal_lm("llama")
    with pytest.raises(ValueError, match="scope 'image' is not defined for CausalLM; choose from all, attention, mlp"):
        create_method("saft", scope="image").prepare(lm, PrepareContext(batches=lambda: iter(_batches(lm))))


def test_lora_adapts_every_linear_projection_of_a_llama_but_not_its_head():
    from saftune.methods.lora import default_targets

    lm = tiny_causal_lm("llama", seed=5)
    targets = default_targets(lm)
    assert "lm.lm_head" not in targets and len(targets) == 2 * 7  # q, k, v, o, gate, up, down per layer
    batches = _batches(lm)
    before, start_loss = _snapshot(lm), _mean_loss(lm, batches)
    method = create_method("lora", lr="1e-2")
    _train(method, lm, batches, steps=8)
    assert _mean_loss(lm, batches) < start_loss - 0.05
    base = {n.replace(".base_layer", ""): p for n, p in lm.named_parameters() if "lora_" not in n}
    assert all(torch.equal(base[n], before[n]) for n in before)  # the pretrained weights stay frozen


# ------------------------------------------------------------------------------------------- every method, both archs
ARCHS = ["llama", "gpt2"]
SPLIT_PAIRS = Split("toy-sft", PAIRS, [0] * len(PAIRS))  # labels are unused by a causal LM
LLM_METHODS = {  # learning rates large enough for a few steps on a tiny random model
    "ft": {"lr": 1e-2}, "l1": {"lr": 1e-2, "strength": 1e-4}, "l2sp": {"lr": 1e-2, "strength": 0.1},
    "kd": {"lr": 1e-2}, "wiseft": {"lr": 1e-2, "alphas": [0.0, 0.5, 1.0]}, "lora": {"lr": 1e-2, "rank": 4},
    "saft": {"lr": 1e-2, "sparsity": 0.05}, "bitfit": {"lr": 1e-2},
}


def _fit(lm, name, options, epochs=4):
    method = create_method(name, options)
    fit(lm, method, SPLIT_PAIRS, TrainConfig(epochs=epochs, batch_size=3, progress=False))
    return method


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", list(LLM_METHODS))
def test_every_method_trains_a_causal_lm_and_changes_only_what_it_may(name, arch):
    # Llama has no biases: bitfit runs on the Llama variant that has them (its refusal is tested above).
    lm = tiny_causal_lm(arch, seed=7, bias=name == "bitfit")
    batches = _batches(lm)
    before, start_loss = _snapshot(lm), _mean_loss(lm, batches)
    method = _fit(lm, name, LLM_METHODS[name])
    assert _mean_loss(lm, batches) < start_loss - 0.1, name
    # PEFT moves an adapted layer's own weights to "<layer>.base_layer.<name>": compare them as the originals
    after = {n.replace(".base_layer", ""): p.detach() for n, p in lm.named_parameters() if "lora_" not in n}
    assert set(after) == set(before)
    moved = {n: float((after[n] - before[n]).abs().max()) for n in before}
    if name == "lora":
        adapters = {n: p for n, p in lm.named_parameters() if "lora_" in n}
        assert not any(moved.values()) and adapters and all(p.requires_grad for p in adapters.values())
        assert min(float(p.detach().abs().max()) for n, p in adapters.items() if "lora_B" in n) > 1e-3  # B starts at 0
    elif name == "saft":
        for n, p in before.items():
            frozen = ~method.mask.boolean(n)
            assert torch.equal(after[n][frozen], p[frozen]), n
        changed = sum(int((after[n] != before[n]).sum()) for n in before)
        assert 0.9 * method.mask.num_selected < changed <= method.mask.num_selected
    elif name == "bitfit":
        assert all(moved[n] > 1e-3 for n in before if n.endswith("bias"))
        assert all(moved[n] == 0 for n in before if not n.endswith("bias"))
    else:  # ft, l1, l2sp, kd, wiseft: every tensor trains, each by a real amount
        assert min(moved.values()) > 1e-3, min(moved, key=moved.get)
    assert lm.tied_embeddings  # no method unties the embeddings


# ------------------------------------------------------------------------------------------- kd
def _hand_kl(student, teacher, batch):
    """KL(teacher || student) at the answer positions from the full logits in float64, per-example mean, batch mean."""
    with torch.no_grad():
        s = student.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
        t = teacher.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    per_example = []
    for b in range(batch["input_ids"].shape[0]):
        positions = [i for i in range(batch["input_ids"].shape[1] - 1) if batch["targets"][b, i + 1] != -100]
        kls = []
        for i in positions:
            p0, p = t[b, i].softmax(-1), s[b, i].softmax(-1)
            kls.append(float((p0 * (p0.log() - p.log())).sum()))
        per_example.append(sum(kls) / len(kls))
    return sum(per_example) / len(per_example)


@pytest.mark.parametrize("arch", ARCHS)
def test_kd_on_a_causal_lm_is_the_next_token_kl_to_the_frozen_pretrained_model(arch):
    lm = tiny_causal_lm(arch, seed=8)
    batch = _batches(lm)[0]
    method = create_method("kd", strength="0.7")
    method.prepare(lm, PrepareContext(batches=lambda: iter(_batches(lm))))
    teacher = method.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    lm.train()
    params = [p for p in lm.parameters()]

    # Step 0: the student is the teacher: the KL term and its gradient vanish; the SFT loss is the usual one.
    terms = method.training_step(lm, batch)
    assert set(terms) == {"ce_loss", "kd_loss"}
    assert abs(float(terms["kd_loss"].detach())) < 1e-7
    grads = torch.autograd.grad(terms["kd_loss"], params, retain_graph=True)
    assert max(float(g.abs().max()) for g in grads) < 1e-7
    torch.testing.assert_close(terms["ce_loss"], sft_loss(lm, batch).mean())
    assert float(torch.autograd.grad(terms["ce_loss"], params[0])[0].abs().max()) > 1e-4  # the SFT loss does train

    # After a perturbation: 0.7 * the KL computed by hand from full-vocabulary logits at every scored position.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(torch.randn(p.shape, generator=generator), alpha=0.05)
    kd = float(method.training_step(lm, batch)["kd_loss"].detach())
    expected = 0.7 * _hand_kl(lm, tiny_causal_lm(arch, seed=8), batch)  # the teacher is the pretrained model
    assert expected > 1e-3
    assert kd == pytest.approx(expected, rel=1e-4)
    assert all(torch.equal(p, q) for p, q in zip(teacher.parameters(), tiny_causal_lm(arch, seed=8).parameters()))


def test_kd_keeps_a_causal_lm_nearer_its_pretrained_distribution_than_plain_finetuning():
    kls = {}
    for name, options in [("ft", {"lr": 1e-2}), ("kd", {"lr": 1e-2, "strength": 5.0})]:
        lm = tiny_causal_lm("llama", seed=9)
        _fit(lm, name, options, epochs=6)
        kls[name] = _hand_kl(lm, tiny_causal_lm("llama", seed=9), _batches(lm)[0])
    assert kls["kd"] < 0.5 * kls["ft"]


# ------------------------------------------------------------------------------------------- l1, l2sp
# Moves of three pretrained values: one entry of the tied embedding (also the output head), one entry of a
# block's weight, and every entry of the final norm's weight (32 of them).
MOVES = {"llama": ("lm.model.embed_tokens.weight", "lm.model.layers.1.mlp.down_proj.weight", "lm.model.norm.weight"),
         "gpt2": ("lm.transformer.wte.weight", "lm.transformer.h.1.mlp.c_proj.weight", "lm.transformer.ln_f.weight")}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", ["l1", "l2sp"])
def test_penalty_to_the_pretrained_weights_counts_a_tied_embedding_once(name, arch):
    lm = tiny_causal_lm(arch, seed=10)
    method = create_method(name, strength="0.3")
    method.prepare(lm, PrepareContext(batches=lambda: iter(_batches(lm))))
    assert float(method.penalty(lm).detach()) == 0.0
    embedding, block, norm = MOVES[arch]
    params = dict(lm.named_parameters())
    with torch.no_grad():
        params[embedding][104, 3] += 0.5
        params[block][0, 0] -= 0.25
        params[norm] += 0.1
    assert lm.lm.get_output_embeddings().weight is params[embedding]  # the head uses the moved entry too
    if name == "l1":
        expected = 0.3 * (0.5 + 0.25 + 32 * 0.1)
    else:
        expected = 0.3 * (0.5 ** 2 + 0.25 ** 2 + 32 * 0.1 ** 2)
    terms = method.training_step(lm, _batches(lm)[0])
    assert set(terms) == {"ce_loss", f"{name}_loss"}
    assert float(terms[f"{name}_loss"].detach()) == pytest.approx(expected, rel=1e-5)
    # Its gradient: 0.3 * sign(delta) (l1) or 0.3 * 2 * delta (l2), at the moved entries only.
    terms[f"{name}_loss"].backward()
    grads = {n: p.grad for n, p in lm.named_parameters()}
    scale = {"l1": lambda d: 0.3 * torch.sign(d), "l2sp": lambda d: 0.6 * d}[name]
    for n, p in lm.named_parameters():
        torch.testing.assert_close(grads[n], scale(p.detach() - method.anchor[n]), rtol=1e-5, atol=1e-7)
    assert float(grads[embedding][104, 3]) == pytest.approx(0.3, rel=1e-5)  # 0.3 * 1 (l1), 0.3 * 2 * 0.5 (l2)
    assert int((grads[embedding] != 0).sum()) == 1  # one tensor, one gradient: not doubled by the head


def test_distance_to_anchor_matches_the_per_tensor_sums_and_their_gradients():
    from saftune.methods.l2sp import distance_to_anchor

    generator = torch.Generator().manual_seed(1)
    shapes = [(3, 4), (5,), (2, 2, 2)]
    params = [torch.randn(shape, generator=generator, dtype=torch.float64, requires_grad=True) for shape in shapes]
    anchors = [torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in params]
    for norm, reference in [("l1", lambda d: d.abs().sum()), ("l2", lambda d: d.square().sum())]:
        value = distance_to_anchor(params, anchors, norm)
        expected = sum(reference(p - a) for p, a in zip(params, anchors))
        torch.testing.assert_close(value.double(), expected.detach(), rtol=1e-6, atol=0)
        assert torch.autograd.gradcheck(lambda *ps: distance_to_anchor(list(ps), anchors, norm), params)  # noqa: B023
    with pytest.raises(ValueError, match="norm must be one of l1, l2; got 'l3'"):
        distance_to_anchor(params, anchors, "l3")



# ------------------------------------------------------------------------------------------- wiseft
@pytest.mark.parametrize("arch", ARCHS)
def test_wiseft_on_a_causal_lm_gives_the_pretrained_weights_at_0_and_the_finetuned_at_1(arch):
    lm = tiny_causal_lm(arch, seed=11)
    pretrained = _snapshot(lm)
    method = _fit(lm, "wiseft", {"lr": 1e-2, "alpha": 0.5})
    reference = tiny_causal_lm(arch, seed=11)
    _fit(reference, "ft", {"lr": 1e-2})
    finetuned = _snapshot(reference)
    method.interpolate(lm, 0.0)
    assert all(torch.equal(p, pretrained[n]) for n, p in lm.named_parameters())
    method.interpolate(lm, 1.0)
    assert all(torch.equal(p, finetuned[n]) for n, p in lm.named_parameters())
    assert min(float((finetuned[n] - pretrained[n]).abs().max()) for n in pretrained) > 1e-3
    method.interpolate(lm, 0.25)
    for n, p in lm.named_parameters():
        torch.testing.assert_close(p.detach(), 0.75 * pretrained[n] + 0.25 * finetuned[n])


def _group_of(lm, name, groups):
    """Expected group (bottom 0) of a parameter by its name alone, for 6 blocks."""
    index = lm.layer_index(name)
    return 0 if index < 0 else groups - 1 if index >= 6 else index * groups // 6


@pytest.mark.parametrize("arch,tie", [("llama", True), ("llama", False), ("gpt2", True)])
def test_wiseft_per_layer_profile_moves_each_group_by_its_own_alpha(arch, tie):
    lm = tiny_causal_lm(arch, seed=12, layers=6, tie=tie)
    pretrained = _snapshot(lm)
    method = _fit(lm, "wiseft", {"lr": 1e-2, "layer_alphas": [[0.0, 0.0, 1.0], [1.0, 0.5, 0.0]]})
    method.interpolate(lm, 1.0)
    finetuned = _snapshot(lm)

    method.interpolate_layers(lm, [0.0, 0.0, 1.0])
    top = {n for n in pretrained if _group_of(lm, n, 3) == 2}
    blocks = {lm.layer_index(n) for n in top}
    assert blocks == {4, 5, 6}  # blocks 4-5 and what sits above them (final norm): index 6
    assert ("lm.lm_head.weight" in top) == (not tie)  # an untied head sits with the top group
    for n, p in lm.named_parameters():
        assert torch.equal(p, finetuned[n] if n in top else pretrained[n]), n

    method.interpolate_layers(lm, [1.0, 0.5, 0.0])
    embedding = next(n for n in pretrained if "embed_tokens" in n or "wte" in n)
    assert torch.equal(dict(lm.named_parameters())[embedding], finetuned[embedding])  # embeddings: the bottom group
    for n, p in lm.named_parameters():
        alpha = [1.0, 0.5, 0.0][_group_of(lm, n, 3)]
        torch.testing.assert_close(p.detach(), torch.lerp(pretrained[n], finetuned[n], alpha), rtol=0, atol=1e-7)


def test_layer_groups_are_contiguous_and_cover_every_block():
    from saftune.methods.wiseft import layer_groups

    lm = tiny_causal_lm("llama", layers=7)
    names = [n for n, _ in lm.named_parameters()]
    groups = layer_groups(lm, names, 3)
    per_block = {lm.layer_index(n): g for n, g in groups.items()}
    assert per_block == {-1: 0, 0: 0, 1: 0, 2: 0, 3: 1, 4: 1, 5: 2, 6: 2, 7: 2}
    assert set(layer_groups(lm, names, 1).values()) == {0}
    with pytest.raises(ValueError, match="profile has 8 alphas but CausalLM has 7 transformer blocks: give between 1 and 7"):
        layer_groups(lm, names, 8)


def test_wiseft_chooses_a_layer_profile_on_validation_and_records_its_curve():
    from saftune.record import RunRecord

    lm = tiny_causal_lm("gpt2", seed=13, layers=3)
    pretrained = _snapshot(lm)
    profiles = [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.5, 0.5]]
    method = _fit(lm, "wiseft", {"lr": 1e-2, "alphas": [0.0, 1.0], "layer_alphas": profiles, "choose_layer_alphas": True})
    finetuned = {n: t.clone() for n, t in method.end.items()}
    top, bottom = "lm.transformer.ln_f.weight", "lm.transformer.wte.weight"

    def val(model):  # best: the top group fine-tuned and the bottom pretrained, i.e. [0, 0, 1]
        params = {n: p.detach() for n, p in model.named_parameters()}
        return -float((params[top] - finetuned[top]).abs().sum() + (params[bottom] - pretrained[bottom]).abs().sum())

    method.choose_after_training(lm, val)
    assert method.layer_alphas == [0.0, 0.0, 1.0] and method.alpha is None
    assert torch.equal(dict(lm.named_parameters())[top], finetuned[top])
    evaluated = []
    fields = method.evaluate_extra(lm, lambda m: evaluated.append(1) or {"id": val(m)}, {"id": val(lm)})
    assert len(evaluated) == 2 + 2  # two alphas, two profiles; the reported profile is not evaluated again
    assert [p["layer_alphas"] for p in fields["wiseft_layer_curve"]] == profiles
    assert fields["wiseft_layer_curve"][1]["id"] == 0.0 == max(p["id"] for p in fields["wiseft_layer_curve"])
    assert fields["wiseft_layer_alphas"] == [0.0, 0.0, 1.0] and fields["wiseft_alpha"] is None
    assert torch.equal(dict(lm.named_parameters())[top], finetuned[top])  # left at the reported profile
    record = RunRecord()
    record.add(fields, "wiseft.evaluate_extra")
    record.add(method.record_fields(lm), "wiseft.record_fields")
    assert record.to_dict()["wiseft_layer_alphas"] == [0.0, 0.0, 1.0]

    # Ties go to the smaller mean alpha, then to whole-model averaging; with choose_alpha, alphas compete too.
    method = create_method("wiseft", {"layer_alphas": [[1.0, 1.0, 1.0], [0.0, 0.5, 0.0], [0.0, 0.0, 0.5]],
                                      "choose_layer_alphas": True})
    method.prepare(lm, PrepareContext(batches=lambda: iter(_batches(lm))))
    method.finalize(lm)
    method.choose_after_training(lm, lambda m: 0.5)
    assert (method.alpha, method.layer_alphas) == (None, [0.0, 0.5, 0.0])
    method.config = method.config.replace(choose_alpha=True, alphas=[0.0, 1.0])
    method.choose_after_training(lm, lambda m: 0.5)
    assert (method.alpha, method.layer_alphas) == (0.0, None)


def test_wiseft_layer_options_are_checked():
    with pytest.raises(ValueError, match=r"profile \[0.0, 1.5\] must list one alpha in \[0, 1\] per group"):
        create_method("wiseft", {"layer_alphas": [[0.0, 1.5]]})
    with pytest.raises(ValueError, match="choose_layer_alphas needs profiles to choose from: set layer_alphas"):
        create_method("wiseft", {"choose_layer_alphas": True})
    lm = tiny_causal_lm("llama")  # two blocks: three groups cannot be formed, and it says so before training
    with pytest.raises(ValueError, match="has 3 alphas but CausalLM has 2 transformer blocks"):
        create_method("wiseft", {"layer_alphas": [[0, 0, 1]]}).prepare(lm, PrepareContext(batches=lambda: iter(())))
    from saftune.models import create

    encoder = create("tiny-sentence")
    with pytest.raises(ValueError, match="per-layer averaging .* needs a model made of transformer blocks"):
        create_method("wiseft", {"layer_alphas": [[0, 1]]}).prepare(encoder, PrepareContext(batches=lambda: iter(())))


# ------------------------------------------------------------------------------------------- lora
def _logits(lm, batch):
    with torch.no_grad():
        return lm({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_merged_into_a_causal_lm_gives_the_adapter_models_outputs(arch, tmp_path):
    from saftune.methods.lora import default_targets, merge_lora

    lm = tiny_causal_lm(arch, seed=14)
    targets = default_targets(lm)
    per_layer = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                 "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]}[arch]
    assert sorted(targets) == sorted(n for n, _ in lm.named_modules() if n.endswith(tuple(per_layer)))
    assert len(targets) == 2 * len(per_layer) and not any("lm_head" in t for t in targets)
    method = _fit(lm, "lora", {"lr": 1e-2, "rank": 4})
    assert method.peft_config.fan_in_fan_out == (arch == "gpt2")  # GPT-2's Conv1D stores weights as [in, out]
    batch = _batches(lm)[0]
    adapted = _logits(lm, batch)
    method.save_result(lm, tmp_path / "adapter", {"method": "lora"})
    base_logits = _logits(tiny_causal_lm(arch, seed=14), batch)
    assert float((adapted - base_logits).abs().max()) > 1e-2  # the adapters changed the outputs

    merge_lora(lm)
    assert not any("lora_" in n for n, _ in lm.named_parameters())
    torch.testing.assert_close(_logits(lm, batch), adapted, rtol=1e-4, atol=1e-5)
    loaded = tiny_causal_lm(arch, seed=14)
    type(method).apply_result(loaded, tmp_path / "adapter", {}, merge=True)
    torch.testing.assert_close(_logits(loaded, batch), adapted, rtol=1e-4, atol=1e-5)
    assert loaded.lm.lm_head.weight is loaded.lm.get_input_embeddings().weight


# ------------------------------------------------------------------------------------------- saft variants
@pytest.mark.parametrize("score,scope,budget", [
    ("random", "all", "global"), ("random", "attention", "per_row"), ("random", "embeddings", "per_tensor"),
    ("grad", "attention", "per_row"), ("grad", "mlp", "per_tensor"), ("grad", "embeddings", "global"),
])
def test_saft_scores_scopes_and_budgets_on_a_tied_llama_train_only_the_selected_entries(score, scope, budget):
    lm = tiny_causal_lm("llama", seed=15)
    before, start_loss = _snapshot(lm), _mean_loss(lm, _batches(lm))
    method = create_method("saft", lr="1e-2", sparsity="0.05", score=score, scope=scope, budget=budget)
    fit(lm, method, SPLIT_PAIRS, TrainConfig(epochs=4, batch_size=3, progress=False, seed=3))
    mask = method.mask
    allowed = dict(lm.named_parameters()) if scope == "all" else lm.scope_parameters(scope)
    candidates = sum(p.numel() for p in allowed.values())  # named_parameters: the tied embedding once
    if scope in ("all", "embeddings"):
        assert "lm.model.embed_tokens.weight" in allowed and "lm.lm_head.weight" not in dict(lm.named_parameters())
    assert mask.num_candidates == candidates and mask.num_selected == int(0.05 * candidates)
    assert set(mask.indices) <= set(allowed)
    for n, idx in mask.indices.items():
        shape = before[n].shape
        if budget == "per_row" and len(shape) == 2:  # GPS: the same count for every output unit (row)
            counts = torch.bincount(idx // shape[1], minlength=shape[0])
            assert int(counts.max() - counts.min()) <= 1, n
        if budget == "per_tensor":  # SIFT: each tensor's share in proportion to its size
            assert abs(idx.numel() - 0.05 * before[n].numel()) <= 1, n
    changed = 0
    for n, p in lm.named_parameters():
        if n not in allowed:  # outside the scope: untouched
            assert torch.equal(p, before[n]), n
            continue
        frozen = ~mask.boolean(n)
        assert torch.equal(p.detach()[frozen], before[n][frozen]), n
        changed += int((p.detach() != before[n]).sum())
    assert 0.9 * mask.num_selected < changed <= mask.num_selected
    assert _mean_loss(lm, _batches(lm)) < start_loss


def test_saft_random_mask_is_seeded_and_as_large_as_the_gradient_mask():
    def selected(score, seed):
        lm = tiny_causal_lm("llama", seed=16)
        method = create_method("saft", sparsity="0.02", score=score)
        method.prepare(lm, PrepareContext(batches=lambda: iter(_batches(lm)), seed=seed))
        return {(n, i) for n, idx in method.mask.indices.items() for i in idx.tolist()}

    first, again, other, grad = selected("random", 1), selected("random", 1), selected("random", 2), selected("grad", 1)
    assert first == again and first != other
    assert len(first) == len(other) == len(grad) == int(0.02 * sum(p.numel() for p in tiny_causal_lm("llama").parameters()))
    assert len(first & grad) < 0.2 * len(grad)  # random, not the gradient's choice


# ------------------------------------------------------------------------------------------- training keys
def test_training_keys_share_only_identical_trainings():
    key = lambda name, **options: create_method(name, options).training_key()  # noqa: E731
    # WiSE-FT trains its base method; how the result is mixed afterwards does not change the training.
    assert key("wiseft", lr=1e-3) == key("ft", lr=1e-3) is not None
    assert key("wiseft", lr=1e-3, alpha=0.2, layer_alphas=[[0, 0, 1]], choose_layer_alphas=True) == key("ft", lr=1e-3)
    assert key("wiseft", base="saft", lr=1e-3, base_options={"sparsity": 0.05}) == key("saft", lr=1e-3, sparsity=0.05)
    assert key("wiseft", base="saft", base_options={"score": "random"}) != key("saft")
    assert key("ft", lr=1e-3) != key("ft", lr=2e-3) and key("ft", weight_decay=0.0) != key("ft")
    # The penalties and distillation give no key: never shared, through WiSE-FT neither (tests/test_reuse.py relies on it).
    for name in ("l1", "l2sp", "kd"):
        assert key(name) is None and key("wiseft", base=name) is None
