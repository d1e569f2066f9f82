"""Fine-tuning methods on causal LMs through the library API: SAFT (select_mask + sparsify, and the `saft`
method), full fine-tuning (`ft`), and `bitfit`'s refusal of a model without biases."""

import pytest
import torch

import saftune
from saftune import SparseDelta
from saftune.data.llm import collate_sft, encode_sft, sft_loss
from saftune.methods import create_method
from saftune.methods.base import PrepareContext
from saftune.models.tiny_lm import tiny_causal_lm

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
