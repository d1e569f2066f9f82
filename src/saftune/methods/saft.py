"""`saft`: Sparse Adaptation for Fine-Tuning (Nguyen et al., ECCV 2024) on the memory-lean engine.

Phase 1 selects the d = sparsity * D entries with the largest |dataset-averaged gradient| (or another
score: the paper's ablations, and the selection rules of later sparse methods, all at the same d:
GPS = budget per_row, FPS = score fps, LT-SFT = score lt-sft, SIFT = budget per_tensor with
max_batches) over the chosen scope; phase 2 trains only those entries, with O(d)
optimizer state, every other weight bit-identical to the pretrained model. The result is a sparse
delta (~0.3% of the fp32 model at sparsity 1e-3).
"""

from __future__ import annotations

from dataclasses import dataclass

from saftune.config import option
from saftune.methods.base import MethodConfig, register_method
from saftune.methods.sparse_method import SparseMethod
from saftune.models.base import classification_loss
from saftune.sparse import SparseMask, select_mask
from saftune.sparse.scores import SCORES
from saftune.sparse.select import BUDGETS


@dataclass
class SAFTConfig(MethodConfig):
    lr: float = option(5e-6, "peak learning rate (paper: 5e-6 for CLIP)", low=0.0, low_open=True)
    sparsity: float = option(1e-3, "fraction of the parameters that train (paper: 0.001)", low=0.0, low_open=True, high=1.0)
    score: str = option("grad", "importance score: grad (SAFT), fisher, random, magnitude, bias, fps (|W| x mean "
                        "|input|, forward only), lt-sft (|change| after a short full fine-tuning)", choices=tuple(SCORES))
    scope: str = option("all", "which parameters may be selected: all, image (input encoder), text (prompt encoder); "
                        "causal LMs: attention, mlp, embeddings, norm", choices=("all", "image", "text", "attention", "mlp",
                                                                                  "embeddings", "norm"))
    budget: str = option("global", "global top-k; per_tensor (d spread in proportion to tensor size, SIFT); per_row "
                         "(the same count per output unit, GPS)", choices=BUDGETS)
    max_batches: int | None = option(None, "score from the first N training batches only (SIFT; default: all)", low=1)
    lt_sft_steps: int = option(100, "score lt-sft: AdamW steps of the short full fine-tuning (cycling the batches)", low=1)
    lt_sft_lr: float = option(1e-4, "score lt-sft: learning rate of the short full fine-tuning", low=0.0, low_open=True)
    kernels: str = option("auto", "sparse gradient kernels: auto, on, off", choices=("auto", "on", "off"))
    lean_selection: bool = option(False, "phase 1 one block at a time: the same mask with one block's fp32 sums instead "
                                  "of every parameter's, for one more forward pass (score grad or bias; budget global "
                                  "or per_tensor)")
    lean_chunk_batches: int | None = option(None, "lean_selection: hold the block boundaries of at most N batches at "
                                            "once, the sums waiting on disk between chunks (default: all)", low=1)


@register_method
class SAFT(SparseMethod):
    name = "saft"
    config_class = SAFTConfig
    help = "sparse fine-tuning of the entries with the largest mean gradient (the paper's method)"

    def select(self, model, context) -> SparseMask:
        if context.fsdp and SCORES[self.config.score].needs_data:  # random, magnitude: no gradients to shard
            return self._select_sharded(model, context)
        return select_mask(
            model, classification_loss, context.batches(), sparsity=self.config.sparsity, score=self.config.score,
            include=model.scope_patterns(self.config.scope), budget=self.config.budget, seed=context.seed,
            progress=context.progress, max_batches=self.config.max_batches, score_options=self.score_options(),
            reuse_scores=None if self.config.lean_selection else context.reuse_scores,
            lean=self.config.lean_selection, chunk_batches=self.config.lean_chunk_batches,
        )

    def _select_sharded(self, model, context) -> SparseMask:
        """Phase 1 on FSDP2 shards (`train.fsdp`): the paper's score and budget."""
        from saftune.integrations.fsdp import select_mask_sharded

        if self.config.lean_selection:
            raise ValueError("fsdp scores phase 1 on sharded weights, which already keeps only each process's share of "
                             "the sums: set lean_selection false, or drop fsdp")
        if (self.config.score, self.config.budget) != ("grad", "global"):
            raise ValueError(f"fsdp scores phase 1 on sharded weights with score 'grad' (or random, magnitude) and budget "
                             f"'global' only, not score {self.config.score!r} with budget {self.config.budget!r}: use "
                             "those, or drop fsdp")
        return select_mask_sharded(model, classification_loss, context.batches(), sparsity=self.config.sparsity,
                                   include=model.scope_patterns(self.config.scope), seed=context.seed,
                                   progress=context.progress, max_batches=self.config.max_batches, device=context.device)

    def score_options(self) -> dict | None:
        """The chosen score's own options (only lt-sft has any)."""
        if self.config.score == "lt-sft":
            return {"steps": self.config.lt_sft_steps, "lr": self.config.lt_sft_lr}
        return None
