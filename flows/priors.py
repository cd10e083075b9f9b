"""Stage 1 as a Prefect flow: fan shard groups out over a task runner, then finalise.

    python -m flows.priors configs/demo.yaml --workers 2          # local Dask cluster, 2 workers

Each task is one capture worker (`priors.worker_index` of `priors.num_workers`) and returns the
manifest path it writes to; the last task writes the manifest once every shard exists. On one
node, `target-sft priors` and the other flows already run one worker process per GPU
(`priors.workers`, pipeline.entry.launch); this flow is for several nodes: pass the address of an
existing Dask cluster (`--address tcp://scheduler:8786`) whose workers each see one GPU. vLLM's own tensor
parallelism (`priors.tensor_parallel_size`) covers a model that needs several GPUs.
"""

from __future__ import annotations

import argparse

from prefect import flow, task
from prefect.futures import wait
from prefect_dask import DaskTaskRunner

from flows import retry_unexpected
from pipeline.common.config import load_config
from pipeline.entry import stages
from pipeline.entry.config import RunConfig


@task(
    retries=2, retry_delay_seconds=5, retry_condition_fn=retry_unexpected, task_run_name="capture-worker-{worker_index}"
)
def capture_worker(config: str | None, overrides: list[str], worker_index: int, num_workers: int) -> dict:
    """One worker's share of the shards; returns the manifest path and its forward passes."""
    cfg = load_config(
        RunConfig, config, [*overrides, f"priors.worker_index={worker_index}", f"priors.num_workers={num_workers}"]
    )
    result = stages.capture_priors(cfg, progress=False)
    return {"key": result.key, "manifest": result.manifest_path, "forward_passes": result.forward_passes}


@task
def finalize(config: str | None, overrides: list[str]) -> dict:
    """Write manifest.json and _SUCCESS (every shard exists now; no forward pass runs)."""
    result = stages.capture_priors(load_config(RunConfig, config, overrides), progress=False)
    if not result.complete:
        raise RuntimeError(f"prior set {result.key} still misses shards after all workers finished")
    return {"key": result.key, "manifest": result.manifest_path, "forward_passes": result.forward_passes}


@flow(name="target-sft-priors", log_prints=True)
def priors_flow(config: str | None = None, overrides: list[str] | None = None, workers: int = 1) -> dict:
    """Capture (or reuse) the priors of a run config; returns key, manifest path, forward passes."""
    overrides = list(overrides or [])
    futures = [capture_worker.submit(config, overrides, i, workers) for i in range(workers)]
    wait(futures)
    parts = [f.result() for f in futures]
    final = finalize(config, overrides)
    return {**final, "forward_passes": sum(p["forward_passes"] for p in parts) + final["forward_passes"]}


def dask_runner(workers: int, address: str | None = None) -> DaskTaskRunner:
    """A local cluster of `workers` single-threaded processes, or an existing cluster."""
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--address", default=None, help="existing Dask scheduler address")
    args = parser.parse_args()
    runner = dask_runner(args.workers, args.address)
    print(priors_flow.with_options(task_runner=runner)(args.config, args.overrides, args.workers))


if __name__ == "__main__":
    main()
