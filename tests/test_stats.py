"""pipeline/experiments/stats.py: bootstrap intervals over problems and seeds, paired differences, compare_to."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.common.errors import TargetError
from pipeline.experiments import experiment, stats
from pipeline.experiments.config import ExperimentConfig


def test_no_spread_gives_a_zero_width_interval():
    approx = pytest.approx(0.4)
    assert stats.bootstrap(np.full((3, 50), 0.4)) == stats.Interval(approx, approx, approx)


def test_two_problems_by_hand():
    # one seed, problems scored 0 and 1: a replicate's mean is 0, 0.5 or 1 with chance 1/4, 1/2, 1/4,
    # so the 2.5th and 97.5th percentiles are 0 and 1
    assert stats.bootstrap(np.array([[0.0, 1.0]])) == stats.Interval(0.5, 0.0, 1.0)


def test_many_problems_match_the_normal_approximation():
    # 400 problems, half right: standard error sqrt(0.25 / 400) = 0.025, so 0.5 ± 1.96 × 0.025
    interval = stats.bootstrap(np.array([[1.0, 0.0] * 200]))
    assert interval.mean == 0.5
    assert abs(interval.low - 0.451) < 0.01 and abs(interval.high - 0.549) < 0.01


def test_seeds_are_resampled_too():
    # no spread between problems, only between seeds 0.2, 0.5, 0.8: three draws are all the lowest
    # seed with chance 1/27 (> 2.5%), so the interval runs from 0.2 to 0.8
    scores = np.repeat([[0.2], [0.5], [0.8]], 100, axis=1)
    assert stats.bootstrap(scores) == stats.Interval(*map(pytest.approx, (0.5, 0.2, 0.8)))


def test_paired_difference_cancels_what_both_share():
    rng = np.random.default_rng(0)
    reference = rng.random((3, 200))  # wide spread between problems...
    better = stats.paired(reference + 0.05, reference)  # ...that the pairing removes
    assert better.difference == stats.Interval(pytest.approx(0.05), pytest.approx(0.05), pytest.approx(0.05))
    assert (better.wins, better.seeds) == (3, 3)
    assert better.difference.points() == "+5.0 pt [+5.0, +5.0]"
    with pytest.raises(ValueError, match="same seeds and problems"):
        stats.paired(reference[:2], reference)


def test_compare_to_must_name_a_target_of_the_grid():
    exp = ExperimentConfig(targets=["sft", "dft"], compare_to="kd")
    with pytest.raises(TargetError, match=r"experiment.compare_to='kd' names no target of the grid"):
        experiment.expand_grid(exp)


def test_comparison_table_shows_intervals_and_the_paired_column():
    def run(label: str, seed: int, scores: list[float]) -> dict:
        overall = {"average_at_n": float(np.mean(scores)), "pass_at_n": 1.0, "greedy": 0.5}
        return {"label": label, "seed": seed, "run": f"{label}-s{seed}", "status": "ok", "eval": {"arith": overall},
                "loss_curve": [(1, 1.0, 1.0)], "heldout_ce": None, "scores": {"arith": scores}}  # fmt: skip

    runs = [run("sft", s, [0.0, 0.5, 1.0, 0.5]) for s in (0, 1)] + [run("dft", s, [0.5, 1.0, 1.0, 1.0]) for s in (0, 1)]
    table = experiment.comparison_markdown(experiment.Comparison("e", 2, None, runs, compare_to="sft"))
    assert "## `arith` (" in table and "| Average@2 [95% CI] |" in table
    assert "| Δ vs sft [95% CI] | seeds won |" in table
    dft_row = next(line for line in table.splitlines() if line.startswith("| dft |"))
    assert "87.5% [" in dft_row and "| +37.5 pt [" in dft_row and "| 2/2 |" in dft_row
