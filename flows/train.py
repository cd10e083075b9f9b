"""Stage 2 as a Prefect flow: priors (captured or reused) then training; passes keys and paths.

python -m flows.train configs/demo.yaml --set train.target=dft --set train.name=dft
"""

from __future__ import annotations

import argparse

from prefect import flow, task

from flows import retry_unexpected
from pipeline.common.config import load_config
from pipeline.core.targets import from_config
from pipeline.entry import launch, stages
from pipeline.entry.config import RunConfig
from pipeline.entry.resolve import run_dir
from pipeline.priors.cache import PriorStore


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=retry_unexpected)
def capture_priors(config: str | None, overrides: list[str]) -> dict:
    """Capture or reuse the prior set (one worker per GPU); returns its key, manifest path and forward passes."""
    cfg = load_config(RunConfig, config, overrides)
    result = launch.capture_priors(cfg, config, overrides, progress=False)
    profile = PriorStore(cfg.storage_root).gamma_profile(result.key) if result.complete else None
    return {
        "key": result.key,
        "manifest": result.manifest_path,
        "forward_passes": result.forward_passes,
        "gamma_profile": profile,
        "prior_role": stages.prior_role(cfg),
    }


@task(retries=1, retry_delay_seconds=5, retry_condition_fn=retry_unexpected)
def train_model(config: str | None, overrides: list[str], resume: bool) -> str:
    """Train (resuming from the last checkpoint on a retry); returns the final model folder."""
    cfg = load_config(RunConfig, config, overrides)
    resume = resume or run_dir(cfg).joinpath("run.json").exists()
    return str(launch.train_or_launch(cfg, config, overrides, resume, progress=False))


@flow(name="target-sft-train", log_prints=True)
def train_flow(config: str | None = None, overrides: list[str] | None = None, resume: bool = False) -> dict:
    """Priors when the target needs them, then training; returns paths, never tensors."""
    overrides = list(overrides or [])
    cfg = load_config(RunConfig, config, overrides)
    prior = None
    if from_config(cfg.train.target).needs_prior:
        prior = capture_priors(config, overrides)
        overrides = [*overrides, f"train.prior_key={prior['key']}"]
    final = train_model(config, overrides, resume)
    return {"final_model": final, "metrics": str(run_dir(cfg) / "metrics.jsonl"), "priors": prior}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    print(train_flow(args.config, args.overrides, args.resume))


if __name__ == "__main__":
    main()
