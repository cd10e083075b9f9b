"""Intervals for comparing targets: a bootstrap over problems and seeds, and paired differences.

A target's accuracy varies with the problems drawn and with the training seed, so both are
resampled: each bootstrap replicate draws seeds with replacement, then problems with replacement,
and averages the per-problem scores (a problem's share of correct samples, Average@n) over both.
The 2.5th and 97.5th percentiles of the replicates bound the 95% interval.

A paired comparison takes the per-problem differences between a target and the reference target
(`experiment.compare_to`) for the same seed and the same problem, so the problem difficulty that
both share cancels, and bootstraps their mean the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REPLICATES = 2000


@dataclass(frozen=True)
class Interval:
    """A mean with its 95% bootstrap interval."""

    mean: float
    low: float
    high: float

    def percent(self) -> str:
        """`51.2% [48.0, 54.3]`, or `+2.1 [-0.5, 4.6]` style for differences (see `points`)."""
        return f"{self.mean:.1%} [{self.low:.1%}, {self.high:.1%}]"

    def points(self) -> str:
        """A difference in percentage points: `+2.1 pt [-0.5, +4.6]`."""
        return f"{100 * self.mean:+.1f} pt [{100 * self.low:+.1f}, {100 * self.high:+.1f}]"


def bootstrap(scores: np.ndarray, replicates: int = REPLICATES, seed: int = 0) -> Interval:
    """Mean of `scores` [seeds, problems] with a 95% interval from resampling seeds and problems."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.size == 0:
        raise ValueError(f"scores must be a non-empty [seeds, problems] array, got shape {scores.shape}")
    rng = np.random.default_rng(seed)
    seeds, problems = scores.shape
    rows = rng.integers(seeds, size=(replicates, seeds))
    cols = rng.integers(problems, size=(replicates, problems))
    # replicate r: mean over the drawn seeds of each drawn seed's mean over the drawn problems
    # (100 replicates at a time: the gathered block is replicates × seeds × problems)
    means = np.concatenate(
        [
            scores[rows[i : i + 100, :, None], cols[i : i + 100, None, :]].mean(axis=(1, 2))
            for i in range(0, replicates, 100)
        ]
    )
    low, high = np.percentile(means, [2.5, 97.5])
    return Interval(float(scores.mean()), float(low), float(high))


@dataclass(frozen=True)
class Paired:
    """A target against the reference on the same problems and seeds."""

    difference: Interval
    """Mean per-problem difference (target − reference) with its 95% interval."""
    wins: int
    """Seeds where the target's mean beats the reference's."""
    seeds: int


def paired(target: np.ndarray, reference: np.ndarray, seed: int = 0) -> Paired:
    """Compare [seeds, problems] scores row by row (the same seed and problem order in both)."""
    target, reference = np.asarray(target, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if target.shape != reference.shape:
        raise ValueError(f"paired scores need the same seeds and problems: {target.shape} vs {reference.shape}")
    wins = int((target.mean(axis=1) > reference.mean(axis=1)).sum())
    return Paired(bootstrap(target - reference, seed=seed), wins, target.shape[0])
