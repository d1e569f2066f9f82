"""`bitfit`: train only the biases (Ben Zaken et al., 2022), on the sparse engine."""

from __future__ import annotations

from dataclasses import dataclass

from saftune.config import option
from saftune.methods.base import MethodConfig, register_method
from saftune.methods.sparse_method import SparseMethod
from saftune.sparse import SparseMask, select_mask
from saftune.sparse.scores import is_bias


@dataclass
class BitFitConfig(MethodConfig):
    lr: float = option(1e-4, "peak learning rate (biases tolerate larger steps)", low=0.0, low_open=True)
    weight_decay: float = option(0.0, "AdamW weight decay", low=0.0)


@register_method
class BitFit(SparseMethod):
    name = "bitfit"
    config_class = BitFitConfig
    help = "biases only (BitFit), as a sparse delta"

    def select(self, model, context) -> SparseMask:
        if not any(is_bias(n, p) for n, p in model.named_parameters()):  # Llama-style models have none
            raise ValueError(f"bitfit trains biases, but {type(getattr(model, 'lm', model)).__name__} has no bias "
                             "parameters; choose another method (saft, lora, ft)")
        return select_mask(model, sparsity=1.0, score="bias")  # every bias: no scoring pass needed
