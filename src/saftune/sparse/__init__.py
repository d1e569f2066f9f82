"""The sparse engine: masks (phase 1), sparse training (phase 2) and sparse deltas."""

from saftune.sparse.delta import DeltaError, SparseDelta
from saftune.sparse.engine import SparseModel, sparsify
from saftune.sparse.mask import MaskFileError, SparseMask
from saftune.sparse.scores import SCORES, Score, register_score
from saftune.sparse.select import select_mask, top_k

__all__ = [
    "SCORES", "DeltaError", "MaskFileError", "Score", "SparseDelta", "SparseMask", "SparseModel",
    "register_score", "select_mask", "sparsify", "top_k",
]
