"""Prefect flows against a real temporary Prefect server, on a real local Dask cluster."""

from __future__ import annotations

from pipeline.prior_cache import PriorStore
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
