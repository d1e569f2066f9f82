"""saftune: sparse fine-tuning (SAFT) that keeps pretrained models' out-of-distribution generality.

Example:
    >>> import torch, saftune
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> loss_fn = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")
    >>> data = [(torch.randn(16, 8), torch.randint(0, 2, (16,)))]
    >>> mask = saftune.select_mask(net, loss_fn, data, sparsity=0.05)
    >>> sm = saftune.sparsify(net, mask)
    >>> opt = torch.optim.AdamW(sm.trainable_parameters(), lr=1e-3, weight_decay=0.1)
    >>> sm.num_trainable
    4
"""

__version__ = "0.1.0"

from saftune.sparse import (  # noqa: E402
    DeltaError,
    MaskFileError,
    SparseDelta,
    SparseMask,
    SparseModel,
    select_mask,
    sparsify,
)

__all__ = [
    "DeltaError", "MaskFileError", "SparseDelta", "SparseMask", "SparseModel", "__version__",
    "select_mask", "sparsify",
]
