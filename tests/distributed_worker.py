"""Trains every method briefly on toy-text; run by tests/test_distributed.py alone and under torchrun.

    python tests/distributed_worker.py OUT METHOD [METHOD ...]
    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py OUT METHOD ...

Rank 0 writes OUT/<method>.safetensors: the method's trainable tensors after training (the linear
probe's: its fitted head), the SAFT / BitFit mask indices (as `mask/<name>`), the logged loss and
gradient norm of every step, the val logits and accuracy, which the test compares between the two
launches, and how far training moved the trainable tensors (as `moved`), which shows the comparison is
not vacuous. Every rank r first writes OUT/gather_rows.rank<r>.safetensors (see `gather_rows_check`).
"""

from __future__ import annotations

import sys
from pathlib import Path


def gather_rows_check(out: Path) -> None:
    """`distributed.gather_rows` of rows that differ by process, in number (zero included) and value.

    Rank r gathers `rows` (3 rows on rank 0, none elsewhere) and `more` (r + 1 rows), row i of rank r
    holding 10 r + i, backpropagates sum(weight * gathered) with weight = 1, 2, 3, ... over the gathered
    elements, and writes what it gathered, its rows' gradients, and its labels `10 r + i` gathered under
    no_grad.
    """
    import torch
    from safetensors.torch import save_file

    from saftune import distributed

    r = distributed.rank()
    state = {}
    for name, count in (("rows", 3 if r == 0 else 0), ("more", r + 1)):
        local = (10.0 * r + torch.arange(count, dtype=torch.float32)).unsqueeze(1).repeat(1, 2).requires_grad_(True)
        gathered = distributed.gather_rows(local)
        (gathered * torch.arange(1, gathered.numel() + 1).view_as(gathered)).sum().backward()
        state[name], state[f"{name}.grad"] = gathered.detach(), local.grad
        with torch.no_grad():
            state[f"{name}.labels"] = distributed.gather_rows(10 * r + torch.arange(count))
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / f"gather_rows.rank{r}.safetensors"))


def main(out: Path, methods: list[str]) -> None:
    import torch
    from safetensors.torch import save_file

    from saftune import distributed
    from saftune.data import load_dataset
    from saftune.eval import evaluate_split
    from saftune.eval.evaluate import predict
    from saftune.methods import create_method
    from saftune.models import create
    from saftune.train import TrainConfig, fit

    torch.set_num_threads(1)
    distributed.init_from_env("cpu")
    gather_rows_check(out)
    # 10 examples in micro-batches of 3, 3, 3 and 1: shares of 2 and 1 examples, and in the last one, none
    # for process 1 (which must still join FLYP's gathers)
    text, images = (load_dataset(name, shots=5, test_size=7) for name in ("toy-text", "toy-images"))
    assert len(text.train) == len(images.train) == 10
    for name in methods:
        # FLYP trains CLIP, whose learned logit scale every row of the contrastive loss shares; MaPLe needs
        # CLIP's two towers
        model_name, bench = ("tiny-clip", images) if name in ("flyp", "maple") else ("tiny-sentence", text)
        model = create(model_name, seed=0)
        # several templates: FLYP's prompts cycle over them by the examples' positions in the global batch
        model.set_classes(bench.classnames, [*bench.templates, "{}.", "it is {}."])
        # The tiny CLIP pools the text at its highest token id: with "a photo of a {}." that is "photo", before
        # the class name, so every class would get the same embedding; "this is {}." pools at or after it.
        options = {"saft": {"sparsity": 0.05}, "maple": {"depth": 2, "ctx_init": "this is"}}.get(name, {})
        method = create_method(name, {"lr": 1e-2, **options})
        config = TrainConfig(max_steps=4, batch_size=3, grad_accum=2, seed=3, device="cpu", augment=False)
        trained: list = []  # (tensor, its value before the first step): how far training moved it
        if name == "lp":  # fits the model's head in `prepare`, instead of a training loop
            trained.extend((p, p.detach().clone()) for p in model.linear_head().parameters())
        choose_groups = method.parameter_groups

        def parameter_groups(model, choose_groups=choose_groups, trained=trained):
            groups = choose_groups(model)
            trained.extend((p, p.detach().clone()) for g in groups for p in g["params"])
            return groups

        method.parameter_groups = parameter_groups
        history = [h for h in fit(model, method, bench.train, config).history if "loss" in h]
        tensors = dict(model.head.named_parameters(prefix="head")) if name == "lp" else method.state_dict(model)
        state = {f"trainable/{k}": v.detach().float().contiguous() for k, v in tensors.items()}
        if hasattr(method, "mask"):
            state.update({f"mask/{k}": v.contiguous() for k, v in method.mask.indices.items()})
        state["loss"] = torch.tensor([h["loss"] for h in history], dtype=torch.float64)
        state["grad_norm"] = torch.tensor([h["grad_norm"] for h in history], dtype=torch.float64)
        state["val_logits"] = predict(model, bench.val)
        state["val"] = torch.tensor([evaluate_split(model, bench, bench.val)])
        state["moved"] = torch.tensor([max((p.detach() - p0).abs().max().item() for p, p0 in trained)] if trained else [0.0])
        if distributed.is_main():
            out.mkdir(parents=True, exist_ok=True)
            save_file(state, str(out / f"{name}.safetensors"))
    distributed.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
