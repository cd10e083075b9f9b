"""Recorded arithmetic on this CPU (docs/design.md §7; the values and which CPU made them:
tests/recorded.py): the model-weak world's shipped base, a short Target-SFT run on its settings (priors,
fused loss, optimizer) and a few evaluation samples at temperature 0.7.

Every machine checks the portable values (one fresh process in the portable mode), and a CPU kind
whose pinned values were measured checks those too, in the suite's own pinned process; a kind with
none has its pinned check made against the portable values instead. So a change of arithmetic fails
here on any x86 CPU, Intel or AMD, instead of silently changing a world's table.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from pipeline.common import cpu_kernels
from pipeline.world import builder

from . import recorded
from .conftest import REPO

DEMO_BASE_WEIGHTS = "ae406570114d456fb43c284124654b06ad529484219774467e6c11145efff74b"


@pytest.fixture(autouse=True)
def pinned():
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the recorded values are x86 ones (the kernels are pinned to AVX2)")
    wrong = {k: os.environ.get(k) for k, v in cpu_kernels.PINNED.items() if os.environ.get(k) != v}
    assert not wrong, f"run the suite through `make test`, which pins the CPU kernels; here {wrong}"


def test_the_model_weak_base_has_the_recorded_weights(default_build):
    info = json.loads((default_build.model / builder.SUCCESS).read_text())
    assert info["weights_sha256"] == DEMO_BASE_WEIGHTS


@pytest.fixture(scope="module")
def portable(default_build) -> dict:
    """The pieces computed by a fresh process in the portable mode."""
    command = [sys.executable, "-m", "tests.recorded", str(REPO / "storage")]
    env = {**os.environ, **recorded.mode_env("portable")}
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("piece", ["short_run", "samples"])
def test_the_portable_mode_gives_the_values_recorded_for_every_cpu(portable, piece):
    assert portable["arithmetic"]["kernels"] == "portable"
    assert portable[piece] == recorded.PORTABLE[piece]


def test_a_short_target_sft_run_gives_this_cpu_kinds_recorded_weights(default_build, tmp_path, portable):
    mode, checksum = recorded.expected("short_run")
    found = recorded.short_run(default_build, tmp_path) if mode == "pinned" else portable["short_run"]
    assert found == checksum, f"{cpu_kernels.cpu_kind()}, {mode} mode"


def test_the_evaluation_draws_this_cpu_kinds_recorded_samples(default_build, tmp_path, portable):
    mode, checksum = recorded.expected("samples")
    found = recorded.samples(default_build, tmp_path) if mode == "pinned" else portable["samples"]
    assert found == checksum, f"{cpu_kernels.cpu_kind()}, {mode} mode"
