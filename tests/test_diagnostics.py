"""Per-run diagnostics (pipeline/training/diagnostics.py): sharpening, KL from the prior, collapse."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.common.prior_schema import PriorRecord
from pipeline.entry import cli
from pipeline.training import diagnostics
from tests.conftest import REPO, tiny_args


def _record(prior_logp: torch.Tensor, k: int) -> PriorRecord:
    top = prior_logp.topk(k)
    n = prior_logp.shape[0]
    return PriorRecord(0, n + 1, np.arange(n, dtype=np.int32), top.indices.numpy().astype(np.int32),
                       top.values.float().numpy(), np.zeros(n, np.float32), np.ones(n, np.int32))  # fmt: skip


@pytest.mark.parametrize("k", [4, 16, 50])
def test_kl_from_the_top_k_is_a_lower_bound_and_exact_with_the_whole_vocabulary(k):
    torch.manual_seed(0)
    prior = torch.log_softmax(torch.randn(6, 50, dtype=torch.float64) * 2, -1)
    model = torch.log_softmax(torch.randn(6, 50, dtype=torch.float64) * 2, -1)
    exact = (prior.exp() * (prior - model)).sum(1).numpy()
    bound = diagnostics._kl_lower_bound(_record(prior, k), np.arange(6), model)
    assert (bound <= exact + 1e-4).all() and (bound >= 0).all()  # 1e-4: the record's float32 log-probs
    if k == 50:
        np.testing.assert_allclose(bound, exact, atol=1e-4)
    else:
        assert (bound < exact - 1e-3).any()  # the bucket loses what the tail's shape held


def test_loops_flags_repetition_not_ordinary_solutions():
    assert diagnostics.loops([5, 6, 7] * 10)
    assert not diagnostics.loops(list(range(40)))
    assert not diagnostics.loops([5, 6] * 4)  # too short to call


def test_a_finished_run_records_its_diagnostics(tiny_build, tmp_path, capsys):
    small = ("train.max_steps=2", "train.batch_size=4", "train.micro_batch_size=2", "data.limit=16")
    args = [f"--set={a}" for a in tiny_args(tiny_build, tmp_path, *small, "train.target=target_sft")]
    config = str(REPO / "configs" / "worlds" / "model-strong.yaml")
    assert cli.main(["priors", config, *args]) == 0
    capsys.readouterr()
    assert cli.main(["train", config, *args]) == 0
    (run,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    found = json.loads((run / "run.json").read_text())["diagnostics"]
    assert found["slice_examples"] == 16 and found["slice_tokens"] > 0
    assert 0 < found["mean_p_observed"] < 1 and 0 <= found["share_p_above_0_9"] <= 1
    assert found["observed_nll"] > 0
    assert found["kl_from_prior"] is not None and found["kl_from_prior"] >= 0
