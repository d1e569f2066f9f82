"""Data: the `Split` / `Benchmark` types and the dataset registry.

Example:
    >>> from saftune.data import load_dataset
    >>> bench = load_dataset("sentiment-domains", shots=16, seed=1)   # doctest: +SKIP
    >>> bench.prompts()                                                # doctest: +SKIP
    [['a negative review.'], ['a positive review.']]
"""

from saftune.data.base import Benchmark, Split
from saftune.data.registry import list_datasets, load_dataset, register_dataset

__all__ = ["Benchmark", "Split", "list_datasets", "load_dataset", "register_dataset"]
