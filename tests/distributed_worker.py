"""Trains every method briefly on toy-text; run by tests/test_distributed.py alone and under torchrun.

    python tests/distributed_worker.py OUT METHOD [METHOD ...]
    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py OUT METHOD ...

Rank 0 writes OUT/<method>.safetensors: the method's trainable tensors after training, the SAFT / BitFit
mask indices (as `mask/<name>`), the logged loss and gradient norm of every step, the val logits and
accuracy, which the test compares between the two launches, and how far training moved the trainable tensors (as `moved`), which shows the comparison is
not vacuous.
"""

from __future__ import annotations

import sys
from pathlib import Path


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
    bench = load_dataset("toy-text", shots=5, test_size=7)  # 10 examples: batches of 4, 4 and 2
    for name in methods:
        model = create("tiny-sentence", seed=0)
        model.set_classes(bench.classnames, bench.templates)
        options = {"sparsity": 0.05} if name == "saft" else {}
        method = create_method(name, {"lr": 1e-2, **options})
        config = TrainConfig(max_steps=4, batch_size=4, grad_accum=2, seed=3, device="cpu", augment=False)
        trained: list = []  # (tensor, its value before the first step): how far training moved it
        choose_groups = method.parameter_groups

        def parameter_groups(model, choose_groups=choose_groups, trained=trained):
            groups = choose_groups(model)
            trained.extend((p, p.detach().clone()) for g in groups for p in g["params"])
            return groups

        method.parameter_groups = parameter_groups
        history = [h for h in fit(model, method, bench.train, config).history if "loss" in h]
        state = {f"trainable/{k}": v.detach().float().contiguous() for k, v in method.state_dict(model).items()}
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
