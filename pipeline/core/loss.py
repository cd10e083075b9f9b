"""The Q-target loss: a dense reference and a fused, chunked lm_head + loss.

Both compute loss_t = w_t · CE(Q_t, p_t) with Q and w detached, so that the gradient with
respect to the logits is exactly w·(p − Q) (docs/design.md §2).

* `q_target_loss` works on full logits [N, V] through autograd: the readable reference.
* `fused_q_target_loss` works on hidden states [N, H] and the lm_head weight [V, H]. It walks
  the scored tokens in chunks, never holding more than chunk × V logits, and computes the
  gradients w.r.t. hidden, weight and bias during the forward pass (as Liger's fused linear
  cross-entropy does), so the backward pass only scales them.

Both return `QLoss(loss, stats)`; `stats` holds detached per-batch sums (γ, entropy of Q, prior
mass captured by the stored top-k, CE to the observed token, scored-token count) that can be
added across micro-batches and all-reduced across ranks before `means()`.

Prior inputs (docs/design.md §3) travel as one `Prior(ids, logprobs, obs_logprob)`: `ids` and
`logprobs` [N, k] are the prior's top-k, and `obs_logprob` [N] its log-probability of the observed
token. Ids < 0 mark padding.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, cast

import torch
from torch import Tensor

from pipeline.common.errors import TargetError
from pipeline.common.prior_schema import Prior
from pipeline.core.targets import IGNORE, Coefficients, SupportStats, TailPolicy, TargetSpec, coefficients, q_entropy

STAT_NAMES = ("gamma", "q_entropy", "prior_mass", "ce")
Reduction = Literal["none", "sum", "mean"]


@dataclass
class TargetStats:
    """Detached sums over scored tokens; add them up, then call `means()`."""

    sums: Tensor
    """[5]: Σγ, ΣH(Q), Σπ_T(S), Σ −log p(y), scored-token count."""

    def __add__(self, other: TargetStats) -> TargetStats:
        return TargetStats(self.sums + other.sums.to(self.sums.device))

    def means(self) -> dict[str, float]:
        count = max(float(self.sums[-1]), 1.0)
        return {name: float(value) / count for name, value in zip(STAT_NAMES, self.sums[:-1], strict=True)}


class QLoss(NamedTuple):
    loss: Tensor
    stats: TargetStats


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _prior_support(labels: Tensor, prior: Prior | None, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor | None]:
    """Support S = top-k ∪ {y}: ids [N, k+1], valid mask, and prior log-probs (or None)."""
    y = labels.unsqueeze(-1)
    if prior is None:
        return y, torch.ones_like(y, dtype=torch.bool), None
    if prior.ids.shape != prior.logprobs.shape or prior.ids.shape[0] != labels.shape[0]:
        raise ValueError(
            f"prior shapes do not match: ids {tuple(prior.ids.shape)}, logprobs "
            f"{tuple(prior.logprobs.shape)}, labels {tuple(labels.shape)}"
        )
    valid_topk = (prior.ids >= 0) & (prior.ids != y)  # y's own entry is the last column
    ids = torch.cat([prior.ids.clamp(min=0), y], dim=-1)
    valid = torch.cat([valid_topk, torch.ones_like(y, dtype=torch.bool)], dim=-1)
    prior_lp = torch.cat([prior.logprobs.to(dtype), prior.obs_logprob.to(dtype).unsqueeze(-1)], dim=-1)
    return ids, valid, prior_lp


def _require_prior(spec: TargetSpec, prior: Prior | None) -> None:
    if spec.needs_prior and prior is None:
        raise TargetError(f"target {spec.name!r} needs a prior: pass prior=Prior(ids, logprobs, obs_logprob)")


def _topk_entropy(logp: Tensor, k: int) -> Tensor:
    top = logp.topk(min(k, logp.shape[-1]), dim=-1).values
    top = top - torch.logsumexp(top, dim=-1, keepdim=True)
    return -(top.exp() * top).sum(-1) / math.log(k)


def _support_stats(spec: TargetSpec, logp: Tensor, ids: Tensor, valid: Tensor, prior_lp: Tensor | None) -> SupportStats:
    """Gather everything `coefficients` needs from detached student log-probs [n, V]."""
    logp_s = logp.gather(-1, ids)
    entropy = _topk_entropy(logp, int(spec.gamma.param)) if spec.gamma.kind == "topk_entropy" else None
    return SupportStats(logp_s[:, -1], logp_s, valid, prior_lp, entropy)


def dense_target(coef: Coefficients, p: Tensor, ids: Tensor, valid: Tensor) -> Tensor:
    """Materialise Q [n, V] from the coefficients (reference and tests only)."""
    vocab = p.shape[-1]
    in_s = torch.zeros_like(p).scatter_(-1, ids, valid.to(p.dtype)) > 0
    residual = coef.uniform / vocab + coef.self_coef[:, None] * p
    residual = residual + coef.tail_coef[:, None] * p * (~in_s).to(p.dtype)
    if coef.sparse is not None:
        residual = residual.scatter_add(-1, ids, torch.where(valid, coef.sparse, 0.0))
    gamma = coef.gamma[:, None]
    observed = torch.zeros_like(p).scatter_(-1, ids[:, -1:], 1.0)
    return gamma * observed + (1 - gamma) * residual


def _stat_sums(coef: Coefficients, q_entropy: Tensor, logp_y: Tensor) -> Tensor:
    prior_mass = coef.prior_mass if coef.prior_mass is not None else torch.zeros_like(logp_y)
    count = torch.tensor([logp_y.numel()], dtype=logp_y.dtype, device=logp_y.device)
    sums = torch.stack([coef.gamma.sum(), q_entropy.sum(), prior_mass.sum(), (-logp_y).sum()])
    return torch.cat([sums, count]).detach().double()


def _reduce(per_token: Tensor, reduction: Reduction, num_items: float | Tensor | None, scored: int) -> Tensor:
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum":
        return total
    return total / (num_items if num_items is not None else max(scored, 1))


def q_target_loss(
    logits: Tensor,
    labels: Tensor,
    spec: TargetSpec,
    prior: Prior | None = None,
    tail: TailPolicy = "student_tail",
    reduction: Reduction = "none",
    num_items: float | Tensor | None = None,
) -> QLoss:
    """Dense reference: w·CE(Q, p) on full logits [N, V], gradient through autograd.

    Args:
        logits: [N, V] student logits (any float dtype; computed in fp32, or fp64 for fp64).
        labels: [N] observed next tokens, -100 where the position is not scored.
        spec: The target design (`pipeline.core.targets.preset(...)`).
        prior: The prior's top-k and observed-token log-probability, required when `spec.needs_prior`.
        tail: `student_tail` or `renormalize` (docs/design.md §3).
        reduction: `none` gives [N] (0 where ignored), `sum`, or `mean` over scored tokens.
        num_items: Normaliser for `mean` (e.g. the global scored-token count); default: local count.
    """
    dtype = _compute_dtype(logits.dtype)
    scored = labels != IGNORE
    rows = scored.nonzero().squeeze(-1)
    logp = torch.log_softmax(logits[rows].to(dtype), dim=-1)
    _require_prior(spec, prior)
    rows_prior = None if prior is None else prior.map(lambda t: t[rows])
    ids, valid, prior_lp = _prior_support(labels[rows], rows_prior, dtype)
    stats = _support_stats(spec, logp.detach(), ids, valid, prior_lp)
    coef = coefficients(spec, stats, tail)
    q = dense_target(coef, logp.detach().exp(), ids, valid)
    per_row = -coef.weight * (q * logp).sum(-1)
    per_token = torch.zeros(labels.shape, dtype=dtype, device=logits.device).index_put((rows,), per_row)
    q_entropy = -torch.special.xlogy(q, q).sum(-1)
    return QLoss(
        _reduce(per_token, reduction, num_items, rows.numel()), TargetStats(_stat_sums(coef, q_entropy, stats.logp_y))
    )


class _FusedQLoss(torch.autograd.Function):
    """Chunked lm_head + Q loss; gradients are computed in forward and scaled in backward."""

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        labels: Tensor,
        spec: TargetSpec,
        prior: Prior | None,
        tail: TailPolicy,
        scale: float | Tensor,
        chunk_size: int,
        compiled: bool,
        backend: str,
    ) -> tuple[Tensor, Tensor]:
        dtype = _compute_dtype(hidden.dtype)
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        rows = (labels != IGNORE).nonzero().squeeze(-1)
        if backend == "triton" and rows.numel():
            return _triton_forward(ctx, hidden, weight, bias, labels, rows, spec, prior, tail, scale, needs_grad)
        grad_hidden = torch.zeros_like(hidden) if needs_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if needs_grad else None
        grad_bias = (
            torch.zeros(weight.shape[0], dtype=dtype, device=weight.device) if needs_grad and bias is not None else None
        )
        loss = torch.zeros((), dtype=dtype, device=hidden.device)
        stat_sums = torch.zeros(len(STAT_NAMES) + 1, dtype=torch.float64, device=hidden.device)
        for start in range(0, rows.numel(), chunk_size):
            chunk = rows[start : start + chunk_size]
            h = hidden[chunk]
            logits = h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)
            chunk_prior = None if prior is None else prior.map(lambda t: t[chunk])  # noqa: B023
            chunk_loss, grad_logits, sums = (_compiled_chunk() if compiled else _chunk_loss_and_grad)(
                logits.to(dtype), labels[chunk], spec, chunk_prior, tail
            )
            loss += chunk_loss
            stat_sums += sums
            if needs_grad:
                assert grad_hidden is not None and grad_weight is not None
                grad_logits = grad_logits.mul_(scale).to(hidden.dtype)
                grad_hidden.index_copy_(0, chunk, grad_logits @ weight)
                if h.dtype == dtype:  # accumulate in place, no [V, H] temporary
                    grad_weight.addmm_(grad_logits.T, h)
                else:  # bf16/fp16 product, fp32 accumulation
                    grad_weight += (grad_logits.T @ h).to(dtype)
                if grad_bias is not None:
                    grad_bias += grad_logits.sum(0).to(dtype)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(stat_sums)
        return (loss * scale).to(hidden.dtype if hidden.dtype == torch.float64 else torch.float32), stat_sums

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_stats: Tensor):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        if grad_hidden is None:
            raise RuntimeError("fused_q_target_loss was called without grad enabled; cannot backward")
        grad_bias_out = None if grad_bias is None else (grad_bias * grad_loss).to(ctx.weight_dtype)
        return (
            grad_hidden * grad_loss.to(grad_hidden.dtype),
            (grad_weight * grad_loss).to(ctx.weight_dtype),
            grad_bias_out,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def _triton_forward(
    ctx: Any,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    rows: Tensor,
    spec: TargetSpec,
    prior: Prior | None,
    tail: TailPolicy,
    scale: float | Tensor,
    needs_grad: bool,
) -> tuple[Tensor, Tensor]:
    """`_FusedQLoss.forward` through the Triton kernels (`pipeline/core/triton_loss.py`)."""
    from pipeline.core import triton_loss

    rows_prior = None if prior is None else prior.map(lambda t: t[rows])
    ids, valid, prior_lp = _prior_support(labels[rows], rows_prior, torch.float32)
    loss, coef, q_entropy, logp_y, grad_h, grad_w, grad_b = triton_loss.q_loss_and_grads(
        hidden[rows].contiguous(), weight, bias, ids, valid, prior_lp, spec, tail, scale, needs_grad
    )
    grad_hidden = None
    if grad_h is not None:
        grad_hidden = torch.zeros_like(hidden).index_copy_(0, rows, grad_h.to(hidden.dtype))
    ctx.save_for_backward(grad_hidden, grad_w, grad_b)
    ctx.weight_dtype = weight.dtype
    stat_sums = _stat_sums(coef, q_entropy, logp_y)
    ctx.mark_non_differentiable(stat_sums)
    return (loss * scale).float(), stat_sums


Backend = Literal["auto", "torch", "triton"]
BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, spec: TargetSpec, hidden: Tensor) -> str:
    """Which implementation runs: `auto` is Triton on CUDA and the torch path elsewhere. Targets the
    kernels do not take (`triton_loss.supports`) and fp64 run on the torch path whatever is asked.

    Raises:
        ValueError: an unknown backend, or `triton` where no Triton kernel can run.
    """
    if backend not in BACKENDS:
        raise ValueError(f"loss backend {backend!r}: choose one of {BACKENDS}")
    if backend == "torch" or hidden.dtype == torch.float64:
        return "torch"
    on_cuda = hidden.device.type == "cuda"
    if backend == "triton" and not (on_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise ValueError(
            f"loss backend 'triton' needs a CUDA device (hidden is on {hidden.device}); use 'torch' or 'auto' "
            "(TRITON_INTERPRET=1 runs the kernels on a CPU, slowly, for tests)"
        )
    if (backend == "auto" and not on_cuda) or importlib.util.find_spec("triton") is None:
        return "torch"
    from pipeline.core import triton_loss

    return "triton" if triton_loss.supports(spec) else "torch"


@functools.cache
def _compiled_chunk() -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
    """`_chunk_loss_and_grad` through torch.compile: the elementwise passes over the chunk × V buffer
    fuse into a few kernels. Compiled once per process (dynamic shapes: chunks differ in length)."""
    return cast(Callable[..., tuple[Tensor, Tensor, Tensor]], torch.compile(_chunk_loss_and_grad, dynamic=True))


def _chunk_loss_and_grad(
    logits: Tensor,
    labels: Tensor,
    spec: TargetSpec,
    prior: Prior | None,
    tail: TailPolicy,
) -> tuple[Tensor, Tensor, Tensor]:
    """Loss sum, logit gradient w·(p − Q) and stat sums for one chunk of scored rows.

    `logits` [c, V] is consumed: it becomes log p, then p, then the gradient, in place where
    possible, so the chunk costs about two c × V buffers.
    """
    vocab = logits.shape[-1]
    ids, valid, prior_lp = _prior_support(labels, prior, logits.dtype)
    logp = logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))
    stats = _support_stats(spec, logp, ids, valid, prior_lp)
    coef = coefficients(spec, stats, tail)
    sum_logp = logp.sum(-1) if coef.uniform else None
    p = logp.exp()
    sum_plogp = torch.bmm(p.unsqueeze(1), logp.unsqueeze(2)).view(-1)  # Σ_V p log p, no c×V temp
    del logp, logits
    logp_s = stats.logp_s
    p_s = torch.where(valid, logp_s.exp(), 0.0)
    plogp_s = torch.where(valid, p_s * logp_s, 0.0).sum(-1)
    w, one_minus_gamma = coef.weight, 1 - coef.gamma
    # Σ_v Q(v) log p(v), assembled from per-row reductions and the k+1 support entries.
    residual_dot = coef.self_coef * sum_plogp + coef.tail_coef * (sum_plogp - plogp_s)
    if sum_logp is not None:
        residual_dot = residual_dot + coef.uniform * sum_logp / vocab
    if coef.sparse is not None:
        residual_dot = residual_dot + torch.where(valid, coef.sparse * logp_s, 0.0).sum(-1)
    loss = -(w * (coef.gamma * stats.logp_y + one_minus_gamma * residual_dot)).sum()
    # Gradient w·(p − Q): a dense affine map of p, then corrections on the k+1 support entries.
    dense_scale = w * (1 - one_minus_gamma * (coef.self_coef + coef.tail_coef))
    grad = p.mul_(dense_scale[:, None])
    if coef.uniform:
        grad.sub_((w * one_minus_gamma * coef.uniform / vocab)[:, None])
    on_support = coef.tail_coef[:, None] * p_s - (coef.sparse if coef.sparse is not None else 0.0)
    on_support = torch.where(valid, (w * one_minus_gamma)[:, None] * on_support, 0.0)
    on_support[:, -1] -= w * coef.gamma
    grad.scatter_add_(-1, ids, on_support)
    entropy = q_entropy(coef, p_s, valid, ids, sum_plogp - plogp_s, vocab)
    return loss, grad, _stat_sums(coef, entropy, stats.logp_y)


def fused_q_target_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    spec: TargetSpec,
    prior: Prior | None = None,
    bias: Tensor | None = None,
    tail: TailPolicy = "student_tail",
    reduction: Literal["sum", "mean"] = "sum",
    num_items: float | Tensor | None = None,
    chunk_size: int = 1024,
    compiled: bool = False,
    backend: Backend = "torch",
) -> QLoss:
    """Fused lm_head + Q-target loss from hidden states, never forming [N, V] logits.

    Args:
        hidden: [N, H] final hidden states (flatten batch and time first).
        weight: [V, H] lm_head weight; `bias` [V] if the head has one.
        labels: [N] next-token labels, -100 where not scored (shift them before calling).
        spec, prior, tail: As for `q_target_loss`.
        reduction: `sum`, or `mean` = sum / num_items (default: local scored count). Pass the
            global count of scored tokens under gradient accumulation or data parallelism.
        chunk_size: Scored tokens per chunk; peak extra memory is about 2 × chunk × V floats.
        compiled: Run the chunk step through torch.compile (the same numbers up to float summation
            order; the first call compiles, tens of seconds).
        backend: `torch` (the chunk loop above: the reference and the CPU path), `triton` (the
            kernels of `pipeline/core/triton_loss.py`: logits stay on chip), or `auto` (Triton on CUDA).
            Targets the kernels do not take run on the torch path (`resolve_backend`). The default
            stays `torch` until the kernels are measured on a GPU (issue 23).
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"fused_q_target_loss supports reduction 'sum' or 'mean', got {reduction!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    _require_prior(spec, prior)
    if reduction == "mean":
        count = num_items if num_items is not None else max(int((labels != IGNORE).sum()), 1)
        scale: float | Tensor = 1.0 / count
    else:
        scale = 1.0
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        # A custom Function sees autocast too: its matmuls would come out in bf16 beside fp32 buffers. Do
        # what autocast does for the lm_head matmul (cast its inputs; autograd casts the gradients back),
        # and run the chunks with autocast off.
        low = torch.get_autocast_dtype(device_type)
        hidden, weight, bias = hidden.to(low), weight.to(low), None if bias is None else bias.to(low)
    with torch.autocast(device_type, enabled=False):
        chosen = resolve_backend(backend, spec, hidden)
        loss, sums = _FusedQLoss.apply(
            hidden, weight, bias, labels, spec, prior, tail, scale, chunk_size, compiled, chosen
        )
    return QLoss(loss, TargetStats(sums))
