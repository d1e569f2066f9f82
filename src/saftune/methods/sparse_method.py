"""Shared by the sparse-engine methods (SAFT, BitFit): select a mask, sparsify, save a sparse delta."""

from __future__ import annotations

import logging
from pathlib import Path

from saftune.methods.base import Method
from saftune.models.zero_shot import DualEncoderClassifier
from saftune.sparse import SparseMask, sparsify

logger = logging.getLogger(__name__)

MASK_FILE = "mask.safetensors"


class SparseMethod(Method):
    """Shared by SAFT and BitFit: select a mask, sparsify, train the values, save a sparse delta."""

    def select(self, model, context) -> SparseMask:
        raise NotImplementedError

    def prepare(self, model, context) -> None:
        mask_path = Path(context.out_dir) / MASK_FILE if context.out_dir else None
        if context.resuming and mask_path is not None and mask_path.is_file():
            self.mask = SparseMask.load(mask_path)  # the mask of the interrupted run: no phase 1 again
        else:
            self.mask = self.select(model, context)
            if mask_path is not None:
                self.mask.save(mask_path)
        self.sparse = sparsify(model, self.mask, kernels=getattr(self.config, "kernels", "auto"))
        if isinstance(model, DualEncoderClassifier):
            # A prompt side without selected entries cannot change: cache its class embeddings.
            prompt_side = set(model.scope_parameters("text"))
            model.freeze_prompts = not prompt_side & set(self.mask.indices)
        logger.info("%s: %d of %d entries train", self.name, self.mask.num_selected, self.mask.num_candidates)

    def trainable_parameters(self, model):
        return self.sparse.trainable_parameters()

    def state_dict(self, model):
        return self.sparse.state_dict()

    def load_state_dict(self, model, state):
        self.sparse.load_state_dict(state)

    def save_result(self, model, directory, info):
        delta = self.sparse.delta(**info, kind="sparse_delta")
        return delta.save_pretrained(directory)
