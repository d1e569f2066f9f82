"""Datasets by name: `load_dataset("sentiment-domains", shots=16, seed=1)`.

Each entry is a builder `(**options) -> Benchmark` with a one-line help text. Builders register
themselves with the `@register_dataset` decorator when their module is imported.

Example:
    >>> "sentiment-domains" in list_datasets()
    True
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

from saftune.data.base import Benchmark


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    builder: Callable[..., Benchmark]
    help: str


_DATASETS: dict[str, DatasetEntry] = {}


def register_dataset(name: str, help: str):
    """Decorator: register `builder(**options) -> Benchmark` under `name`."""

    def wrap(builder):
        if name in _DATASETS:
            raise ValueError(f"a dataset named {name!r} is already registered")
        _DATASETS[name] = DatasetEntry(name, builder, help)
        return builder

    return wrap


def _load_builtin() -> None:
    # Importing the modules runs their @register_dataset decorators.
    import saftune.data.embedded  # noqa: F401
    import saftune.data.toy  # noqa: F401
    import saftune.data.vision  # noqa: F401
    import saftune.data.text  # noqa: F401


def list_datasets() -> dict[str, str]:
    """Registered dataset names -> help text."""
    _load_builtin()
    return {name: entry.help for name, entry in sorted(_DATASETS.items())}


def _named_parameters(builder: Callable) -> tuple[list[str], bool]:
    """(named parameters, whether it also takes **options) of a builder."""
    params = inspect.signature(builder).parameters.values()
    named = [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return named, any(p.kind == p.VAR_KEYWORD for p in params)


def dataset_options(name: str) -> set[str]:
    """The option names the builder of dataset `name` accepts (empty for unknown names).

    Example:
        >>> "seed" in dataset_options("toy-text")
        True
    """
    _load_builtin()
    entry = _DATASETS.get(name)
    return set(_named_parameters(entry.builder)[0]) if entry else set()


def check_dataset(name: str, options: dict | None = None) -> None:
    """Refuse an unknown dataset name or option before anything is read, naming the closest valid one.

    Example:
        >>> check_dataset("toy-text", {"shot": 4})
        Traceback (most recent call last):
        ...
        ValueError: dataset 'toy-text' has no option 'shot'; did you mean 'shots'? Its options: shots, seed, test_size
    """
    _load_builtin()
    if name not in _DATASETS:
        close = difflib.get_close_matches(name, _DATASETS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown dataset {name!r}.{hint} Known datasets: {', '.join(sorted(_DATASETS))}")
    named, takes_any = _named_parameters(_DATASETS[name].builder)
    unknown = [key for key in options or {} if key not in named]
    if unknown and not takes_any:
        close = difflib.get_close_matches(unknown[0], named, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "."
        raise ValueError(f"dataset {name!r} has no option {unknown[0]!r}{hint} Its options: {', '.join(named)}")


def load_dataset(name: str, **options) -> Benchmark:
    """Build the benchmark registered as `name` with builder-specific options (shots, seed, root, ...)."""
    check_dataset(name, options)
    return _DATASETS[name].builder(**options)
