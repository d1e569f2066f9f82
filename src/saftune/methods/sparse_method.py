"""Shared by the sparse-engine methods (SAFT, BitFit): select a mask, sparsify, save a sparse delta."""

from __future__ import annotations

import logging
from pathlib import Path

from saftune import distributed
from saftune.methods.base import Method
from saftune.models.zero_shot import DualEncoderClassifier
from saftune.sparse import MaskFileError, SparseDelta, SparseMask, sparsify

logger = logging.getLogger(__name__)

MASK_FILE = "mask.safetensors"


class SparseMethod(Method):
    """Shared by SAFT and BitFit: select a mask, sparsify, train the values, save a sparse delta."""

    result_kind = "sparse_delta"
    result_files = ()  # a sparse delta checks its own files (`SparseDelta.from_pretrained`)
    shards_frozen_base = True

    def select(self, model, context) -> SparseMask:
        raise NotImplementedError

    def prepare(self, model, context) -> None:
        mask_path = Path(context.out_dir) / MASK_FILE if context.out_dir else None
        if context.resuming and mask_path is not None and mask_path.is_file():
            self.mask = self._saved_mask(mask_path, context)  # the mask of the interrupted run: no phase 1 again
        else:
            self.mask = self.select(model, context)
            self.mask.meta["selected_by"] = self._selection_key(context)
            if mask_path is not None and distributed.is_main():  # every process selected the same mask
                self.mask.save(mask_path)
        self.sparse = sparsify(model, self.mask, kernels=getattr(self.config, "kernels", "auto"))
        if isinstance(model, DualEncoderClassifier):
            # A prompt side without selected entries cannot change: cache its class embeddings.
            prompt_side = set(model.scope_parameters("text"))
            model.freeze_prompt_side(not prompt_side & set(self.mask.indices))
        logger.info("%s: %d of %d entries train", self.name, self.mask.num_selected, self.mask.num_candidates)

    def _selection_key(self, context) -> dict:
        """The settings a mask was selected with, saved in it: a resumed run reuses only a mask of its own."""
        return {"method": self.name, "options": self.config.to_dict(), "seed": context.seed}

    def _saved_mask(self, path: Path, context) -> SparseMask:
        """The interrupted run's mask; refused when damaged or written by a run with other settings.

        The checkpoint's values belong to the entries of the mask it was trained with, so a resumed run
        must not select again nor take another run's mask (a run started afresh in the same directory
        overwrites the mask before its first checkpoint replaces the old one).
        """
        afresh = "start the run afresh (saftune train --no-resume)"
        try:
            mask = SparseMask.load(path)
        except MaskFileError as e:
            raise MaskFileError(f"cannot resume the checkpoint: {e}. It was trained with that mask: {afresh}") from e
        selected_by = mask.meta.get("selected_by")  # absent only in masks of saftune <= 0.1.0
        if selected_by is not None and selected_by != self._selection_key(context):
            raise MaskFileError(f"cannot resume the checkpoint: mask file {str(path)!r} was selected by a run with "
                                f"other settings ({selected_by}), not the one the checkpoint was trained with: {afresh}")
        return mask

    def shard_frozen_base(self, model, device):
        from saftune.integrations.fsdp import shard_frozen_base

        shard_frozen_base(self.sparse, device=device)

    def trainable_parameters(self, model):
        return self.sparse.trainable_parameters()

    def training_key(self):
        # The mask is selected again by `prepare` (deterministic for a seed); the values are the whole state.
        return {"method": self.name, "config": self.config.to_dict()}

    def state_dict(self, model):
        return self.sparse.state_dict()

    def load_state_dict(self, model, state):
        self.sparse.load_state_dict(state)

    def record_fields(self, model):
        return {"sparsity": getattr(self.config, "sparsity", None),
                "mask_summary": [{"block": r.block, "selected": r.selected, "total": r.total} for r in self.mask.summary()]}

    def save_result(self, model, directory, info):
        delta = self.sparse.delta(**info, kind=self.result_kind)
        return delta.save_pretrained(directory)

    @staticmethod
    def apply_result(model, directory, config, *, merge=False):
        SparseDelta.from_pretrained(directory).apply_to(model)  # the merged model: nothing attached
