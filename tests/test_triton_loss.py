"""The Triton kernels of the fused Q loss against the dense reference, on a CPU (issue 23).

`TRITON_INTERPRET=1` runs the kernels with numpy, one program at a time (5-8 ms each), so the
shapes are tiny and the tiles are shrunk to 16 so that every kernel crosses row, vocabulary and
hidden-size tile edges. bf16 is not tested here: `tl.dot` on bf16 is wrong in the interpreter
(triton-lang/triton#11584); the GPU suite (`pytest -m gpu`) covers it.
"""

from __future__ import annotations

import os

import pytest
import torch

from pipeline.common.prior_schema import Prior
from pipeline.core import loss as loss_module
from pipeline.core.loss import fused_q_target_loss, q_target_loss, resolve_backend
from pipeline.core.targets import PRESETS, preset
from pipeline.entry import stages
from tests.test_loss import PARAMS, make_case

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1 (tests/conftest.py sets it)", allow_module_level=True)
TAKEN = [name for name in PRESETS if name != "eaft"]  # eaft: γ from the student's top-k → torch path


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    from pipeline.core import triton_loss

    monkeypatch.setattr(triton_loss, "BLOCKS", (16, 16, 16))


def _case(n=37, vocab=40, hdim=24, seed=3):
    """Rows over three row tiles, a vocabulary over three tiles (the last partial), H over two;
    ignored rows, y inside and outside the top-k, and a padded prior entry."""
    g = torch.Generator().manual_seed(seed)
    _, labels, top_ids, top_lp, obs = make_case(seed, n=n, vocab=vocab)
    top_ids[0, -1], top_lp[0, -1] = -1, float("-inf")  # a padded top-k slot
    hidden = torch.randn(n, hdim, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, hdim, generator=g, dtype=torch.float64) * 0.7
    bias = torch.randn(vocab, generator=g, dtype=torch.float64) * 0.1
    return hidden, weight, bias, labels, Prior(top_ids, top_lp, obs)


def _run(backend, dtype, name, tail, with_bias=True):
    hidden, weight, bias, labels, prior = _case()
    leaves = [t.to(dtype).clone().requires_grad_(True) for t in (hidden, weight, bias)]
    h, w, b = leaves
    spec = preset(name, **PARAMS.get(name, {}))
    out = fused_q_target_loss(h, w, labels, spec, prior=prior, bias=b if with_bias else None, tail=tail,
                              reduction="mean", backend=backend)  # fmt: skip
    out.loss.backward()
    return out._replace(loss=out.loss.detach()), [t.grad for t in leaves]


def _reference(name, tail, with_bias=True):
    hidden, weight, bias, labels, prior = _case()
    h, w, b = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
    spec = preset(name, **PARAMS.get(name, {}))
    ref = q_target_loss(h @ w.T + (b if with_bias else 0), labels, spec, prior=prior, tail=tail, reduction="mean")
    ref.loss.backward()
    return ref._replace(loss=ref.loss.detach()), [h.grad, w.grad, b.grad]


def _rel(a, b):
    return float((a.double() - b).abs().max() / b.abs().max().clamp(min=1e-30))


@pytest.mark.parametrize("tail", ["student_tail", "renormalize"])
@pytest.mark.parametrize("name", TAKEN)
def test_triton_fp32_matches_the_dense_reference(name, tail, monkeypatch):
    """Loss, ∂hidden, ∂weight and ∂bias within 1e-5 of the fp64 dense reference, and the stats."""
    from pipeline.core import triton_loss

    calls = []
    real = triton_loss.q_loss_and_grads
    monkeypatch.setattr(triton_loss, "q_loss_and_grads", lambda *a: calls.append(1) or real(*a))
    out, grads = _run("triton", torch.float32, name, tail)
    assert calls == [1]  # the kernels ran, not the torch path
    ref, want = _reference(name, tail)
    assert abs(float(out.loss) - float(ref.loss)) <= 1e-5 * max(1.0, abs(float(ref.loss)))
    for got, expected, what in zip(grads, want, ("hidden", "weight", "bias"), strict=True):
        assert got.dtype == torch.float32 and _rel(got, expected) <= 1e-5, (what, _rel(got, expected))
    assert torch.allclose(out.stats.sums, ref.stats.sums, rtol=1e-5, atol=1e-5)


def test_triton_without_a_bias_and_in_fp16():
    """No bias (the kernels' other branch); fp16 leaves against the torch path in fp16."""
    out, grads = _run("triton", torch.float32, "target_sft", "student_tail", with_bias=False)
    ref, want = _reference("target_sft", "student_tail", with_bias=False)
    assert abs(float(out.loss) - float(ref.loss)) <= 1e-5 and grads[2] is None
    assert _rel(grads[0], want[0]) <= 1e-5 and _rel(grads[1], want[1]) <= 1e-5
    tri, tri_grads = _run("triton", torch.float16, "target_sft", "student_tail")
    eager, eager_grads = _run("torch", torch.float16, "target_sft", "student_tail")
    assert abs(float(tri.loss) - float(eager.loss)) <= 2e-3
    for got, expected in zip(tri_grads, eager_grads, strict=True):
        assert got.dtype == torch.float16 and _rel(got, expected.double()) <= 1e-2


def test_the_backend_routing(monkeypatch):
    hidden = torch.zeros(2, 4)
    assert resolve_backend("triton", preset("target_sft", eta=0.5), hidden) == "triton"
    assert resolve_backend("triton", preset("eaft"), hidden) == "torch"  # not in the kernels: torch path
    assert resolve_backend("triton", preset("sft"), hidden.double()) == "torch"  # fp64: the reference path
    assert resolve_backend("torch", preset("sft"), hidden) == "torch"
    calls = []
    monkeypatch.setattr(loss_module, "_triton_forward", lambda *a: calls.append(a) or (_ for _ in ()).throw(
        RuntimeError("routed to triton")))  # fmt: skip
    out, _ = _run("triton", torch.float32, "eaft", "student_tail")  # eaft runs, on the torch path
    assert not calls and torch.isfinite(out.loss)
    assert resolve_backend("auto", preset("sft"), hidden) == "torch"  # a CPU: auto is the torch path
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="loss backend 'triton' needs a CUDA device"):
        resolve_backend("triton", preset("sft"), hidden)
    with pytest.raises(ValueError, match="choose one of"):
        resolve_backend("cuda", preset("sft"), hidden)


def test_training_with_the_triton_backend_matches_the_torch_path(tiny_build, tmp_path, monkeypatch):
    """`train.loss_backend=triton` through a real run (Target-SFT with priors, 2 steps, interpreted
    kernels at their real tile sizes): the same losses as the torch path; on a CPU without the
    interpreter it is one line before anything runs."""
    import json

    from pipeline.common.config import load_config
    from pipeline.common.errors import TrainError
    from pipeline.core import triton_loss
    from pipeline.entry.config import RunConfig
    from tests.conftest import tiny_args

    monkeypatch.undo()  # the real tile sizes
    calls = []
    real = triton_loss.q_loss_and_grads
    monkeypatch.setattr(triton_loss, "q_loss_and_grads", lambda *a: calls.append(1) or real(*a))

    def cfg(backend, name):
        sets = tiny_args(tiny_build, tmp_path, f"train.name={name}", "train.max_steps=2", "train.batch_size=2",
                         "train.micro_batch_size=2", "train.eval_every=0", "train.threads=2", "data.limit=8",
                         "train.target=target_sft", f"train.loss_backend={backend}")  # fmt: skip
        return load_config(RunConfig, None, sets)

    stages.capture_priors(cfg("torch", "t"), progress=False)
    losses = {}
    for backend in ("torch", "triton"):
        final = stages.train(cfg(backend, backend), progress=False)
        losses[backend] = [
            json.loads(line)["loss"] for line in (final.parent / "metrics.jsonl").read_text().splitlines()
        ]
    assert len(losses["triton"]) == 2
    assert max(abs(a - b) for a, b in zip(losses["torch"], losses["triton"], strict=True)) < 1e-5, losses
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(TrainError, match=r"train\.loss_backend=triton needs a CUDA device"):
        stages.train(cfg("triton", "cpu"), progress=False)


def test_support_gathers_in_row_slices_give_the_same_result(monkeypatch):
    """The torch-side gathers go SUPPORT_ROWS rows at a time (memory); slices of 5 rows change nothing."""
    from pipeline.core import triton_loss

    whole, whole_grads = _run("triton", torch.float32, "target_sft", "renormalize")
    monkeypatch.setattr(triton_loss, "SUPPORT_ROWS", 5)
    sliced, sliced_grads = _run("triton", torch.float32, "target_sft", "renormalize")
    assert abs(float(whole.loss) - float(sliced.loss)) <= 1e-6
    for a, b in zip(whole_grads, sliced_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
