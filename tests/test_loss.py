"""The Q-target loss against the original methods' losses, and fused against dense (docs/design.md §2–§3).

The references below are written independently of `pipeline.core.targets`: each original loss as
the paper/DESIGN table states it, and the sparse prior completed to a full distribution over V
by its tail policy, directly from the definitions.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.common.prior_schema import Prior
from pipeline.core.loss import dense_target, fused_q_target_loss, q_target_loss
from pipeline.core.targets import PRESETS, TargetError, from_config, preset

N, V, K = 9, 40, 5
PARAMS = {
    "label_smoothing": {"lam": 0.2},
    "beyond_log": {"alpha": 0.7},
    "profit": {"tau": 0.02},
    "eaft": {"topk": 6},
    "sft_kl": {"lam": 0.3},
    "asft": {"lam": 0.25},
    "hybrid_kd": {"lam": 0.4},
    "target_sft": {"eta": 0.35},
}


def make_case(seed: int, dtype=torch.float64, n=N, vocab=V, k=K, scale=3.0):
    """Random logits, labels (some ignored; y inside and outside the prior top-k), sparse prior."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, vocab, generator=g, dtype=torch.float64) * scale).to(dtype)
    prior_full = torch.log_softmax(torch.randn(n, vocab, generator=g, dtype=torch.float64) * scale, -1)
    top_lp, top_ids = prior_full.topk(k, dim=-1)
    labels = torch.empty(n, dtype=torch.long)
    for i in range(n):
        if i % 3 == 0:  # observed token inside the top-k
            labels[i] = top_ids[i, i % k]
        else:  # outside the top-k
            outside = [v for v in range(vocab) if v not in set(top_ids[i].tolist())]
            labels[i] = outside[int(torch.randint(len(outside), (1,), generator=g))]
    labels[1] = -100
    labels[n - 2] = -100
    obs = prior_full.gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1)
    return logits, labels, top_ids, top_lp, obs


def full_prior(p, labels, top_ids, top_lp, obs, tail):
    """π_T over all of V from the sparse prior, by the tail policy's definition (detached p)."""
    n, vocab = p.shape
    pi = torch.zeros(n, vocab, dtype=p.dtype)
    for i in range(n):
        support = {int(v): float(lp) for v, lp in zip(top_ids[i], top_lp[i], strict=True)}
        support[int(labels[i])] = float(obs[i])
        ids = torch.tensor(sorted(support))
        mass = torch.tensor([math.exp(support[int(v)]) for v in ids], dtype=p.dtype)
        if tail == "renormalize":
            pi[i, ids] = mass / mass.sum()
        else:
            outside = torch.ones(vocab, dtype=torch.bool)
            outside[ids] = False
            pi[i, outside] = (1 - mass.sum()) * p[i, outside] / p[i, outside].sum()
            pi[i, ids] = mass
    return pi


def original_loss(name, params, logits, labels, pi):
    """Per-token original loss of each method, as docs/design.md §2 writes it (scored rows only)."""
    logp = torch.log_softmax(logits, -1)
    p_y = logp.gather(-1, labels[:, None]).squeeze(-1).exp()
    nll = -logp.gather(-1, labels[:, None]).squeeze(-1)
    sg = lambda t: t.detach()  # noqa: E731
    kl = (pi * (pi.clamp(min=1e-300).log() - logp)).sum(-1)
    if name == "sft":
        return nll
    if name == "label_smoothing":
        return F.cross_entropy(logits, labels, label_smoothing=params["lam"], reduction="none")
    if name == "dft":
        return sg(p_y) * nll
    if name == "beyond_log":
        a = params["alpha"]
        return (1 - p_y**a) / a
    if name == "profit":
        return (sg(p_y) > params["tau"]).double() * nll
    if name == "eaft":
        k = params["topk"]
        top = logp.detach().topk(k, -1).values
        top = top - torch.logsumexp(top, -1, keepdim=True)
        return sg(-(top.exp() * top).sum(-1) / math.log(k)) * nll
    if name == "sft_kl":
        return nll + params["lam"] * kl
    if name == "asft":
        return sg(p_y) * nll + params["lam"] * kl
    if name == "kd":
        return -(pi * logp).sum(-1)
    if name == "hybrid_kd":
        return (1 - params["lam"]) * nll + params["lam"] * kl
    raise AssertionError(name)


def guided_q(p, labels, pi, eta):
    """Target-SFT's Q from the definition: p(y)δ(y) + (1 − p(y))·normalise(p^(1−η) π^η)."""
    mix = p ** (1 - eta) * pi**eta
    mix = mix / mix.sum(-1, keepdim=True)
    p_y = p.gather(-1, labels[:, None])
    return p_y * F.one_hot(labels, p.shape[-1]).double() + (1 - p_y) * mix


def rel_err(a, b):
    return float((a - b).abs().max().detach() / b.abs().max().detach().clamp(min=1e-6))


def prior_kwargs(top_ids, top_lp, obs):
    return {"prior": Prior(top_ids, top_lp, obs)}


@pytest.mark.parametrize("tail", ["student_tail", "renormalize"])
@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_preset_gradient_matches_original_loss(name, tail, seed):
    logits, labels, top_ids, top_lp, obs = make_case(seed)
    spec = preset(name, **PARAMS.get(name, {}))
    z = logits.clone().requires_grad_(True)
    out = q_target_loss(z, labels, spec, **prior_kwargs(top_ids, top_lp, obs), tail=tail)
    assert out.loss[labels == -100].abs().max() == 0
    (grad,) = torch.autograd.grad(out.loss.sum(), z)
    assert grad[labels == -100].abs().max() == 0

    keep = labels != -100
    zk = logits[keep].clone().requires_grad_(True)
    p = torch.softmax(zk.detach(), -1)
    pi = full_prior(p, labels[keep], top_ids[keep], top_lp[keep], obs[keep], tail)
    if name == "target_sft":
        q_ref = guided_q(p, labels[keep], pi, PARAMS[name]["eta"])
        ref_grad = p - q_ref
    else:
        (ref_grad,) = torch.autograd.grad(original_loss(name, PARAMS.get(name, {}), zk, labels[keep], pi).sum(), zk)
    assert rel_err(grad[keep], ref_grad) <= 1e-9, f"{name}/{tail}"

    # The gradient is w·(p − Q), and the loss is w·CE(Q, p), with the library's own Q.
    from pipeline.core.loss import _prior_support, _support_stats
    from pipeline.core.targets import coefficients

    ids, valid, prior_lp = _prior_support(labels[keep], Prior(top_ids[keep], top_lp[keep], obs[keep]), torch.float64)
    coef = coefficients(spec, _support_stats(spec, torch.log(p), ids, valid, prior_lp), tail)
    q = dense_target(coef, p, ids, valid)
    assert rel_err(grad[keep], coef.weight[:, None] * (p - q)) <= 1e-9
    ce = -(q * torch.log(p)).sum(-1)
    assert rel_err(out.loss[keep], coef.weight * ce) <= 1e-9
    if name == "target_sft":
        assert rel_err(q, q_ref) <= 1e-9


def test_label_smoothing_value_equals_torch_cross_entropy():
    logits, labels, *_ = make_case(3)
    keep = labels != -100
    out = q_target_loss(logits, labels, preset("label_smoothing", lam=0.15))
    ref = F.cross_entropy(logits[keep], labels[keep], label_smoothing=0.15, reduction="none")
    assert rel_err(out.loss[keep], ref) <= 1e-12


@pytest.mark.parametrize("tail", ["student_tail", "renormalize"])
def test_eta_endpoints(tail):
    logits, labels, top_ids, top_lp, obs = make_case(4)
    kw = prior_kwargs(top_ids, top_lp, obs)

    def grad_of(spec):
        z = logits.clone().requires_grad_(True)
        q_target_loss(z, labels, spec, **kw, tail=tail).loss.sum().backward()
        return z.grad

    assert rel_err(grad_of(preset("target_sft", eta=0.0)), grad_of(preset("dft"))) <= 1e-12
    prior_only = from_config({"gamma": "p", "residual": "prior", "weight": 1})
    assert rel_err(grad_of(preset("target_sft", eta=1.0)), grad_of(prior_only)) <= 1e-12
    # and η strictly inside moves away from both ends
    middle = grad_of(preset("target_sft", eta=0.5))
    assert rel_err(middle, grad_of(prior_only)) > 1e-3
    assert rel_err(middle, grad_of(preset("dft"))) > 1e-3


@pytest.mark.parametrize("tail", ["student_tail", "renormalize"])
@pytest.mark.parametrize("path", ["dense", "fused"])
def test_target_sft_at_eta_0_is_dft_exactly(tail, path):
    """docs/design.md §2: π_T^0 = 1, so η = 0 leaves π̃ = p and Q = p(y)δ(y) + (1 − p(y))p, DFT's
    target: the same loss values and the same gradients, on the dense and the fused path (the short
    run's weights: tests/test_train.py)."""
    g = torch.Generator().manual_seed(11)
    _, labels, top_ids, top_lp, obs = make_case(6)
    hidden = torch.randn(N, 16, generator=g, dtype=torch.float64)
    weight = torch.randn(V, 16, generator=g, dtype=torch.float64)

    def run(spec):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        kw = {**prior_kwargs(top_ids, top_lp, obs), "tail": tail}
        if path == "dense":
            out = q_target_loss(h @ w.T, labels, spec, **kw)
        else:
            out = fused_q_target_loss(h, w, labels, spec, **kw, chunk_size=4)
        out.loss.sum().backward()
        return out.loss.detach(), h.grad, w.grad

    for got, want in zip(run(preset("target_sft", eta=0.0)), run(preset("dft")), strict=True):
        assert rel_err(got, want) <= 1e-12  # fp64: the two routes differ only in rounding


@pytest.mark.parametrize("tail", ["student_tail", "renormalize"])
def test_target_sft_at_eta_1_is_the_hybrid_with_adaptive_lambda(tail):
    """η = 1: Q = p(y)δ(y) + (1 − p(y))π_T, hybrid KD with λ = 1 − p(y) (detached), written here from
    the definition over the full prior (tail completed by its policy) against the fused loss."""
    logits, labels, top_ids, top_lp, obs = make_case(8)
    keep = labels != -100
    z = logits.clone().requires_grad_(True)
    p = torch.softmax(z.detach(), -1)
    pi = full_prior(p, labels.clamp(min=0), top_ids, top_lp, obs, tail)
    lam = 1 - p.gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1)
    logp = torch.log_softmax(z, -1)
    nll = -logp.gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1)
    reference = ((1 - lam) * nll - lam * (pi * logp).sum(-1))[keep]
    reference.sum().backward()
    spec, kw = preset("target_sft", eta=1.0), {**prior_kwargs(top_ids, top_lp, obs), "tail": tail}
    dense_z = logits.clone().requires_grad_(True)
    dense = q_target_loss(dense_z, labels, spec, **kw)
    dense.loss.sum().backward()
    assert rel_err(dense.loss[keep], reference.detach()) <= 1e-12
    assert rel_err(dense_z.grad, z.grad) <= 1e-12
    # the fused path with hidden = I and weight = logitsᵀ, so hidden @ weightᵀ = logits and weight.grad = gradᵀ
    weight = logits.T.contiguous().requires_grad_(True)
    fused = fused_q_target_loss(torch.eye(N, dtype=torch.float64), weight, labels, spec, **kw, chunk_size=3)
    fused.loss.backward()
    assert rel_err(fused.loss, reference.detach().sum()) <= 1e-12
    assert rel_err(weight.grad.T, z.grad) <= 1e-12


FUSED_TOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["sft", "label_smoothing", "dft", "eaft", "asft", "kd", "target_sft"])
@pytest.mark.parametrize("tail", ["student_tail", "renormalize"])
def test_fused_equals_dense(dtype, name, tail):
    """Value and gradients w.r.t. hidden, weight and bias, for every chunk size.

    bf16 bound: the fused path rounds the logit gradient to bf16 before its two matmuls (as any
    bf16 lm_head backward does); 3e-2 relative to the largest entry covers that rounding.
    """
    g = torch.Generator().manual_seed(7)
    n, hdim = 13, 16
    _, labels, top_ids, top_lp, obs = make_case(5, n=n)
    hidden64 = torch.randn(n, hdim, generator=g, dtype=torch.float64)
    weight64 = torch.randn(V, hdim, generator=g, dtype=torch.float64) * 0.7
    bias64 = torch.randn(V, generator=g, dtype=torch.float64) * 0.1
    spec = preset(name, **PARAMS.get(name, {}))
    kw = {**prior_kwargs(top_ids, top_lp, obs), "tail": tail}

    def leaves(dt):
        return [t.to(dt).clone().requires_grad_(True) for t in (hidden64, weight64, bias64)]

    h, w, b = leaves(torch.float64)  # the dense reference, always in fp64
    ref = q_target_loss(h @ w.T + b, labels, spec, **kw, reduction="mean")
    ref.loss.backward()
    for chunk in (1, 4, 13, 64):
        hf, wf, bf = leaves(dtype)
        out = fused_q_target_loss(hf, wf, labels, spec, **kw, bias=bf, reduction="mean", chunk_size=chunk)
        out.loss.backward()
        tol = FUSED_TOL[dtype]
        assert rel_err(out.loss.double(), ref.loss) <= tol
        for got, want in ((hf.grad, h.grad), (wf.grad, w.grad), (bf.grad, b.grad)):
            assert got.dtype == dtype
            assert rel_err(got.double(), want) <= tol, (chunk, dtype)
        assert torch.allclose(out.stats.sums, ref.stats.sums, rtol=max(tol, 1e-7), atol=1e-6)


def test_fused_loss_under_bf16_autocast_with_fp32_leaves():
    """Training's setting: fp32 master weights and hidden states under bf16 autocast (the default on a
    GPU). Autocast reaches into the custom Function; the loss casts like autocast's lm_head matmul, and
    the gradients land in fp32 on the leaves, close to the fp64 reference."""
    g = torch.Generator().manual_seed(11)
    _, labels, top_ids, top_lp, obs = make_case(4, n=13)
    hidden64 = torch.randn(13, 16, generator=g, dtype=torch.float64)
    weight64 = torch.randn(V, 16, generator=g, dtype=torch.float64) * 0.7
    spec = preset("target_sft", eta=0.5)
    kw = prior_kwargs(top_ids, top_lp, obs)
    h, w = hidden64.clone().requires_grad_(True), weight64.clone().requires_grad_(True)
    q_target_loss(h @ w.T, labels, spec, **kw, reduction="mean").loss.backward()
    hf, wf = hidden64.float().requires_grad_(True), weight64.float().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_q_target_loss(hf, wf, labels, spec, **kw, reduction="mean", chunk_size=4)
    out.loss.backward()
    for got, want in ((hf.grad, h.grad), (wf.grad, w.grad)):
        assert got.dtype == torch.float32
        assert rel_err(got.double(), want) <= FUSED_TOL[torch.bfloat16]


@pytest.mark.slow  # 43 s of compilation on 2 cores; the default suite reached 21 min 10 s on a fresh clone
def test_compiled_chunk_step_gives_the_eager_loss_and_gradients():
    """`train.compile_loss`: torch.compile of the chunk step, on CPU here, equal to the eager fused loss
    up to float summation order (the GPU suite times it)."""
    g = torch.Generator().manual_seed(3)
    _, labels, top_ids, top_lp, obs = make_case(8)
    hidden = torch.randn(N, 16, generator=g)
    weight = torch.randn(V, 16, generator=g) * 0.5
    spec = preset("target_sft", eta=0.5)
    results = []
    for compiled in (False, True):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        out = fused_q_target_loss(
            h, w, labels, spec, **prior_kwargs(top_ids, top_lp, obs), reduction="mean", chunk_size=5, compiled=compiled
        )
        out.loss.backward()
        results.append((out.loss.detach(), h.grad, w.grad, out.stats.sums))
    for eager, compiled in zip(*results, strict=True):
        assert torch.allclose(eager, compiled, rtol=1e-5, atol=1e-6)


def test_mean_reduction_uses_explicit_normaliser():
    _, labels, *_ = make_case(6)
    hidden = torch.randn(N, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, 8, dtype=torch.float64, requires_grad=True)
    total = fused_q_target_loss(hidden, weight, labels, preset("sft"), reduction="sum").loss
    mean = fused_q_target_loss(hidden, weight, labels, preset("sft"), reduction="mean", num_items=100).loss
    assert torch.allclose(mean, total / 100)
    # two micro-batches divided by the global count give the gradient of the whole batch
    spec = preset("target_sft", eta=0.5)
    _, labels, top_ids, top_lp, obs = make_case(6)
    count = int((labels != -100).sum())
    whole = fused_q_target_loss(hidden, weight, labels, spec, **prior_kwargs(top_ids, top_lp, obs), reduction="mean")
    g_whole = torch.autograd.grad(whole.loss, [hidden, weight])
    halves = [slice(0, 4), slice(4, N)]
    parts = [
        fused_q_target_loss(
            hidden[s],
            weight,
            labels[s],
            spec,
            **prior_kwargs(top_ids[s], top_lp[s], obs[s]),
            reduction="mean",
            num_items=count,
        ).loss
        for s in halves
    ]
    g_parts = torch.autograd.grad(parts[0] + parts[1], [hidden, weight])
    for a, b in zip(g_whole, g_parts, strict=True):
        assert rel_err(b, a) <= 1e-12


def test_stats_are_meaningful():
    logits, labels, top_ids, top_lp, obs = make_case(8)
    out = q_target_loss(logits, labels, preset("sft"))
    means = out.stats.means()
    keep = labels != -100
    assert means["gamma"] == pytest.approx(1.0)
    assert means["q_entropy"] == pytest.approx(0.0, abs=1e-12)
    nll = -torch.log_softmax(logits[keep], -1).gather(-1, labels[keep][:, None]).mean()
    assert means["ce"] == pytest.approx(float(nll))
    kd = q_target_loss(logits, labels, preset("kd"), **prior_kwargs(top_ids, top_lp, obs)).stats.means()
    captured = torch.cat([top_lp, obs[:, None]], -1).exp()
    assert 0 < kd["prior_mass"] <= float(captured.sum(-1).max()) + 1e-9
    assert kd["q_entropy"] > 0.1


def test_prior_targets_without_prior_fail_clearly():
    logits, labels, *_ = make_case(0)
    with pytest.raises(TargetError, match="needs a prior"):
        q_target_loss(logits, labels, preset("target_sft", eta=0.5))
    hidden, weight = torch.randn(N, 4), torch.randn(V, 4)
    with pytest.raises(TargetError, match="needs a prior"):
        fused_q_target_loss(hidden, weight, labels, preset("kd"))


def test_fused_sft_matches_the_hf_model_loss(tiny_build):
    """The README's compute_loss recipe: hidden states + lm_head weight give HF's own SFT loss."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_build.model, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(model.config.vocab_size, (2, 24), generator=g)
    labels = input_ids.clone()
    labels[:, :10] = -100  # prompt

    hf_loss = model(input_ids=input_ids, labels=labels).loss
    hf_grads = torch.autograd.grad(hf_loss, list(model.parameters()))

    hidden = model.model(input_ids=input_ids).last_hidden_state[:, :-1].flatten(0, 1)
    shifted = labels[:, 1:].flatten()
    out = fused_q_target_loss(hidden, model.lm_head.weight, shifted, preset("sft"), reduction="mean", chunk_size=7)
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    assert torch.allclose(out.loss, hf_loss, rtol=1e-5)
    for a, b in zip(grads, hf_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
