"""SAFT training with the frozen base replicated, then sharded with FSDP2; run by tests/test_accelerate_fsdp.py.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/fsdp_worker.py OUT MODE

MODE `toy`: a toy model with every kernel route of the sparse engine (an embedding tied to the output
layer, torch's multi-head attention, plain linears, LayerNorms trained through gradient hooks); `llama`:
tiny-llama (tied embeddings, RMSNorm, its decoder layers as FSDP units). Each trains a few AdamW steps on
a random mask, once replicated and once after `shard_frozen_base`, in the same processes and on the same
global batches. `fit`: SAFT (phase 1 included) on tiny-sentence with saftune's own trainer, once as is
and once with `method.prepare` followed by `shard_frozen_base`. `select`: phase 1 on tiny-llama, by
`select_mask` and by `select_mask_sharded`. `host`: saftune's trainer with `fsdp` off and on, counting
whole-model moves to the device.

Every rank r writes OUT/<MODE>.rank<r>.safetensors: per run (`plain/`, `fsdp/`) the step losses, the
trained values, how far they moved, the logits after training; for the sharded run also the frozen
entries this rank holds, the whole base's and the replicated tensors' counts, the number of FSDP units
and (toy, llama) how many of the unsharded weights are still alive after sharding.
"""

from __future__ import annotations

import gc
import sys
import weakref
from functools import partial
from pathlib import Path

import torch
from torch import nn


class Toy(nn.Module):
    """Embedding (tied to the output layer) -> one transformer encoder layer -> LayerNorm -> vocabulary logits."""

    def __init__(self, vocab: int = 61, dim: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.block = nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=30, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.norm(self.block(self.embed(ids))))


def random_mask(model: nn.Module, chosen: dict[str, int]):
    """`chosen[name]` random entries of each named parameter (seeded)."""
    from saftune.sparse import SparseMask

    generator = torch.Generator().manual_seed(0)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    indices = {n: torch.randperm(torch.Size(shapes[n]).numel(), generator=generator)[:k] for n, k in chosen.items()}
    return SparseMask(indices, shapes)


def toy():
    """The toy model, a mask on every routed weight (the kernels) and a few LayerNorm / bias entries (the hooks)."""
    torch.manual_seed(0)
    model = Toy()
    mask = random_mask(model, {"embed.weight": 40, "block.self_attn.in_proj_weight": 30, "block.self_attn.out_proj.weight": 12,
                               "block.linear1.weight": 20, "block.linear2.weight": 20, "block.linear1.bias": 4,
                               "norm.weight": 5, "block.norm1.bias": 3})
    return model, mask, ["attention", "hook", "linear", "tied"], 61, model


def llama():
    """tiny-llama (tied embeddings, RMSNorm, blocks named by `_no_split_modules`): entries of every projection
    and of two norms (the scale path, sharded as the kernels' weights are)."""
    from saftune.models import create

    lm = create("tiny-llama", seed=0).lm
    chosen = {n: 8 for n, p in lm.named_parameters() if p.dim() == 2}
    chosen.update({"model.norm.weight": 3, "model.layers.1.input_layernorm.weight": 3})
    return lm, random_mask(lm, chosen), ["linear", "scale", "tied"], lm.config.vocab_size, lambda ids: lm(input_ids=ids).logits


def train_engine(build, shard: bool) -> dict[str, torch.Tensor]:
    """4 AdamW steps on global batches of 5 sequences (shares of 3 and 2), the loss weighted by the share."""
    from saftune import distributed
    from saftune.integrations.fsdp import shard_frozen_base
    from saftune.sparse import sparsify

    model, mask, expected_paths, vocab, forward = build()
    sm = sparsify(model, mask, kernels="on")
    paths = sorted({s.path for s in sm._slots})
    assert paths == expected_paths, paths
    result: dict[str, torch.Tensor] = {}
    if shard:
        whole = [weakref.ref(p) for p in model.parameters() if not p.requires_grad]
        shards = shard_frozen_base(sm)
        gc.collect()
        result["alive_unsharded"] = torch.tensor([sum(ref() is not None for ref in whole)])
        result.update(counts(shards, model))
    optimizer = torch.optim.AdamW(sm.trainable_parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(1)
    losses = []
    model.train()
    for _ in range(4):
        ids = torch.randint(0, vocab, (5, 7), generator=data)
        mine = ids[list(distributed.shard(range(5)))]
        logits = forward(mine[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), mine[:, 1:].reshape(-1)) * len(mine) / 5
        loss.backward()
        distributed.all_reduce_gradients(sm.trainable_parameters())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(sum(distributed.gather_objects(loss.item())))
    result["loss"] = torch.tensor(losses, dtype=torch.float64)
    result.update({f"values/{k}": v for k, v in sm.state_dict().items()})
    result["moved"] = torch.tensor([max((s.values - s.pretrained.float()).abs().max().item() for s in sm._slots)])
    model.eval()
    with torch.no_grad():  # every rank the same batch: the merged weights, gathered for the forward
        result["logits"] = forward(torch.randint(0, vocab, (2, 6), generator=data))
    return result


def counts(shards, model: nn.Module) -> dict[str, torch.Tensor]:
    """What this rank holds: frozen entries in all, of the whole base, and of the tensors kept whole."""
    replicated = sum(p.numel() for n, p in model.named_parameters() if n in set(shards.replicated))
    return {"local_numel": torch.tensor([shards.local_numel]), "total_numel": torch.tensor([shards.total_numel]),
            "replicated_numel": torch.tensor([replicated]), "units": torch.tensor([len(shards.units)])}


def train_fit(shard: bool) -> dict[str, torch.Tensor]:
    """SAFT on tiny-sentence with saftune's trainer: 4 steps of 2 micro-batches of 4 (every share non-empty)."""
    from saftune.data import load_dataset
    from saftune.eval.evaluate import predict
    from saftune.integrations.fsdp import shard_frozen_base
    from saftune.methods import create_method
    from saftune.models import create
    from saftune.train import TrainConfig, fit

    bench = load_dataset("toy-text", shots=5, test_size=7)
    model = create("tiny-sentence", seed=0)
    model.set_classes(bench.classnames, bench.templates)
    # kernels "on": the selected nn.Linear weights train through the sparse kernel (so they are sharded)
    method = create_method("saft", {"lr": 1e-2, "sparsity": 0.05, "kernels": "on"})
    result: dict[str, torch.Tensor] = {}
    if shard:
        prepare = method.prepare

        def prepare_then_shard(model, context):
            prepare(model, context)
            result.update(counts(shard_frozen_base(method.sparse), model))

        method.prepare = prepare_then_shard
    config = TrainConfig(max_steps=4, batch_size=4, grad_accum=2, seed=3, device="cpu", augment=False)
    history = [h for h in fit(model, method, bench.train, config).history if "loss" in h]
    result["loss"] = torch.tensor([h["loss"] for h in history], dtype=torch.float64)
    result["grad_norm"] = torch.tensor([h["grad_norm"] for h in history], dtype=torch.float64)
    result.update({f"values/{k}": v for k, v in method.state_dict(model).items()})
    result["moved"] = torch.tensor([max((s.values - s.pretrained.float()).abs().max().item() for s in method.sparse._slots)])
    result["logits"] = predict(model, bench.val)  # 4 examples per rank: one batch each (one fewer would hang the other)
    return result


def train_from_host(shard: bool) -> dict[str, torch.Tensor]:
    """saftune's trainer with `fsdp` off or on, watching what moves to the device: with fsdp the whole model
    must never be moved (one bigger than a device stays in host memory; FSDP2 moves each rank's shards, and
    the engine its O(d) tensors, to the mesh's device). On CPU the moves are no-ops: the calls are counted."""
    from saftune.data import load_dataset
    from saftune.methods import create_method
    from saftune.models import create
    from saftune.sparse.engine import SparseModel
    from saftune.train import TrainConfig, fit

    bench = load_dataset("toy-text", shots=5, test_size=7)
    model = create("tiny-sentence", seed=0)
    model.set_classes(bench.classnames, bench.templates)
    whole, engine = [], []
    model_to, engine_to = model.to, SparseModel.to
    model.to = lambda *args, **kwargs: whole.append(args) or model_to(*args, **kwargs)
    SparseModel.to = lambda self, device: engine.append(str(device)) or engine_to(self, device)
    try:
        method = create_method("saft", {"lr": 1e-2, "sparsity": 0.05, "kernels": "on"})
        config = TrainConfig(max_steps=4, batch_size=4, grad_accum=2, seed=3, device="cpu", augment=False, fsdp=shard)
        history = [h for h in fit(model, method, bench.train, config).history if "loss" in h]
    finally:
        del model.to
        SparseModel.to = engine_to
    return {"loss": torch.tensor([h["loss"] for h in history], dtype=torch.float64),
            "whole_moves": torch.tensor([len(whole)]), "engine_moves": torch.tensor([engine.count("cpu")]),
            **{f"values/{k}": v for k, v in method.state_dict(model).items()}}


def select(shard: bool) -> dict[str, torch.Tensor]:
    """SAFT's phase 1 on tiny-llama over 7 batches (4 and 3 per rank: the second rank pads one): the
    unsharded distributed `select_mask`, or `select_mask_sharded`, which must leave the model as it was."""
    from saftune.integrations.fsdp import select_mask_sharded, sharded_grad_scores
    from saftune.models import create
    from saftune.sparse import select_mask

    lm = create("tiny-llama", seed=0).lm
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    vocab = lm.config.vocab_size
    data = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, vocab, (3, 9), generator=data) for _ in range(7)]

    def loss_fn(model, ids):
        logits = model(input_ids=ids[:, :-1]).logits
        per_token = nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        return per_token.mean(1)

    result: dict[str, torch.Tensor] = {}
    if shard:
        mask = select_mask_sharded(lm, loss_fn, batches, sparsity=0.01)
        scores = sharded_grad_scores(lm, [n for n, _ in lm.named_parameters()], loss_fn, batches)
        result["score_local"] = torch.tensor([scores.local_numel])
        result["score_total"] = torch.tensor([sum(p.numel() for p in lm.parameters())])
        result["examples"] = torch.tensor([scores.examples])
    else:
        mask = select_mask(lm, loss_fn, batches, sparsity=0.01, progress=False)
    result["untouched"] = torch.tensor([all(type(p) is nn.Parameter and torch.equal(p, before[n])
                                            for n, p in lm.named_parameters())])
    result.update({f"mask/{n}": idx for n, idx in mask.indices.items()})
    return result


def main(out: Path, mode: str) -> None:
    from safetensors.torch import save_file

    from saftune import distributed

    torch.set_num_threads(1)
    distributed.init_from_env("cpu")
    train = {"toy": partial(train_engine, toy), "llama": partial(train_engine, llama), "fit": train_fit, "host": train_from_host,
             "select": select}[mode]
    state = {}
    for name, shard in (("plain", False), ("fsdp", True)):
        state.update({f"{name}/{k}": v.detach().contiguous() if k.startswith("mask/") else v.detach().float().contiguous()
                      for k, v in train(shard).items()})
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / f"{mode}.rank{distributed.rank()}.safetensors"))
    distributed.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
