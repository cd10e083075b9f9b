"""Shared fixtures: a tiny embedded build (seconds) and the real default build (minutes, cached).

Tests never download anything: every model and tokenizer here is built locally.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from pipeline import base_model
from pipeline.config import BaseModelConfig

REPO = Path(__file__).resolve().parent.parent

# Small enough to build in a few seconds; head_dim stays 32 as vLLM's CPU build needs.
TINY = BaseModelConfig(
    name="tiny-test",
    pretrain_problems=400,
    sft_train_problems=60,
    heldout_problems=20,
    hidden_size=64,
    num_heads=2,
    num_layers=2,
    intermediate_size=128,
    seq_len=64,
    batch_size=4,
    steps=4,
    warmup_steps=2,
)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for test servers and torchrun rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_args(build: base_model.BaseModelPaths, storage: Path | str, *extra: str) -> list[str]:
    """`--set`-style overrides for a run on a tiny build: its model and SFT set, short examples, the hf
    prior engine with k=8, storage under `storage`; `extra` comes last and wins."""
    return [
        f"storage_root={storage}",
        f"model.path={build.model}",
        f"data.path={build.sft_train}",
        "data.max_length=128",
        "priors.engine=hf",
        "priors.k=8",
        *extra,
    ]


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory) -> base_model.BaseModelPaths:
    return base_model.build(TINY, tmp_path_factory.mktemp("tiny-storage"), progress=False)


@pytest.fixture(scope="session")
def default_build() -> base_model.BaseModelPaths:
    """The real embedded base model, built once into the default storage root and reused."""
    return base_model.build(BaseModelConfig(), REPO / "storage", progress=False)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real temporary Prefect server (prefect_test_harness) for the flow tests."""
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
