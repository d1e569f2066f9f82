"""Datasets by name: `load_dataset("sentiment-domains", shots=16, seed=1)`.

Every dataset declares its options as a `Config` dataclass (type, default, help, validation) and
registers a builder `(options) -> Benchmark` with the `@register_dataset` decorator, which runs when
its module is imported. `load_dataset` turns keyword options into that dataclass with
`Config.from_dict`, so an unknown option is refused with the closest valid name and a bad value with
the allowed range, before any file is read.

Example:
    >>> "sentiment-domains" in list_datasets()
    True
    >>> [row[0] for row in dataset_options_class("toy-text").describe()]
    ['shots', 'seed', 'test_size']
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from saftune._io import did_you_mean
from saftune.config import Config
from saftune.data.base import Benchmark


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    build: Callable[[Config], Benchmark]
    help: str
    options: type[Config]


_DATASETS: dict[str, DatasetEntry] = {}


def register_dataset(name: str, help: str, options: type[Config]):
    """Decorator: register `build(options) -> Benchmark` under `name`, with its options dataclass.

    Example:
        >>> from dataclasses import dataclass
        >>> from saftune.config import option
        >>> @dataclass
        ... class EchoOptions(Config):
        ...     size: int = option(2, "examples per split", low=1)
        >>> @register_dataset("doc-echo", "doctest dataset", options=EchoOptions)
        ... def build_echo(options):
        ...     return options.size
        >>> load_dataset("doc-echo", size="3")
        3
        >>> del _DATASETS["doc-echo"]
    """
    if not (isinstance(options, type) and issubclass(options, Config)):
        raise TypeError(f"dataset {name!r}: options must be a Config dataclass, got {options!r}")

    def wrap(build):
        if name in _DATASETS:
            raise ValueError(f"a dataset named {name!r} is already registered")
        _DATASETS[name] = DatasetEntry(name, build, help, options)
        return build

    return wrap


def _load_builtin() -> None:
    # Importing the modules runs their @register_dataset decorators.
    import saftune.data.embedded  # noqa: F401
    import saftune.data.toy  # noqa: F401
    import saftune.data.vision  # noqa: F401
    import saftune.data.text  # noqa: F401
    import saftune.data.llm.med_generality  # noqa: F401


def list_datasets() -> dict[str, str]:
    """Registered dataset names -> help text."""
    _load_builtin()
    return {name: entry.help for name, entry in sorted(_DATASETS.items())}


def _entry(name: str) -> DatasetEntry:
    _load_builtin()
    if name not in _DATASETS:
        hint = did_you_mean(name, _DATASETS)
        raise ValueError(f"unknown dataset {name!r}.{hint} Known datasets: {', '.join(sorted(_DATASETS))}")
    return _DATASETS[name]


def dataset_options_class(name: str) -> type[Config]:
    """The options dataclass of dataset `name` (its `describe()` lists type, default and help)."""
    return _entry(name).options


def dataset_options(name: str) -> set[str]:
    """The option names dataset `name` accepts (empty for unknown names).

    Example:
        >>> "seed" in dataset_options("toy-text")
        True
    """
    _load_builtin()
    entry = _DATASETS.get(name)
    return set(entry.options.field_names()) if entry else set()


def dataset_config(name: str, options: dict | None = None) -> Config:
    """The validated options of dataset `name`: unknown keys name the closest valid one, values their range.

    Example:
        >>> dataset_config("toy-text", {"shot": 4})
        Traceback (most recent call last):
        ...
        ValueError: dataset 'toy-text': unknown option 'shot' for ToyOptions; did you mean 'shots'? Options: shots, seed, test_size
    """
    entry = _entry(name)
    try:
        return entry.options.from_dict(options or {})
    except ValueError as e:
        raise ValueError(f"dataset {name!r}: {e}") from None


def check_dataset(name: str, options: dict | None = None) -> None:
    """Refuse an unknown dataset name, option or option value before anything is read."""
    dataset_config(name, options)


def load_dataset(name: str, **options) -> Benchmark:
    """Build the benchmark registered as `name` with its options (shots, seed, root, ...)."""
    return _entry(name).build(dataset_config(name, options))
