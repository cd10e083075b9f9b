"""Q-targets: Q = γ·δ(y) + (1 − γ)·π̃, trained with loss = w·CE(Q, p) (docs/design.md §2).

A `TargetSpec` is three plain choices: a label trust γ, a residual π̃ and a weight w. The eleven
published methods are presets; any other combination can be written in a config mapping:

    {gamma: {pow: 0.5}, residual: {guided: 0.3}, weight: 1}
    {gamma: p, residual: prior, weight: {p_plus: 0.1}}

This module only describes targets and computes their per-position coefficients from detached
student statistics; `pipeline.core.loss` turns the coefficients into a loss and a gradient.

Sparse prior and tail (docs/design.md §3). At each position the prior is known on the support
S = top-k ∪ {y}; r = 1 − π_T(S) is the tail mass. `renormalize` drops r; `student_tail` spreads
r over V \\ S in proportion to the detached student p. When the student puts (numerically) no
mass outside S, `student_tail` falls back to `renormalize`, since there is nothing to spread over.
For `guided(η)` the tail rule is applied before the geometric mix, and π_T^0 = 1 (so η = 0 is
exactly `self`, i.e. DFT, under either tail policy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from pipeline.common.errors import TargetError

GammaKind = Literal["const", "p", "pow", "threshold", "ratio", "topk_entropy"]
ResidualKind = Literal["uniform", "self", "prior", "guided"]
TailPolicy = Literal["renormalize", "student_tail"]
TAIL_POLICIES = ("renormalize", "student_tail")

IGNORE = -100
"""The label of a position that gets no target (Hugging Face's convention): prompt tokens, padding.
Every scored position has the observed token as its label; the loss and the batches agree on this."""


@dataclass(frozen=True)
class Gamma:
    """Label trust γ ∈ [0, 1], computed from the detached student."""

    kind: GammaKind
    param: float = 0.0
    """c for const, α for pow, τ for threshold, λ for ratio, k for topk_entropy."""


@dataclass(frozen=True)
class Residual:
    """Residual distribution π̃."""

    kind: ResidualKind
    eta: float = 0.0
    """η for guided: π̃ ∝ p^(1−η) · π_T^η."""


@dataclass(frozen=True)
class Weight:
    """Per-position weight w = const + p(y)·[p_plus]."""

    const: float = 1.0
    p_plus: bool = False


@dataclass(frozen=True)
class TargetSpec:
    """A complete Q-target design."""

    gamma: Gamma
    residual: Residual
    weight: Weight = Weight()
    name: str = "custom"

    @property
    def needs_prior(self) -> bool:
        """Whether the residual reads the cached prior (and so a prior cache is required)."""
        return self.residual.kind in ("prior", "guided") and not self.gamma_is_one

    @property
    def gamma_is_one(self) -> bool:
        return self.gamma.kind == "const" and self.gamma.param == 1.0


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise TargetError(message)


def _unit(name: str, value: float) -> float:
    _check(0.0 <= value <= 1.0, f"{name} must be in [0, 1], got {value}")
    return float(value)


def _nonneg(name: str, value: float) -> float:
    _check(value >= 0.0 and math.isfinite(value), f"{name} must be >= 0, got {value}")
    return float(value)


def _presets() -> dict[str, Any]:
    def prior_weighted(lam: float) -> TargetSpec:
        lam = _nonneg("lam", lam)
        return TargetSpec(Gamma("const", 1 / (1 + lam)), Residual("prior"), Weight(1 + lam), "sft_kl")

    return {
        "sft": lambda: TargetSpec(Gamma("const", 1.0), Residual("self"), name="sft"),
        "label_smoothing": lambda lam=0.1: TargetSpec(
            Gamma("const", 1 - _unit("lam", lam)), Residual("uniform"), name="label_smoothing"
        ),
        "dft": lambda: TargetSpec(Gamma("p"), Residual("self"), name="dft"),
        "beyond_log": lambda alpha=1.0: TargetSpec(
            Gamma("pow", _positive("alpha", alpha)), Residual("self"), name="beyond_log"
        ),
        "profit": lambda tau=0.1: TargetSpec(Gamma("threshold", _unit("tau", tau)), Residual("self"), name="profit"),
        "eaft": lambda topk=20: TargetSpec(Gamma("topk_entropy", _topk(topk)), Residual("self"), name="eaft"),
        "sft_kl": prior_weighted,
        "asft": lambda lam=0.1: TargetSpec(
            Gamma("ratio", _nonneg("lam", lam)), Residual("prior"), Weight(lam, p_plus=True), "asft"
        ),
        "kd": lambda: TargetSpec(Gamma("const", 0.0), Residual("prior"), name="kd"),
        "hybrid_kd": lambda lam=0.5: TargetSpec(
            Gamma("const", 1 - _unit("lam", lam)), Residual("prior"), name="hybrid_kd"
        ),
        "target_sft": lambda eta=0.5: TargetSpec(Gamma("p"), Residual("guided", _unit("eta", eta)), name="target_sft"),
    }


def _positive(name: str, value: float) -> float:
    _check(value > 0.0 and math.isfinite(value), f"{name} must be > 0, got {value}")
    return float(value)


def _topk(value: float) -> float:
    _check(int(value) == value and value >= 2, f"topk must be an integer >= 2, got {value}")
    return float(value)


PRESETS = tuple(_presets())


def preset(name: str, **params: float) -> TargetSpec:
    """A published method as a TargetSpec, e.g. `preset("target_sft", eta=0.5)`.

    Raises:
        TargetError: Unknown preset, unknown parameter or a parameter out of range.
    """
    presets = _presets()
    if name not in presets:
        raise TargetError(f"unknown target preset {name!r}; choose one of {list(presets)}")
    import inspect

    allowed = list(inspect.signature(presets[name]).parameters)
    if set(params) - set(allowed):
        raise TargetError(f"preset {name!r} takes parameters {allowed}, got {sorted(params)}")
    not_numbers = {k: v for k, v in params.items() if isinstance(v, bool) or not isinstance(v, int | float)}
    if not_numbers:
        raise TargetError(f"preset {name!r}: parameters must be numbers, got {not_numbers}")
    return presets[name](**params)


def from_config(config: Any) -> TargetSpec:
    """Build a target from a config value.

    Accepted forms: a `TargetConfig`, a preset name (`"dft"`), a preset with parameters
    (`{preset: target_sft, eta: 0.3}`), or a free composition
    (`{gamma: {pow: 0.5}, residual: {guided: 0.3}, weight: 1}`).
    """
    if hasattr(config, "compact"):  # a typed TargetConfig
        config = config.compact()
    if isinstance(config, str):
        return preset(config)
    if not isinstance(config, dict):
        raise TargetError(f"a target must be a preset name or a mapping, got {config!r}")
    if "preset" in config:
        params = {k: v for k, v in config.items() if k != "preset"}
        return preset(config["preset"], **params)
    unknown = set(config) - {"gamma", "residual", "weight", "name"}
    _check(not unknown, f"unknown target keys {sorted(unknown)}; use gamma, residual, weight (or preset)")
    _check("gamma" in config and "residual" in config, "a composed target needs both `gamma` and `residual`")
    return TargetSpec(
        _parse_gamma(config["gamma"]),
        _parse_residual(config["residual"]),
        _parse_weight(config.get("weight", 1.0)),
        str(config.get("name", "custom")),
    )


def _single(value: Any, what: str) -> tuple[str, Any]:
    if isinstance(value, str):
        return value, None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "const", value
    _check(isinstance(value, dict) and len(value) == 1, f"{what} must be a name or a one-key mapping, got {value!r}")
    ((key, param),) = value.items()
    return key, param


def _parse_gamma(value: Any) -> Gamma:
    kind, param = _single(value, "gamma")
    validators = {
        "const": lambda v: _unit("gamma const", v),
        "p": lambda v: 0.0,
        "pow": lambda v: _positive("gamma pow alpha", v),
        "threshold": lambda v: _unit("gamma threshold tau", v),
        "ratio": lambda v: _nonneg("gamma ratio lambda", v),
        "topk_entropy": _topk,
    }
    _check(kind in validators, f"unknown gamma {kind!r}; choose one of {list(validators)}")
    _check(kind == "p" or param is not None, f"gamma {kind!r} needs a parameter, e.g. {{{kind}: 0.5}}")
    return Gamma(kind, validators[kind](param))  # type: ignore[arg-type]


def _parse_residual(value: Any) -> Residual:
    kind, param = _single(value, "residual")
    _check(
        kind in ("uniform", "self", "prior", "guided"),
        f"unknown residual {kind!r}; choose uniform, self, prior or guided",
    )
    if kind == "guided":
        _check(param is not None, "residual guided needs η, e.g. {guided: 0.5}")
        return Residual("guided", _unit("eta", param))
    return Residual(kind)  # type: ignore[arg-type]


def _parse_weight(value: Any) -> Weight:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return Weight(_nonneg("weight", value))
    _check(
        isinstance(value, dict) and bool(value) and set(value) <= {"const", "p_plus"},
        f"weight must be a number, {{const: c}} or {{p_plus: λ}} (w = p(y) + λ), got {value!r}",
    )
    if "p_plus" in value:
        return Weight(_nonneg("weight p_plus", value["p_plus"]), p_plus=True)
    return Weight(_nonneg("weight const", value["const"]))


# --------------------------------------------------------------------------------------------
# Per-position coefficients. Everything below works on detached tensors of shape [N] / [N, k+1].


@dataclass
class SupportStats:
    """Detached student and prior statistics on each position's support S = top-k ∪ {y}."""

    logp_y: Tensor
    """[N] student log p(y)."""
    logp_s: Tensor
    """[N, k+1] student log p on S (last column is y; invalid entries are arbitrary)."""
    valid_s: Tensor
    """[N, k+1] bool: entry belongs to S (not padding, not a duplicate of y)."""
    prior_logp_s: Tensor | None
    """[N, k+1] prior log π_T on S (−inf on invalid entries), None without a prior."""
    topk_entropy: Tensor | None
    """[N] normalised entropy of the student's top-k, only for topk_entropy γ."""


@dataclass
class Coefficients:
    """Q = γ·δ(y) + (1−γ)·[uniform/V + self_coef·p + tail_coef·p·1(v∉S) + sparse on S]."""

    gamma: Tensor
    weight: Tensor
    uniform: float
    self_coef: Tensor
    tail_coef: Tensor
    sparse: Tensor | None
    """[N, k+1] residual mass on S (0 on invalid entries)."""
    prior_mass: Tensor | None
    """[N] π_T(S), the prior mass the stored top-k captures (diagnostic)."""


def tail_eps(dtype: torch.dtype) -> float:
    """Below this student tail mass, `student_tail` has nothing to spread over (falls back)."""
    return 64 * torch.finfo(dtype).eps


def coefficients(spec: TargetSpec, stats: SupportStats, tail: TailPolicy) -> Coefficients:
    """γ, w and the residual's shape at every position, all detached."""
    _check(tail in TAIL_POLICIES, f"unknown tail policy {tail!r}; choose one of {TAIL_POLICIES}")
    p_y = stats.logp_y.exp()
    zeros = torch.zeros_like(p_y)
    gamma = label_trust(spec.gamma, p_y, stats.topk_entropy)
    weight = spec.weight.const + (p_y if spec.weight.p_plus else zeros)
    kind = spec.residual.kind
    if kind == "uniform":
        return Coefficients(gamma, weight, 1.0, zeros, zeros, None, None)
    if kind == "self":
        return Coefficients(gamma, weight, 0.0, zeros + 1.0, zeros, None, None)
    if stats.prior_logp_s is None:
        raise TargetError(f"target {spec.name!r} uses the prior, but no prior was given; capture priors first")
    eta = 1.0 if kind == "prior" else spec.residual.eta
    tail_coef, sparse, prior_mass = _prior_residual(stats, tail, eta)
    return Coefficients(gamma, weight, 0.0, zeros, tail_coef, sparse, prior_mass)


def label_trust(gamma: Gamma, p_y: Tensor, topk_entropy: Tensor | None) -> Tensor:
    if gamma.kind == "const":
        return torch.full_like(p_y, gamma.param)
    if gamma.kind == "p":
        return p_y
    if gamma.kind == "pow":
        return p_y.pow(gamma.param)
    if gamma.kind == "threshold":
        return (p_y > gamma.param).to(p_y.dtype)
    if gamma.kind == "ratio":
        return p_y / (p_y + gamma.param) if gamma.param > 0 else torch.ones_like(p_y)
    assert topk_entropy is not None, "topk_entropy γ needs SupportStats.topk_entropy"
    return topk_entropy


def _prior_residual(stats: SupportStats, tail: TailPolicy, eta: float) -> tuple[Tensor, Tensor, Tensor]:
    """π̃ ∝ p^(1−η)·π_T^η on S and on the tail, with π_T completed by the tail policy."""
    assert stats.prior_logp_s is not None
    if float(torch.tensor(eta, dtype=stats.logp_s.dtype)) == 0.0:
        eta = 0.0  # an η that underflows in this dtype (1e-300 in float32) is η = 0, or 0·(−inf) gives NaN
    valid = stats.valid_s
    neg_inf = torch.tensor(-math.inf, dtype=stats.logp_s.dtype, device=valid.device)
    prior_lp = torch.where(valid, stats.prior_logp_s, neg_inf)
    prior_mass = prior_lp.exp().sum(-1).clamp(max=1.0)
    tail_prior = (1.0 - prior_mass).clamp(min=0.0)
    student_tail = (1.0 - torch.where(valid, stats.logp_s.exp(), 0.0).sum(-1)).clamp(min=0.0)
    spread = (tail == "student_tail") & (student_tail > tail_eps(stats.logp_s.dtype)) & (tail_prior > 0)
    if tail == "renormalize":
        prior_lp = prior_lp - prior_mass.log().unsqueeze(-1)
    # log of the unnormalised mix on S; 0·log π_T is taken as 0 (π_T^0 = 1), so η = 0 is `self`.
    mix_s = (1.0 - eta) * stats.logp_s + (eta * prior_lp if eta > 0 else 0.0)
    mix_s = torch.where(valid, mix_s, neg_inf)
    # Tail: π_T(v) = c·p(v) with c = r / p(V∖S), so the mix there is c^η·p(v).
    log_c = torch.where(spread, tail_prior.clamp(min=1e-300).log() - student_tail.clamp(min=1e-300).log(), neg_inf)
    if eta == 0:
        log_c = torch.zeros_like(log_c)  # π_T^0 = 1 everywhere: the tail keeps p
    log_tail_mass = torch.where(student_tail > 0, eta * log_c + student_tail.clamp(min=1e-300).log(), neg_inf)
    log_z = torch.logsumexp(torch.cat([mix_s, log_tail_mass.unsqueeze(-1)], dim=-1), dim=-1)
    sparse = (mix_s - log_z.unsqueeze(-1)).exp()
    tail_coef = (eta * log_c - log_z).exp()
    # A prior with no mass anywhere it can be used says nothing: fall back to the student.
    degenerate = ~torch.isfinite(log_z)
    if degenerate.any():
        sparse = torch.where(degenerate[:, None] & valid, stats.logp_s.exp(), sparse)
        tail_coef = torch.where(degenerate, 1.0, tail_coef)
    return tail_coef, torch.where(valid, sparse, 0.0), prior_mass


def q_entropy(coef: Coefficients, p_s: Tensor, valid: Tensor, ids: Tensor, tail_plogp: Tensor, vocab: int) -> Tensor:
    """H(Q) without touching the c × V buffer: explicit on S, closed form on V ∖ S.

    Outside S, Q(v) = (1−γ)·(uniform/V + (self + tail)·p(v)); residuals are exclusive, so this
    is either a constant b or a multiple a·p(v) of the student.
    """
    one_minus_gamma = 1 - coef.gamma
    q_s = one_minus_gamma[:, None] * (coef.uniform / vocab + coef.self_coef[:, None] * p_s)
    if coef.sparse is not None:
        q_s = q_s + one_minus_gamma[:, None] * coef.sparse
    q_s = torch.where(valid, q_s, 0.0)
    q_s[:, -1] += coef.gamma
    inside = torch.special.xlogy(q_s, q_s).sum(-1)
    a = one_minus_gamma * (coef.self_coef + coef.tail_coef)
    student_tail = (1 - p_s.sum(-1)).clamp(min=0)
    outside = a * tail_plogp + torch.special.xlogy(a, a) * student_tail
    if coef.uniform:
        b = one_minus_gamma * coef.uniform / vocab
        outside = outside + (vocab - valid.sum(-1)) * torch.special.xlogy(b, b)
    return -(inside + outside)
