"""Model cards: a short README.md for a result or an exported adapter, in the layout PEFT and the Hub use.

The card starts with YAML front matter (`base_model`, `library_name`, `tags`), which the Hugging Face
Hub reads, followed by a table of what was trained: base model, method, how many values (sparsity),
data, seed, and the run's metrics. Every field but the base model and the method is optional and is
left out when unknown, so a card never shows placeholders.

Example:
    >>> card = model_card(base_model="HuggingFaceTB/SmolLM2-135M", method="saft", dataset="med-generality",
    ...                   sparsity=0.001, trained_values=134_515, metrics={"id": 0.61234, "ood": 0.5})
    >>> card.splitlines()[1]
    'base_model: HuggingFaceTB/SmolLM2-135M'
    >>> "| Trained values | 134,515 (sparsity 0.001) |" in card, "| id | 0.6123 |" in card
    (True, True)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from saftune._io import atomic_path

CARD_NAME = "README.md"


def _number(value) -> str:
    """Metrics with 4 decimals, counts with thousands separators, anything else as text."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        # Accuracies and losses read best with 4 decimals; tiny or huge values keep 4 significant digits.
        return f"{value:.4f}" if value == 0 or 1e-3 <= abs(value) < 1e4 else f"{value:.4g}"
    return str(value)


def _cell(text) -> str:
    # A "|" inside a cell would end it; newlines would end the row.
    return str(text).replace("|", "\\|").replace("\n", " ")


def _flat(metrics: Mapping, prefix: str = "") -> list[tuple[str, object]]:
    """{"ood": {"tweets": 0.5}} -> [("ood/tweets", 0.5)]: nested metric groups as one table."""
    rows = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows.extend(_flat(value, f"{name}/"))
        elif value is not None:
            rows.append((name, value))
    return rows


def model_card(*, base_model: str, method: str, dataset: str | None = None, sparsity: float | None = None,
               trained_values: int | None = None, total_values: int | None = None, seed: int | None = None,
               metrics: Mapping | None = None, details: Mapping | None = None, library_name: str = "saftune",
               tags: Sequence[str] = (), title: str | None = None, usage: str | None = None) -> str:
    """The text of a README.md model card.

    Args:
        base_model: the pretrained model the result was trained from (a hub id, path or saftune name).
        method: the saftune method (`saft`, `lora`, `ft`, ...).
        dataset: the training data (a saftune benchmark name or a description).
        sparsity: fraction of the model's values that were trained (sparse methods).
        trained_values: number of trained values.
        total_values: number of values in the model (the card then shows the trained fraction when
            `sparsity` is not given).
        seed: the run's seed.
        metrics: metric name -> value; nested mappings become "group/name" rows.
        details: further rows for the table (name -> value), e.g. the method's options.
        library_name: what loads the artifact ("saftune" for a result, "peft" for an adapter).
        tags: extra Hub tags (the method and "saftune" are always there).
        title: the heading (default: "<method> fine-tuning of <base_model>").
        usage: a Markdown section body showing how to load the artifact.

    Example:
        >>> print(model_card(base_model="tiny-llama", method="saft").split("---")[1].strip())
        base_model: tiny-llama
        library_name: saftune
        tags:
        - saftune
        - saft
    """
    tag_list = list(dict.fromkeys(["saftune", method, *tags]))  # ordered, without repeats
    front = yaml.safe_dump({"base_model": base_model, "library_name": library_name, "tags": tag_list},
                           sort_keys=False, allow_unicode=True).strip()
    if sparsity is None and trained_values is not None and total_values:
        sparsity = trained_values / total_values
    trained = None
    if trained_values is not None:
        trained = f"{trained_values:,}" + (f" (sparsity {sparsity:.3g})" if sparsity is not None else "")
    elif sparsity is not None:
        trained = f"sparsity {sparsity:.3g}"
    rows = [("Base model", f"`{base_model}`"), ("Method", f"`{method}`"), ("Trained values", trained),
            ("Data", dataset), ("Seed", seed), *(details or {}).items()]
    lines = ["---", front, "---", "", f"# {title or f'{method} fine-tuning of {base_model}'}", "",
             f"Fine-tuned from `{base_model}` with saftune's `{method}` method.", "",
             "| | |", "|---|---|"]
    lines += [f"| {_cell(k)} | {_cell(_number(v))} |" for k, v in rows if v is not None]
    metric_rows = _flat(metrics or {})
    if metric_rows:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {_cell(k)} | {_cell(_number(v))} |" for k, v in metric_rows]
    if usage:
        lines += ["", "## Use", "", usage.strip()]
    return "\n".join(lines) + "\n"


def write_model_card(directory: str | os.PathLike, **fields) -> Path:
    """Write `model_card(**fields)` as `<directory>/README.md` (atomically) and return its path.

    Example:
        >>> import tempfile
        >>> path = write_model_card(tempfile.mkdtemp(), base_model="tiny-llama", method="saft", sparsity=0.001)
        >>> path.name, "sparsity 0.001" in path.read_text()
        ('README.md', True)
    """
    path = Path(directory) / CARD_NAME
    with atomic_path(path) as tmp:
        tmp.write_text(model_card(**fields), encoding="utf-8")
    return path
