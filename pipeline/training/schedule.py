"""The learning-rate schedule both trainers use: linear warmup, then cosine decay to a floor."""

from __future__ import annotations

import math


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, floor: float = 0.1) -> float:
    """The lr factor at `step` (0-based): (step+1)/warmup during warmup, so the first step already
    learns, then a cosine from 1 down to `floor` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
