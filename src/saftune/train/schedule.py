"""Learning-rate schedules as pure functions of the step (nanoGPT style).

Example:
    >>> [round(lr_multiplier(s, total_steps=10, warmup_steps=2), 3) for s in (0, 1, 2, 6, 9)]
    [0.5, 1.0, 1.0, 0.389, 0.0]
"""

from __future__ import annotations

import math


def lr_multiplier(step: int, *, total_steps: int, warmup_steps: int = 0, schedule: str = "cosine") -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based).

    Linear warmup over `warmup_steps`, then "cosine" decay to 0 at the last step, "linear" decay, or
    "constant".
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}; choose cosine, linear or constant")
