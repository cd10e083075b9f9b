"""The fused Q-target loss as two Triton kernels over vocabulary tiles (docs/design.md §2, issue 23).

The torch path (`loss._chunk_loss_and_grad`) makes about eight passes over a chunk × V buffer.
Here the logits never leave on-chip memory. With z = h·Wᵀ + b for one scored row, the target
Q = γ·δ(y) + (1−γ)·[u/V + self·p + tail·p·1(v∉S) + sparse on S] (`targets.Coefficients`) needs
only three row sums over the vocabulary, plus the k+1 logits on the support S = top-k ∪ {y}:

    lse    = m + log Σ_v e^{z_v − m}                  (m: running max)
    Σ p·z  = Σ_v e^{z_v − m}·z_v / Σ_v e^{z_v − m}    so Σ p log p = Σ p·z − lse
    Σ z                                                so Σ log p = Σ z − V·lse (label smoothing)

`_row_stats` streams the tiles once for these (an online softmax, as in flash attention). The
coefficients, the loss and H(Q) then follow in O(k) per row, in torch, from the formulas of
`loss._chunk_loss_and_grad`. The gradient w·(p − Q) is a dense affine map of p,

    g_v = a·e^{z_v − lse} − b,   a = w·(1 − (1−γ)(self + tail)),   b = w·(1−γ)·u/V,

plus corrections on the k+1 support entries. `_grad` recomputes each (rows × vocab) tile, forms
g, and adds g·W into ∂h and gᵀ·h into ∂W (and Σ g into ∂b) with fp32 atomics, as Cut
Cross-Entropy's backward does; the support corrections are gathers and an index_add in torch.
That is 2NHV for the statistics and 6NHV for the gradients, with no N × V buffer.

Not taken here (routed to the torch path by `supports`): γ from the student's top-k entropy (eaft),
which needs a top-k over the vocabulary per row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from pipeline.core.targets import Coefficients, SupportStats, TailPolicy, TargetSpec, coefficients, q_entropy

BLOCKS = (64, 128, 64)
"""(rows, vocabulary, hidden) per tile; the tests shrink them to cross tile edges on tiny shapes."""


def supports(spec: TargetSpec) -> bool:
    """Whether the kernels take this target (the rest runs on the torch path)."""
    return spec.gamma.kind != "topk_entropy"


@triton.jit
def _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, D, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """z[rows, cols] = h[rows] · W[cols]ᵀ (+ b[cols]) in fp32, from BLOCK_D-wide slices of H."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        h = tl.load(h_ptr + rows[:, None] * D + d[None, :], mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
        w = tl.load(w_ptr + cols[:, None] * D + d[None, :], mask=col_ok[:, None] & (d[None, :] < D), other=0.0)
        if IEEE:
            acc += tl.dot(h, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(h, tl.trans(w))
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _row_stats(h_ptr, w_ptr, b_ptr, lse_ptr, pz_ptr, zsum_ptr, N, V, D, HAS_BIAS: tl.constexpr,
               IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """Per row: lse, Σ p·z and Σ z, in one online pass over the vocabulary tiles.

    Running max m, s = Σ e^{z−m}, t = Σ e^{z−m}·z; a new max m' rescales both by e^{m−m'}.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    t = tl.zeros((BLOCK_M,), dtype=tl.float32)
    zsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, D, HAS_BIAS, IEEE, BLOCK_M, BLOCK_V, BLOCK_D)
        z = tl.where(col_ok[None, :], z, 0.0)
        m_new = tl.maximum(m, tl.max(tl.where(col_ok[None, :], z, float("-inf")), axis=1))
        e = tl.where(col_ok[None, :], tl.exp(z - m_new[:, None]), 0.0)
        alpha = tl.exp(m - m_new)
        s = s * alpha + tl.sum(e, axis=1)
        t = t * alpha + tl.sum(e * z, axis=1)
        zsum += tl.sum(z, axis=1)
        m = m_new
    tl.store(lse_ptr + rows, m + tl.log(s), mask=row_ok)
    tl.store(pz_ptr + rows, t / s, mask=row_ok)
    tl.store(zsum_ptr + rows, zsum, mask=row_ok)


@triton.jit
def _grad(h_ptr, w_ptr, b_ptr, lse_ptr, a_ptr, c_ptr, gh_ptr, gw_ptr, gb_ptr, N, V, D, HAS_BIAS: tl.constexpr,
          IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """One (rows × vocab) tile of g = a·softmax(z) − c, added into ∂h = g·W, ∂W = gᵀ·h, ∂b = Σ g."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok, col_ok = rows < N, cols < V
    z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, D, HAS_BIAS, IEEE, BLOCK_M, BLOCK_V, BLOCK_D)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    a = tl.load(a_ptr + rows, mask=row_ok, other=0.0)
    c = tl.load(c_ptr + rows, mask=row_ok, other=0.0)
    g = a[:, None] * tl.exp(z - lse[:, None]) - c[:, None]
    g = tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0)
    if HAS_BIAS:
        tl.atomic_add(gb_ptr + cols, tl.sum(g, axis=0), mask=col_ok)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        w = tl.load(w_ptr + cols[:, None] * D + d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        h = tl.load(h_ptr + rows[:, None] * D + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        gl = g.to(w.dtype)
        if IEEE:
            gh = tl.dot(gl, w, input_precision="ieee")
            gw = tl.dot(tl.trans(gl), h, input_precision="ieee")
        else:
            gh = tl.dot(gl, w)
            gw = tl.dot(tl.trans(gl), h)
        tl.atomic_add(gh_ptr + rows[:, None] * D + d[None, :], gh, mask=row_ok[:, None] & d_ok[None, :])
        tl.atomic_add(gw_ptr + cols[:, None] * D + d[None, :], gw, mask=col_ok[:, None] & d_ok[None, :])


SUPPORT_ROWS = 1024
"""Rows per step of the support gathers in torch (each holds rows × (k+1) × H floats)."""


def _row_slices(n: int) -> list[slice]:
    return [slice(start, min(start + SUPPORT_ROWS, n)) for start in range(0, n, SUPPORT_ROWS)]


def q_loss_and_grads(
    h: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    ids: Tensor,
    valid: Tensor,
    prior_lp: Tensor | None,
    spec: TargetSpec,
    tail: TailPolicy,
    scale: float | Tensor,
    needs_grad: bool,
) -> tuple[Tensor, Coefficients, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Loss sum and gradients for scored rows `h` [n, H] (contiguous), support `ids` [n, k+1].

    Returns (loss sum, coefficients, H(Q) [n], log p(y) [n], ∂h [n, H] fp32, ∂W [V, H] fp32, ∂b [V]
    fp32), the gradients already multiplied by `scale` (None when not `needs_grad`).
    """
    n, dim = h.shape
    vocab = weight.shape[0]
    block_m, block_v, block_d = BLOCKS
    weight = weight.contiguous()
    ieee = h.dtype == torch.float32  # fp32 stays fp32 (no TF32): the reference agrees to 1e-5
    f32, dev = torch.float32, h.device
    lse, pz, zsum = (torch.empty(n, dtype=f32, device=dev) for _ in range(3))
    dummy = bias if bias is not None else lse
    _row_stats[(triton.cdiv(n, block_m),)](
        h, weight, dummy, lse, pz, zsum, n, vocab, dim, bias is not None, ieee, block_m, block_v, block_d
    )
    # --- the support: k+1 logits per row, gathered (O(n·k·H)), then the coefficients (O(n·k))
    z_s = torch.cat([torch.einsum("nd,nkd->nk", h[r].float(), weight[ids[r]].float()) for r in _row_slices(n)])
    if bias is not None:
        z_s = z_s + bias.float()[ids]
    logp_s = z_s - lse[:, None]
    coef = coefficients(spec, SupportStats(logp_s[:, -1], logp_s, valid, prior_lp, None), tail)
    p_s = torch.where(valid, logp_s.exp(), 0.0)
    plogp_s = torch.where(valid, p_s * logp_s, 0.0).sum(-1)
    sum_plogp = pz - lse
    w, one_minus_gamma = coef.weight, 1 - coef.gamma
    residual_dot = coef.self_coef * sum_plogp + coef.tail_coef * (sum_plogp - plogp_s)
    if coef.uniform:
        residual_dot = residual_dot + coef.uniform * (zsum - vocab * lse) / vocab
    if coef.sparse is not None:
        residual_dot = residual_dot + torch.where(valid, coef.sparse * logp_s, 0.0).sum(-1)
    loss = -(w * (coef.gamma * logp_s[:, -1] + one_minus_gamma * residual_dot)).sum()

    entropy = q_entropy(coef, p_s, valid, ids, sum_plogp - plogp_s, vocab)
    if not needs_grad:
        return loss, coef, entropy, logp_s[:, -1], None, None, None
    # --- the dense part of w·(p − Q) on every tile, then the corrections on S
    a = (w * (1 - one_minus_gamma * (coef.self_coef + coef.tail_coef)) * scale).float().contiguous()
    c = (w * one_minus_gamma * coef.uniform / vocab * scale).float().contiguous()
    grad_h = torch.zeros(n, dim, dtype=f32, device=dev)
    grad_w = torch.zeros(vocab, dim, dtype=f32, device=dev)
    grad_b = torch.zeros(vocab, dtype=f32, device=dev) if bias is not None else None
    _grad[(triton.cdiv(n, block_m), triton.cdiv(vocab, block_v))](
        h, weight, dummy, lse, a, c, grad_h, grad_w, grad_b if grad_b is not None else lse,
        n, vocab, dim, bias is not None, ieee, block_m, block_v, block_d,
    )  # fmt: skip
    on_support = coef.tail_coef[:, None] * p_s - (coef.sparse if coef.sparse is not None else 0.0)
    on_support = torch.where(valid, (w * one_minus_gamma)[:, None] * on_support, 0.0)
    on_support[:, -1] -= w * coef.gamma
    on_support = (on_support * scale).float()
    for r in _row_slices(n):  # [rows, k+1, H] at a time: the whole batch's gather would be n·k·H floats
        grad_h[r] += torch.einsum("nk,nkd->nd", on_support[r], weight[ids[r]].float())
        outer = on_support[r][:, :, None] * h[r].float()[:, None, :]
        grad_w.index_add_(0, ids[r].reshape(-1), outer.reshape(-1, dim))
    if grad_b is not None:
        grad_b.index_add_(0, ids.reshape(-1), on_support.reshape(-1))
    return loss, coef, entropy, logp_s[:, -1], grad_h, grad_w, grad_b
