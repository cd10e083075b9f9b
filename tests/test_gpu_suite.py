"""benchmarks/gpu_suite.sh --smoke: every step of the GPU suite, at toy sizes on CPU, so it cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow  # 104 s on 2 cores; the lent GPU runs the full suite
def test_gpu_suite_smoke_runs_every_step_and_writes_its_reports(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--smoke", str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
    assert [(name, status) for name, status, _ in steps] == [
        (name, "0") for name in ("loss", "train_loss", "train_packing", "priors", "pytest")
    ]
    for name in ("loss", "train_loss", "train_packing", "priors"):
        assert json.loads((out / f"{name}.json").read_text()), name
    packing = json.loads((out / "train_packing.json").read_text())["results"]
    assert [r["method"] for r in packing] == ["padded", "packed"]
    assert "tests/test_gpu.py::test_packed_equals_padded_on_cuda" in (out / "pytest.log").read_text()
    summary = (out / "summary.md").read_text()
    assert "Train step: padded vs packed" in summary and "FAILED" not in summary
