"""SAFT inside an unchanged transformers.Trainer and trl.SFTTrainer (saftune.integrations.hf_trainer).

A tiny random Llama (tied embeddings, byte tokenizer, fp32, CPU) trains for 4 steps with checkpoints at
steps 2 and 4. Checked: only the selected entries move; checkpoints hold only the values; resuming from
step 2 ends bit for bit where the uninterrupted run ended; the saved delta rebuilds the trained model
from a fresh base; TRL's fused LM head sends the right gradient to the output embedding's entries.
"""

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, Trainer, TrainingArguments

from saftune.integrations.hf_trainer import TrainerSparseModel, prepare_for_trainer, sparsify_for_trainer
from saftune.models.tiny_lm import byte_tokenizer, tiny_lm_config
from saftune.sparse.delta import DeltaError, SparseDelta
from saftune.sparse.mask import SparseMask

SPARSITY = 0.01
ANIMALS = ["cat", "dog", "bird", "fox", "owl", "bee", "cow", "elk"]
PROMPTS = [f"Q: what does the {a} say? A:" for a in ANIMALS * 2]
ANSWERS = [f" the {a} says {a[::-1]}." for a in ANIMALS * 2]
# Common to both trainers: fp32, CPU, offline, checkpoints at steps 2 and 4.
ARGS = dict(max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2, save_strategy="steps", save_steps=2,
            logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0)
# TRL's SFTConfig sets the deprecated `gradient_checkpointing` alias: transformers warns, nothing of ours.
OLD_ALIAS = "ignore:`gradient_checkpointing` is deprecated:FutureWarning"
KINDS = ["trainer", pytest.param("sft", marks=pytest.mark.filterwarnings(OLD_ALIAS))]


def tiny_llama(seed: int = 0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(tiny_lm_config("llama"))


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("saftune_values")}


def build(kind: str, out: Path, *, mask: SparseMask | None = None, kernels: str = "auto", **args):
    """(model, trainer, saft, base weights): the README recipe for `kind`, phase 1 included; `args` override ARGS."""
    args = {**ARGS, **args}
    tokenizer = byte_tokenizer(pad_token=True)
    model = tiny_llama()
    base = snapshot(model)
    if kind == "trainer":
        data = [{"input_ids": tokenizer(p + a)["input_ids"]} for p, a in zip(PROMPTS, ANSWERS)]
        collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
        saft = (prepare_for_trainer(model, mask, kernels=kernels) if mask is not None
                else sparsify_for_trainer(model, data, collator, sparsity=SPARSITY, batch_size=4, kernels=kernels))
        trainer = Trainer(model=model, args=TrainingArguments(str(out), **args), train_dataset=data, data_collator=collator)
    else:
        trl = pytest.importorskip("trl")
        datasets = pytest.importorskip("datasets")
        data = datasets.Dataset.from_dict({"prompt": PROMPTS, "completion": ANSWERS})
        # SFTConfig's own defaults stay (gradient checkpointing on, completion-only loss), except bf16: fp32 here.
        config = trl.SFTConfig(str(out), max_length=64, **{"bf16": False, **args})
        trainer = trl.SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
        # SFTTrainer tokenizes the data and builds its collator itself: phase 1 takes what it built.
        saft = (prepare_for_trainer(trainer.model, mask, kernels=kernels) if mask is not None
                else sparsify_for_trainer(trainer.model, trainer.train_dataset, trainer.data_collator, sparsity=SPARSITY,
                                          batch_size=4, kernels=kernels))
    return model, trainer, saft, base


@pytest.fixture(scope="module", params=KINDS)
def run(request, tmp_path_factory):
    """One uninterrupted 4-step run per trainer, saved with trainer.save_model at the end."""
    out = tmp_path_factory.mktemp(request.param)
    model, trainer, saft, base = build(request.param, out / "run")
    trainer.train()
    trainer.save_model(str(out / "final"))
    return {"kind": request.param, "out": out, "model": model, "trainer": trainer, "saft": saft, "base": base}


def losses(trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def changed_entries(model, base, mask):
    """name -> (which entries differ from the base, which are selected), flat."""
    params = dict(model.named_parameters())
    out = {}
    for name, before in base.items():
        changed = (params[name].detach() != before).reshape(-1)
        selected = torch.zeros_like(changed)
        if name in mask.indices:
            selected[mask.indices[name]] = True
        out[name] = (changed, selected)
    return out


def test_only_the_selected_entries_change(run):
    model, saft, base = run["model"], run["saft"], run["base"]
    assert isinstance(saft, TrainerSparseModel) and saft.num_trainable == saft.mask.num_selected > 0
    for name, (changed, selected) in changed_entries(model, base, saft.mask).items():
        if name in saft.mask.indices:
            assert bool(changed[selected].all()), f"{name}: a selected entry did not train"
        assert not bool(changed[~selected].any()), f"{name}: an unselected entry changed"
    steps = losses(run["trainer"])
    assert sorted(steps) == [1, 2, 3, 4] and steps[4] < steps[1]


def test_checkpoints_hold_only_the_values(run):
    model_bytes = sum(p.numel() * p.element_size() for p in run["base"].values())
    d = run["saft"].num_trainable
    for step in (2, 4):
        checkpoint = run["out"] / "run" / f"checkpoint-{step}"
        files = {f: os.path.getsize(checkpoint / f) for f in os.listdir(checkpoint)}
        assert "config.json" not in files  # from_pretrained must not build a random model from a checkpoint
        with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
            keys = list(f.keys())
            assert all(k.startswith("saftune_values.") for k in keys)
            assert sum(f.get_tensor(k).numel() for k in keys if not k.endswith("mask_fingerprint")) == d
        # Everything that carries weights or optimizer state is O(d): values, delta, AdamW moments.
        weights = files["model.safetensors"] + files["delta.safetensors"] + files["optimizer.pt"]
        assert weights < 0.25 * model_bytes, (files, model_bytes)
        assert max(files.values()) < 0.25 * model_bytes, (files, model_bytes)
        assert SparseDelta.from_pretrained(checkpoint).num_entries == d  # every checkpoint is a delta directory


def test_saved_delta_rebuilds_the_trained_model(run):
    delta = SparseDelta.from_pretrained(run["out"] / "final")
    assert delta.config["method"] == "saft" and delta.config["sparsity"] == SPARSITY
    fresh = tiny_llama()
    delta.apply_to(fresh)
    trained = snapshot(run["model"])
    for name, p in fresh.named_parameters():
        assert torch.equal(p, trained[name]), name
    ids = torch.tensor([list(b"Q: what does the cat say? A:")])
    model = run["model"].eval()
    with torch.no_grad():
        assert torch.equal(fresh.eval()(ids).logits, model(ids).logits)


def test_resume_continues_exactly(run, tmp_path):
    # A run killed after step 2: its output directory holds checkpoint-2 only.
    shutil.copytree(run["out"] / "run" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    _, trainer, saft, _ = build(run["kind"], tmp_path / "resumed")  # phase 1 again: the same mask
    trainer.train(resume_from_checkpoint=True)
    expected, got = run["saft"].delta(), saft.delta()
    assert got.fingerprint == expected.fingerprint
    for name in expected.values:
        assert torch.equal(got.values[name], expected.values[name]), name
    # The history of steps 1-2 comes from the checkpoint; steps 3-4 were computed again.
    assert losses(trainer) == losses(run["trainer"])


def test_resume_with_another_mask_fails(run, tmp_path):
    # The same tensors and counts as the run's mask, other entries in one tensor: the value shapes all match.
    mask = run["saft"].mask
    indices = dict(mask.indices)
    name = next(iter(indices))
    free = torch.ones(run["base"][name].numel(), dtype=torch.bool)
    free[indices[name]] = False
    indices[name] = torch.nonzero(free).squeeze(1)[: indices[name].numel()]
    other = SparseMask(indices, mask.shapes)
    _, trainer, _, _ = build(run["kind"], tmp_path / "other", mask=other)
    with pytest.raises(DeltaError, match="another mask"):
        trainer.train(resume_from_checkpoint=str(run["out"] / "run" / "checkpoint-2"))


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_autocast_gradient_accumulation_and_dense_hooks(kind, tmp_path):
    """Mixed precision (CPU bf16 autocast; fp32 weights and values), 2 accumulated micro-batches per step, and the
    engine's dense-gradient hooks instead of its kernels (kernels="off")."""
    model, trainer, saft, base = build(kind, tmp_path, kernels="off", bf16=True, gradient_accumulation_steps=2,
                                       per_device_train_batch_size=2, save_strategy="no")
    assert f"hook={len(saft.mask.indices)}" in repr(saft.sparse_model)
    trainer.train()
    for name, (changed, selected) in changed_entries(model, base, saft.mask).items():
        assert not bool(changed[~selected].any()), name
    params = dict(model.named_parameters())
    assert all(v.dtype == torch.float32 for v in saft.sparse_model.trainable_parameters())
    assert sum(bool((params[n].detach() != base[n]).any()) for n in saft.mask.indices) == len(saft.mask.indices)
    saft.delta().apply_to(tiny_llama())  # the delta fits the base model


@pytest.mark.filterwarnings(OLD_ALIAS)
def test_fused_lm_head_gradient_matches_dense_autograd(tmp_path):
    """SFTTrainer's fused LM head reads lm_head.weight directly; the tied embedding's entries still get their full gradient."""
    name = "model.embed_tokens.weight"  # tied with lm_head.weight
    # Rows of bytes that never occur in the data (only the LM head gives them a gradient) and of common ones.
    rows = torch.tensor([ord("e"), ord(" "), 200, 250])
    mask = SparseMask({name: (rows[:, None] * 32 + torch.arange(0, 32, 5)).reshape(-1)}, {name: (259, 32)})
    model, trainer, saft, _ = build("sft", tmp_path, mask=mask)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    model.train()
    model(**batch, use_cache=False, fused_lm_head=True).loss.backward()  # what SFTTrainer.compute_loss runs
    values = dict(saft.sparse_model.named_trainable_parameters())[name]

    reference = tiny_llama()
    reference(**batch, use_cache=False).loss.backward()  # dense autograd through the model's own loss
    expected = reference.get_parameter(name).grad.reshape(-1)[mask.indices[name]]
    torch.testing.assert_close(values.grad, expected, rtol=1e-4, atol=1e-7)
    assert bool((expected[-14:] != 0).all())  # rows 200 and 250: gradient from the LM head only
    assert model.get_parameter(name).grad is None  # the dense gradient was gathered and freed


def test_merge_and_unload_gives_a_plain_model(tmp_path):
    model, trainer, saft, base = build("trainer", tmp_path / "run")
    trainer.train()
    trained = snapshot(model)
    merged = saft.merge_and_unload()
    assert merged is model and not any(n.startswith("saftune_values") for n in merged.state_dict())
    assert "save_pretrained" not in merged.__dict__
    assert all(p.requires_grad for p in merged.parameters())
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    for name, p in reloaded.named_parameters():
        assert torch.equal(p, trained[name]), name
    assert not torch.equal(trained["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


def test_loading_weights_without_values_fails():
    model = tiny_llama()
    prepare_for_trainer(model, SparseMask({"model.norm.weight": torch.tensor([1, 2])}, {"model.norm.weight": (32,)}))
    with pytest.raises(DeltaError, match="no saftune values"):
        model.load_state_dict(tiny_llama(seed=1).state_dict(), strict=False)


def test_phase1_needs_labels():
    data = [{"input_ids": [1, 2, 3, 4]}] * 4  # default_data_collator adds no labels
    with pytest.raises(ValueError, match="labels"):
        sparsify_for_trainer(tiny_llama(), data, sparsity=SPARSITY, batch_size=2)


def test_refuses_a_plain_module_and_a_second_preparation():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        prepare_for_trainer(torch.nn.Linear(2, 2), SparseMask({"weight": torch.tensor([0])}, {"weight": (2, 2)}))
    model = tiny_llama()
    mask = SparseMask({"model.norm.weight": torch.tensor([1])}, {"model.norm.weight": (32,)})
    prepare_for_trainer(model, mask)
    with pytest.raises(ValueError, match="already prepared"):
        prepare_for_trainer(model, mask)


def test_moving_the_model_after_preparation_fails_clearly():
    model = tiny_llama()
    prepare_for_trainer(model, SparseMask({"model.norm.weight": torch.tensor([1])}, {"model.norm.weight": (32,)}))
    model.to("meta")  # as Trainer would move a CPU model to the GPU
    with pytest.raises(RuntimeError, match="move it to its device first"):
        model(torch.tensor([[1, 2]], device="meta"))
