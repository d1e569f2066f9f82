"""The lean phase 1 (`saftune.sparse.blockwise`): the one-pass mask, with one block's fp32 sums at a time."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import saftune
import tiny
from saftune.data.base import Split
from saftune.methods import create_method
from saftune.models.tiny_lm import tiny_causal_lm
from saftune.sparse import blockwise
from saftune.sparse.blockwise import find_blocks, select_mask_by_block
from saftune.train import TrainConfig, fit


def _lm_case(arch: str, tie: bool, dtype=torch.float32, layers: int = 3, seed: int = 0):
    lm = tiny_causal_lm(arch, layers=layers, tie=tie, seed=seed)
    lm.lm.to(dtype)
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(5):
        ids = torch.randint(0, 256, (3, 10), generator=generator)
        attention = torch.ones_like(ids)
        attention[0, 7:] = 0  # one padded row: the attention mask is among what the blocks are called with
        batches.append((ids, attention))

    def loss_fn(model, batch):
        ids, attention = batch
        logits = model.lm(input_ids=ids, attention_mask=attention, use_cache=False).logits.float()
        return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(1)

    return lm, loss_fn, batches


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_lean_phase_1_selects_the_one_pass_mask(arch, tie, dtype):
    if tie and dtype == torch.bfloat16:
        pytest.skip("tested below: a tied embedding's two gradients are added in fp32 here, in bf16 in one pass")
    lm, loss_fn, batches = _lm_case(arch, tie, dtype)
    for budget, sparsity, chunk in (("global", 0.01, None), ("per_tensor", 0.2, 2)):
        # chunks of 2, 2 and 1 batches: the sums wait on disk twice
        one_pass = saftune.select_mask(lm, loss_fn, batches, sparsity=sparsity, budget=budget)
        lean = saftune.select_mask(lm, loss_fn, batches, sparsity=sparsity, budget=budget, lean=True,
                                   chunk_batches=chunk)
        assert lean == one_pass, (budget, sparsity, chunk)
        assert lean.meta == one_pass.meta


def test_a_tied_bf16_embedding_differs_from_one_pass_only_where_bf16_rounding_can_reorder_it():
    # One pass adds the output projection's and the input embedding's gradients into `.grad` in bf16, then
    # into the fp32 sum; the lean phase 1 adds each into the fp32 sum, the more exact of the two.
    lm, loss_fn, batches = _lm_case("llama", tie=True, dtype=torch.bfloat16)
    one_pass = saftune.select_mask(lm, loss_fn, batches, sparsity=0.01)
    lean = saftune.select_mask(lm, loss_fn, batches, sparsity=0.01, lean=True)
    assert lean.num_selected == one_pass.num_selected
    assert lean.overlap(one_pass) > 0.98  # the global threshold moves a little: other tensors may differ too


def test_a_bert_encoder_and_a_checkpointed_llama_select_the_one_pass_mask():
    case = tiny.bert()
    assert saftune.select_mask(case.model, case.loss_fn, case.batches, sparsity=0.01, lean=True) == \
        saftune.select_mask(case.model, case.loss_fn, case.batches, sparsity=0.01)
    lm, loss_fn, batches = _lm_case("llama", tie=False, layers=4)
    lm.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.train()
    assert saftune.select_mask(lm, loss_fn, batches, sparsity=0.05, lean=True) == \
        saftune.select_mask(lm, loss_fn, batches, sparsity=0.05)
    assert lm.lm.training  # scoring mode restored


def test_one_block_or_the_tensors_outside_the_blocks_hold_sums_at_once(monkeypatch):
    # The tied embedding's sums (head and stem stages) wait on disk while the blocks are scored.
    peak = {"numel": 0}

    class Counting(dict):
        def __setitem__(self, key, value):
            super().__setitem__(key, value)
            peak["numel"] = max(peak["numel"], sum(t.numel() for t in self.values()))

    original = blockwise._GradientAccumulator

    class CountingAccumulator(original):
        def __init__(self, params, square):
            super().__init__(params, square)
            self.sums = Counting()

    monkeypatch.setattr(blockwise, "_GradientAccumulator", CountingAccumulator)
    lm, loss_fn, batches = _lm_case("llama", tie=True, layers=6)
    lean = select_mask_by_block(lm, loss_fn, batches, sparsity=0.01)
    _, layers = find_blocks(lm)
    block = sum(p.numel() for p in layers[0].parameters())
    outside = sum(p.numel() for p in lm.lm.parameters()) - len(layers) * block
    assert peak["numel"] <= max(block, outside) < block + outside
    assert peak["numel"] < 0.5 * sum(p.numel() for p in lm.parameters())  # one pass: all of them
    assert lean == saftune.select_mask(lm, loss_fn, batches, sparsity=0.01)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_stem_stage_adds_the_embeddings_rows_as_the_dense_gradient_would(monkeypatch, dtype):
    # Tokens from a small range repeat many times per batch: each row's sum then depends on the order and
    # the precision it is added in, and the mask still equals the one-pass mask (dense embedding gradient).
    calls = []
    original = blockwise._GradientAccumulator._add_rows

    def counting(self, name, param, grad):
        calls.append((name, grad.is_sparse))
        return original(self, name, param, grad)

    monkeypatch.setattr(blockwise._GradientAccumulator, "_add_rows", counting)
    lm = tiny_causal_lm("llama", layers=2, tie=False, seed=1)
    lm.lm.to(dtype)
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 12, (4, 24), generator=generator) for _ in range(3)]

    def loss_fn(model, ids):
        logits = model.lm(input_ids=ids, use_cache=False).logits.float()
        return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(1)

    lean = saftune.select_mask(lm, loss_fn, batches, sparsity=0.05, lean=True)
    assert calls == [("lm.model.embed_tokens.weight", True)] * len(batches)
    assert lean == saftune.select_mask(lm, loss_fn, batches, sparsity=0.05)
    assert lm.lm.model.embed_tokens.sparse is False  # restored


def test_saft_with_lean_selection_trains_what_the_one_pass_selection_trains():
    pairs = [("Capital of France?", " Paris"), ("2 + 2 =", " 4"), ("Colour of grass?", " green"),
             ("Opposite of up?", " down"), ("Plural of child?", " children"), ("Colour of snow?", " white")]
    split = Split("toy-sft", pairs, [0] * len(pairs))  # labels are unused by a causal LM
    trained = {}
    for lean in (False, True):
        lm = tiny_causal_lm("llama", seed=3, tie=False)
        method = create_method("saft", {"lr": 1e-2, "sparsity": 0.05, "lean_selection": lean})
        fit(lm, method, split, TrainConfig(epochs=2, batch_size=3, progress=False))
        trained[lean] = (method.mask, {n: p.detach().clone() for n, p in lm.named_parameters()})
    assert trained[True][0] == trained[False][0]
    changed = sum(int((trained[True][1][n] != p.detach()).sum()) for n, p in tiny_causal_lm("llama", seed=3, tie=False).named_parameters())
    assert changed > 0.9 * trained[True][0].num_selected
    for name, value in trained[False][1].items():
        assert torch.equal(trained[True][1][name], value), name


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(score="fisher"), "score must be one of"),
        (dict(budget="per_row"), "per_row needs every score at once"),
        (dict(blocks="lm.model.norm"), "is not a non-empty nn.ModuleList"),
        (dict(chunk_batches=0), "chunk_batches must be a positive number"),
    ],
)
def test_what_the_lean_phase_1_cannot_do_is_refused_with_a_clear_message(kwargs, message):
    lm, loss_fn, batches = _lm_case("llama", tie=True)
    with pytest.raises(ValueError, match=message):
        saftune.select_mask(lm, loss_fn, batches, sparsity=0.01, lean=True, **kwargs)


def test_a_model_that_runs_its_blocks_twice_per_batch_is_refused():
    lm, loss_fn, batches = _lm_case("llama", tie=True)

    def twice(model, batch):
        return loss_fn(model, batch) + loss_fn(model, batch)

    with pytest.raises(ValueError, match="one after another|exactly once per batch"):
        saftune.select_mask(lm, twice, batches, sparsity=0.01, lean=True)
    with pytest.raises(ValueError, match="pass lean=True"):
        saftune.select_mask(lm, loss_fn, batches, sparsity=0.01, chunk_batches=2)


def test_two_processes_select_block_by_block_what_they_select_in_one_pass(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    worker = Path(__file__).with_name("lean_phase1_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(worker), str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    masks = load_file(str(tmp_path / "masks.safetensors"))
    onepass = {k.split("/", 1)[1]: v for k, v in masks.items() if k.startswith("onepass/")}
    assert sum(v.numel() for v in onepass.values()) > 0
    for kind in ("lean", "lean-chunked"):
        lean = {k.split("/", 1)[1]: v for k, v in masks.items() if k.startswith(f"{kind}/")}
        assert lean.keys() == onepass.keys()
        for name in onepass:
            assert torch.equal(lean[name], onepass[name]), (kind, name)


def test_the_trainer_integration_selects_block_by_block_with_the_models_own_loss():
    from transformers import AutoModelForCausalLM

    from saftune.integrations.hf_trainer import sparsify_for_trainer
    from saftune.models.tiny_lm import tiny_lm_config

    generator = torch.Generator().manual_seed(1)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 256, (6, 9), generator=generator).tolist()]
    masks = []
    for lean in (False, True):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_lm_config("llama", layers=3))  # use_cache on, as loaded
        masks.append(sparsify_for_trainer(model, data, sparsity=0.02, batch_size=2, lean=lean).mask)
    assert masks[0] == masks[1]
