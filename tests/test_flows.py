"""Prefect flows against a real temporary Prefect server, on a real local Dask cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.priors.cache import PriorStore
from tests.conftest import tiny_args


def test_priors_flow_on_two_dask_workers_then_reuse(prefect_server, tiny_build, tmp_path):
    from flows.priors import dask_runner, priors_flow

    overrides = tiny_args(tiny_build, tmp_path, "priors.shard_size=8")
    first = priors_flow.with_options(task_runner=dask_runner(2))(None, overrides, 2)
    assert first["forward_passes"] > 0
    store = PriorStore(str(tmp_path))
    assert store.complete(first["key"]) and store.verify(first["key"]) == []
    assert first["manifest"].endswith(f"{first['key']}/manifest.json")
    again = priors_flow(None, overrides, 1)
    assert again["key"] == first["key"] and again["forward_passes"] == 0


def test_train_flow_captures_priors_once_then_trains(prefect_server, tiny_build, tmp_path):
    import json
    from pathlib import Path

    from flows.train import train_flow

    common = tiny_args(
        tiny_build,
        tmp_path,
        "train.target={preset: target_sft, eta: 0.5}",
        "train.batch_size=4",
        "train.micro_batch_size=2",
        "train.max_steps=2",
        "train.eval_every=0",
    )
    first = train_flow(None, [*common, "train.name=a"])
    assert first["priors"]["forward_passes"] > 0
    assert (Path(first["final_model"]) / "model.safetensors").exists()
    second = train_flow(None, [*common, "train.name=b"])
    assert second["priors"]["forward_passes"] == 0 and second["priors"]["key"] == first["priors"]["key"]
    run = json.loads((tmp_path / "runs" / "b" / "run.json").read_text())
    assert run["prior_key"] == first["priors"]["key"]


@pytest.mark.slow  # 47 s of process start-up; the in-process two-worker flow test stays in the default suite
def test_priors_flow_on_workers_attached_to_an_external_dask_scheduler(prefect_server, tiny_build, tmp_path):
    """Several nodes, as docs/bring-your-own.md "Several nodes" launches them: a `dask scheduler` process, and a
    `dask worker SCHEDULER` per node (two here, each its own process); `flows.priors --address`."""
    import os
    import signal
    import subprocess
    import sys

    from distributed import Client

    from flows.priors import dask_runner, priors_flow
    from tests.conftest import REPO, free_port

    address = f"tcp://127.0.0.1:{free_port()}"
    dask = [str(Path(sys.executable).parent / "dask")]
    logs = [tmp_path / f"{name}.log" for name in ("scheduler", "worker-a", "worker-b")]
    commands = [
        [*dask, "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1], "--no-dashboard"],
        *[[*dask, "worker", address, "--nthreads", "1", "--no-dashboard", "--name", n] for n in ("a", "b")],
    ]
    procs = []
    try:
        for command, log in zip(commands, logs, strict=True):
            with log.open("w") as out:
                procs.append(
                    subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
                )
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        overrides = tiny_args(tiny_build, tmp_path, "priors.shard_size=8")
        result = priors_flow.with_options(task_runner=dask_runner(2, address))(None, overrides, 2)
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            p.wait(timeout=30)
    store = PriorStore(str(tmp_path))
    assert result["forward_passes"] > 0 and store.complete(result["key"]) and store.verify(result["key"]) == []
    workers_log = logs[1].read_text() + logs[2].read_text()
    assert "capture-worker-0" in workers_log and "capture-worker-1" in workers_log  # ran there, not here
