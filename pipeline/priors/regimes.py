"""When γ = p targets help: the γ profile of a prior set and the regime bands (docs/design.md §10).

γ = p(observed) is how much DFT and Target-SFT trust each demonstration token. At step 0 p is the
base model's, which a prior set already stores (`obs_logprob_q`), so its distribution over the SFT
set costs no forward pass. "Beyond Log Likelihood" (BLL, arXiv 2510.00526) orders SFT settings by
its token-weighted mean (their Eq. 5, the "model-capability continuum") and finds where −p (DFT's
gradient) beats plain SFT and where it collapses. This module owns those bands and their sources;
the CLI, the manifest, the experiment table and its Prefect artifact all read them from here.

The profile is computed from the stored codes themselves: a code is `round(−log γ · 64)`
(`prior_schema`), so a histogram of the 65,536 codes gives the exact mean, shares and quantiles of
the stored γ in O(1) memory, whatever the number of tokens.
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.common import prior_schema
from pipeline.common.errors import CacheError

HIGH, LOW = 0.55, 0.01
"""BLL's Assumption 6.1 (model-strong: at least 70% of contexts with p > 0.55, their Table 6) and
the near-zero tail where γ = p gives a token no weight at all."""
QUANTILES = (0.05, 0.10, 0.20, 0.50)
"""q05, q10, q20 as in BLL's bottom-p ablation (`scripts/ablation/figure5/bottom_p`), and the median."""


@dataclass(frozen=True)
class Band:
    """A regime: mean γ in [low, high), with what the literature measured there."""

    name: str
    low: float
    high: float
    expectation: str
    """What to expect of γ = p targets (DFT, Target-SFT) against plain SFT in this band."""
    evidence: str
    """The measured settings the band rests on."""


BANDS = (
    Band(
        "model-weak",
        0.0,
        0.30,
        "plain SFT should win; γ = p targets (DFT, Target-SFT) can collapse below the base model",
        "BLL Table 3: figfont puzzles at mean 0.01-0.07, NLL 35.20 vs -p 0.00 exact match (Qwen2.5-7B)",
    ),
    Band(
        "model-intermediate",
        0.30,
        0.70,
        "γ = p targets and plain SFT should about tie (within ~2 points in BLL)",
        "BLL Table 2: medical m23k at mean 0.50-0.59 (LLaMA-3.2-3B 0.50 ... Qwen2.5-Math-7B 0.59)",
    ),
    Band(
        "model-strong",
        0.70,
        1.0 + 1e-9,
        "γ = p targets should beat plain SFT (the paper's regime: BLL -p +4 to +16 points of Average@16)",
        "BLL Table 1: NuminaMath-CoT at mean 0.76-0.81 on four base models; all ten Target-SFT settings "
        "are model-strong or model-intermediate",
    ),
)
"""The bands split the measured settings' gaps (weak 0.01-0.07 | intermediate 0.50-0.59 | strong
0.76-0.81): no published setting lies between 0.07 and 0.50 or between 0.59 and 0.76, so a set
there is labelled by the nearer side's rule (0.30, 0.70), and its expectation is weaker evidence."""


def band(mean: float) -> Band:
    """The band a mean γ falls in."""
    return next(b for b in BANDS if b.low <= mean < b.high)


def code_histogram(codes: Iterable[np.ndarray]) -> np.ndarray:
    """Counts of every uint16 code over the given `obs_logprob_q` arrays (65,536 bins)."""
    counts = np.zeros(prior_schema.NEG_INF_CODE + 1, dtype=np.int64)
    for block in codes:
        counts += np.bincount(np.asarray(block, dtype=np.int64), minlength=counts.size)
    return counts


def profile(counts: np.ndarray, captured_by: str = "model", caveat: str | None = None) -> dict[str, Any]:
    """The γ profile from a code histogram (`code_histogram`).

    Args:
        counts: tokens per code.
        captured_by: `model` (the model being trained captured the prior: its step-0 γ), `teacher`
            (another model did: training's γ is still the student's own p), or `unknown` (a set
            captured before this was recorded).
        caveat: what makes the profile inexact (an import without some observed log-probs), or None.

    Raises:
        CacheError: the set has no scored tokens (no γ to describe).
    """
    tokens = int(counts.sum())
    if tokens == 0:
        raise CacheError(
            "the prior set has no scored tokens, so it has no γ profile; check the data's completion masks"
        )
    gamma = np.exp(prior_schema.decode_logprobs(np.arange(counts.size, dtype=np.uint16)).astype(np.float64))
    # γ falls as the code rises: the share of tokens at or below a γ value is a suffix sum over codes
    order = np.argsort(gamma, kind="stable")
    cumulative = np.cumsum(counts[order]) / tokens
    quantiles = {f"q{round(q * 100):02d}": float(gamma[order][np.searchsorted(cumulative, q)]) for q in QUANTILES}
    mean = float((counts * gamma).sum() / tokens)
    regime = band(mean)
    out = {
        "tokens": tokens,
        "mean": mean,
        "share_above_0_55": float(counts[gamma > HIGH].sum() / tokens),
        "share_below_0_01": float(counts[gamma < LOW].sum() / tokens),
        **quantiles,
        "regime": regime.name,
        "expectation": regime.expectation,
        "evidence": regime.evidence,
        "captured_by": captured_by,
    }
    if caveat:
        out["caveat"] = caveat
    return out


PROFILE_FIELDS = ("tokens", "mean", "share_above_0_55", "share_below_0_01", "q05", "q10", "q20", "q50")


def profile_problem(p: Any, tokens: int | None = None) -> str | None:
    """Why a recorded profile (a manifest's, so possibly edited by hand) cannot be printed as it is, or
    None: every number in range, the regime the one its mean gives, the token count the set's."""
    if not isinstance(p, dict):
        return "it is not a mapping"
    for name in PROFILE_FIELDS:
        value = p.get(name)
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not 0 <= value <= (2**63 if name == "tokens" else 1)
        ):
            return f"{name}={value!r} is not a count or share"
    if p["tokens"] < 1 or (tokens is not None and p["tokens"] != tokens):
        return f"tokens={p['tokens']} is not the set's {tokens} scored tokens"
    if p.get("regime") != band(float(p["mean"])).name:
        return f"its regime is not the band of mean {p['mean']:.3f} ({band(float(p['mean'])).name})"
    return None


def describe(p: dict[str, Any], captured_by: str | None = None) -> str:
    """The profile as the lines `priors`, `cache show` and the experiment table print; `captured_by`
    (from the config at hand) replaces the role recorded at capture, since one set can serve one
    experiment as its student's prior and another as a teacher's."""
    who = {
        "model": "the model being trained (its γ at step 0)",
        "teacher": "a teacher, not the model being trained: training's γ is the student's own p",
        "unknown": "the prior model (captured before the role was recorded)",
    }.get(captured_by or p.get("captured_by", "unknown"), "the prior model")
    regime = band(float(p["mean"]))  # printed from the band, never from the file's text
    return (
        f"γ profile (p(observed) under {who}; {p['tokens']:,} scored tokens): mean {p['mean']:.3f}, "
        f"median {p['q50']:.3f}, q05 {p['q05']:.3f}, q10 {p['q10']:.3f}, q20 {p['q20']:.3f}; "
        f"γ > 0.55 on {p['share_above_0_55']:.1%}, γ < 0.01 on {p['share_below_0_01']:.1%}\n"
        f"regime: {regime.name} (bands on mean γ: weak < 0.30 ≤ intermediate < 0.70 ≤ strong); "
        f"expected: {regime.expectation} [{regime.evidence}]"
        + (f"\ncaveat: {html.escape(' '.join(str(p['caveat']).split())[:300])}" if p.get("caveat") else "")
    )
