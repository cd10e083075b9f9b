"""GPU checks (`pytest -m gpu`, run by benchmarks/gpu_suite.sh on a CUDA machine; deselected elsewhere).

The same equalities the CPU suite proves, on the CUDA kernels the real runs use: the fused loss
against the dense reference in bf16, its compiled chunk step, and packed against padded training
with sdpa (and flash_attention_2 where the flash-attn package is installed).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from pipeline.common.prior_schema import Prior
from pipeline.core.loss import fused_q_target_loss, q_target_loss
from pipeline.core.targets import preset
from pipeline.data.tokens import Example
from pipeline.training import batching, train

pytestmark = pytest.mark.gpu

ATTENTION = ["sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])


@pytest.fixture(autouse=True)
def _cuda():
    if not torch.cuda.is_available():
        pytest.fail("pytest -m gpu needs a CUDA device")  # run it where one is; never a silent skip


def _case(n: int = 4096, hidden: int = 896, vocab: int = 32768, k: int = 20):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, hidden, generator=g) / hidden**0.5
    w = torch.randn(vocab, hidden, generator=g) * 0.02
    labels = torch.randint(vocab, (n,), generator=g)
    labels[: n // 10] = -100
    prior = Prior(
        torch.randint(vocab, (n, k), generator=g),
        torch.log_softmax(torch.randn(n, k, generator=g), -1) - 0.1,
        torch.full((n,), -5.0),
    )
    return h.cuda(), w.cuda(), labels.cuda(), prior.map(lambda t: t.cuda())


@pytest.mark.parametrize("compiled,backend", [(False, "torch"), (True, "torch"), (False, "triton")])
def test_fused_loss_on_cuda_matches_the_dense_reference(compiled, backend):
    """bf16 leaves, every backend (the Triton kernels' bf16 path is tested only here: the CPU
    interpreter's bf16 `tl.dot` is wrong, triton-lang/triton#11584)."""
    h, w, labels, prior = _case()
    spec = preset("target_sft", eta=0.5)
    ref_h, ref_w = h.double().requires_grad_(True), w.double().requires_grad_(True)
    ref = q_target_loss(ref_h @ ref_w.T, labels, spec, prior, reduction="mean")
    ref.loss.backward()
    bh, bw = h.bfloat16().requires_grad_(True), w.bfloat16().requires_grad_(True)
    out = fused_q_target_loss(
        bh, bw, labels, spec, prior, reduction="mean", chunk_size=1024, compiled=compiled, backend=backend
    )
    out.loss.backward()
    assert abs(float(out.loss) - float(ref.loss)) <= 2e-2 * abs(float(ref.loss))
    for got, want in ((bh.grad, ref_h.grad), (bw.grad, ref_w.grad)):
        err = (got.double() - want).norm() / want.norm()
        assert float(err) < 2e-2


def test_triton_fp32_on_cuda_matches_the_dense_reference():
    """fp32 through the kernels (IEEE dots, no TF32): as tight as on the CPU interpreter."""
    h, w, labels, prior = _case(n=1024, vocab=8192)
    spec = preset("target_sft", eta=0.5)
    ref_h, ref_w = h.double().requires_grad_(True), w.double().requires_grad_(True)
    ref = q_target_loss(ref_h @ ref_w.T, labels, spec, prior, reduction="mean")
    ref.loss.backward()
    fh, fw = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = fused_q_target_loss(fh, fw, labels, spec, prior, reduction="mean", backend="triton")
    out.loss.backward()
    assert abs(float(out.loss) - float(ref.loss)) <= 1e-5 * abs(float(ref.loss))
    for got, want in ((fh.grad, ref_h.grad), (fw.grad, ref_w.grad)):
        assert float((got.double() - want).abs().max() / want.abs().max()) < 1e-4


@pytest.mark.parametrize("attn", ATTENTION)
def test_packed_equals_padded_on_cuda(attn):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=1024, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=256, attn_implementation=attn)  # fmt: skip
    torch.manual_seed(0)
    dtype = torch.bfloat16 if attn == "flash_attention_2" else torch.float32
    model = Qwen2ForCausalLM(config).to(device="cuda", dtype=dtype)
    g = torch.Generator().manual_seed(0)
    examples = [
        Example.from_labels(i, torch.randint(1024, (n,), generator=g).tolist(), [-100] * (n // 4) + [0] * (n - n // 4))
        for i, n in enumerate([37, 64, 5, 120])
    ]
    normaliser = float(sum(e.num_scored for e in examples))
    losses = []
    for batch in (batching.collate(examples, 0, None), batching.collate_packed(examples, None)):
        model.zero_grad()
        loss, _ = train.TargetLossModel(model, preset("sft"), "student_tail", 64)(batch.to("cuda"), normaliser)
        loss.backward()
        losses.append((float(loss), model.model.embed_tokens.weight.grad.float().clone()))
    (loss_a, grad_a), (loss_b, grad_b) = losses
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
    assert abs(loss_a - loss_b) <= tol * abs(loss_a)
    assert float((grad_a - grad_b).norm() / grad_a.norm()) <= tol * 5


def test_a_training_step_under_bf16_autocast_on_cuda():
    """What `train.precision: auto` does on a GPU: fp32 weights, bf16 autocast, gradient checkpointing,
    the fused Target-SFT loss; the step gives finite fp32 gradients close to the fp32 step's."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=1024, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=256)  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).cuda()
    model.gradient_checkpointing_enable()
    model.train()
    g = torch.Generator().manual_seed(1)
    examples = [
        Example.from_labels(i, torch.randint(1024, (n,), generator=g).tolist(), [-100] * (n // 4) + [0] * (n - n // 4))
        for i, n in enumerate([37, 64, 120])
    ]
    batch = batching.collate(examples, 0, None).to("cuda")
    loss_model = train.TargetLossModel(model, preset("sft"), "student_tail", 64)
    grads = []
    for autocast in (False, True):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss, _ = loss_model(batch, float(sum(e.num_scored for e in examples)))
        loss.backward()
        grad = model.model.embed_tokens.weight.grad
        assert grad.dtype == torch.float32 and bool(torch.isfinite(grad).all())
        grads.append(grad.clone())
    assert float((grads[1] - grads[0]).norm() / grads[0].norm()) < 5e-2
