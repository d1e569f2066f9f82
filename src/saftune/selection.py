"""Hyperparameter search on validation accuracy: candidate lists, edge extension, interior checks.

A grid lists candidate values per option (`{lr: [3e-4, 1e-3, 3e-3]}`). When the best candidate lies at
the edge of a numeric list, the true optimum may lie beyond it, so the list is extended one geometric
step in that direction (3e-3 -> 9e-3), holding the other options at their best values, and the new
candidate is tried; this repeats a bounded number of times. A choice that is still at an edge is
reported as such, never silently. This module is pure logic; `saftune.grid` runs the trials.

Example:
    >>> trials = [Trial({"lr": lr}, {1: v}) for lr, v in [(1e-4, 0.6), (1e-3, 0.7), (1e-2, 0.8)]]
    >>> best = best_trial(trials)
    >>> best.options, edges(trials, best)
    ({'lr': 0.01}, {'lr': 'high'})
    >>> extension(trials, "lr", "high")
    0.1
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field


@dataclass
class Trial:
    """One candidate and its validation accuracy per protocol seed."""

    options: dict
    val: dict = field(default_factory=dict)  # seed -> validation accuracy

    @property
    def mean(self) -> float:
        return statistics.fmean(self.val.values())

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.val.values()) if len(self.val) > 1 else None

    def to_dict(self) -> dict:
        return {"options": self.options, "val": {str(k): v for k, v in self.val.items()}, "mean": self.mean,
                "std": self.std}


def candidates(grid: dict) -> list[dict]:
    """Every combination of the listed values, in order (a scalar is a fixed value).

    Example:
        >>> candidates({"lr": [1, 2], "strength": 0.5})
        [{'lr': 1, 'strength': 0.5}, {'lr': 2, 'strength': 0.5}]
    """
    keys = list(grid)
    lists = [grid[k] if isinstance(grid[k], list) else [grid[k]] for k in keys]
    out = [{}]
    for key, values in zip(keys, lists):
        out = [{**c, key: v} for c in out for v in values]
    return out


def best_trial(trials: list[Trial]) -> Trial:
    """The trial with the best mean validation accuracy; ties go to the earlier trial."""
    return max(trials, key=lambda t: t.mean)  # max keeps the first of equal values


def _numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def searched_values(trials: list[Trial], key: str) -> list[float]:
    """The distinct numeric values tried for `key`, ascending."""
    return sorted({t.options[key] for t in trials if _numeric(t.options.get(key))})


def edges(trials: list[Trial], best: Trial) -> dict[str, str]:
    """Options whose best value is the lowest or highest of two or more tried values: {key: "low"|"high"}."""
    out = {}
    for key, value in best.options.items():
        values = searched_values(trials, key)
        if len(values) < 2 or not _numeric(value):
            continue
        if value == values[0]:
            out[key] = "low"
        elif value == values[-1]:
            out[key] = "high"
    return out


def extension(trials: list[Trial], key: str, direction: str) -> float:
    """The next value beyond the edge: one geometric step (the ratio of the two outermost values).

    Lists that include zero or negative values step arithmetically instead. The result is rounded to 3
    significant digits so that recorded values read like the hand-written ones.

    Example:
        >>> trials = [Trial({"lr": v}, {1: 0.5}) for v in (3e-4, 1e-3, 3e-3)]
        >>> extension(trials, "lr", "low"), extension(trials, "lr", "high")
        (9e-05, 0.009)
    """
    values = searched_values(trials, key)
    inner, outer = (values[1], values[0]) if direction == "low" else (values[-2], values[-1])
    if inner > 0 and outer > 0:
        value = outer * (outer / inner)
    else:
        value = outer + (outer - inner)
    return float(f"{value:.3g}")


def within(value: float, limits: list | tuple | None) -> bool:
    """Whether `value` lies inside [low, high] (no limits: always)."""
    return limits is None or limits[0] <= value <= limits[1]
