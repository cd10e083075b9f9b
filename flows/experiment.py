"""The experiment as one Prefect flow: base model, priors once, a grid of runs, evaluation, comparison.

    target-sft run configs/demo.yaml                        # once, on a temporary local server
    target-sft serve configs/demo.yaml --cron "0 3 * * *"   # a scheduled deployment (README)

Tasks pass config paths, overrides and file paths; every artifact lives on storage. A run that
fails (a diverging target, say) is reported in the table and the others carry on. Tasks that use
the accelerator retry on unexpected errors (a lost GPU, a full node), never on a configuration error
or a divergence, which would only fail again; a retried training resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from flows import retry_unexpected
from flows.train import capture_priors
from pipeline.common.config import load_config
from pipeline.core.targets import from_config
from pipeline.entry import launch, stages
from pipeline.entry.config import RunConfig
from pipeline.entry.resolve import experiment_dir, resolve_inputs, run_dir
from pipeline.experiments import experiment


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=retry_unexpected)
def prepare_base(config: str | None, overrides: list[str], progress: bool = False) -> str:
    """Build (or reuse) the embedded base model and teacher, or check the configured one; returns its path."""
    return str(resolve_inputs(load_config(RunConfig, config, overrides), progress=progress).model_path)


@task(retries=1, retry_delay_seconds=10, retry_condition_fn=retry_unexpected)
def train_run(config: str | None, overrides: list[str], progress: bool = False) -> str:
    """Train one run of the grid (a retry or a re-run resumes it); returns the final model folder."""
    cfg = load_config(RunConfig, config, overrides)
    resume = run_dir(cfg).joinpath("run.json").exists()
    return str(launch.train_or_launch(cfg, config, overrides, resume, progress))


@task(retries=1, retry_delay_seconds=10, retry_condition_fn=retry_unexpected)
def evaluate_model(config: str | None, overrides: list[str], base: bool, out_dir: str | None = None) -> str:
    """Evaluate the run's final model (or the base model); returns the report.json path."""
    cfg = load_config(RunConfig, config, overrides)
    return str(stages.evaluate_run(cfg, base, Path(out_dir) if out_dir else None, progress=False))


@task
def publish(
    config: str | None, overrides: list[str], runs: list[dict], base_report: str | None, prior: dict | None
) -> dict:
    """Table, plot and summary into `<storage>/experiments/<name>/`, and a Prefect markdown artifact."""
    cfg = load_config(RunConfig, config, overrides)
    out = experiment_dir(cfg)
    base = json.loads(Path(base_report).read_text())["sets"] if base_report else None
    comparison = experiment.Comparison(cfg.experiment.name, cfg.eval.n, base, runs, prior, cfg.experiment.compare_to)
    markdown = experiment.write_comparison(out, comparison)
    key = "experiment-" + experiment.slug(cfg.experiment.name).lower().replace("_", "-").replace(".", "-")
    create_markdown_artifact(key=key, markdown=markdown, description=f"Target-SFT experiment {cfg.experiment.name}")
    print(markdown)
    plots = {"plot": str(out / "comparison.png"), "figure": str(out / "figure.png")}
    return {"dir": str(out), "table": str(out / "comparison.md"), **plots, "artifact": key}


@flow(name="target-sft-experiment", log_prints=True)
def experiment_flow(config: str | None = None, overrides: list[str] | None = None, progress: bool = False) -> dict:
    """Capture priors once, train every target × seed, evaluate them and the base, compare."""
    overrides = list(overrides or [])
    cfg = load_config(RunConfig, config, overrides)
    runs = experiment.expand_grid(cfg.experiment)  # a bad grid fails here, before any work
    seconds = {"base model": 0.0, "priors": 0.0, "training": 0.0, "evaluation": 0.0}  # wall time per stage
    started = time.time()
    prepare_base(config, overrides, progress)  # the teacher's first build takes minutes: show its bar
    seconds["base model"] += time.time() - started
    prior = None
    if any(from_config(spec.target).needs_prior for spec in runs):
        started = time.time()
        prior = capture_priors(config, overrides)
        seconds["priors"] += time.time() - started
        print(f"priors: set {prior['key']}, {prior['forward_passes']} prior forward passes in this experiment")
        if cfg.experiment.student_profile and prior["prior_role"] == "teacher":
            own = ["priors.embedded_teacher=false", "priors.model_path=null"]
            prior["student"] = capture_priors.with_options(task_run_name="capture_student_priors")(
                config, [*overrides, *own]
            )
            seconds["priors"] = time.time() - started
        overrides = [*overrides, f"train.prior_key={prior['key']}"]
    base_report = None
    if cfg.experiment.evaluate_base:
        started = time.time()
        base_out = str(experiment_dir(cfg) / "base")
        base_report = evaluate_model.with_options(task_run_name="eval-base")(config, overrides, True, base_out)
        seconds["evaluation"] += time.time() - started

    results = []
    for spec in runs:
        run_overrides = [*overrides, *spec.overrides()]
        started = time.time()
        trained = train_run.with_options(task_run_name=f"train-{spec.run_name}")(
            config, run_overrides, progress, return_state=True
        )
        seconds["training"] += time.time() - started
        report, error = None, None
        if trained.is_failed():
            error = _message(trained)
        else:
            started = time.time()
            evaluated = evaluate_model.with_options(task_run_name=f"eval-{spec.run_name}")(
                config, run_overrides, False, return_state=True
            )
            seconds["evaluation"] += time.time() - started
            if evaluated.is_failed():
                error = "evaluation failed: " + _message(evaluated)
            else:
                report = evaluated.result()
        results.append(experiment.run_summary(spec, run_dir(cfg, spec.run_name), report, error))
        print(f"{spec.run_name}: {'failed: ' + error if error else 'done'}")
    published = publish(config, overrides, results, base_report, prior)
    failed = [r["run"] for r in results if r["status"] == "failed"]
    seconds = {stage: round(value, 1) for stage, value in seconds.items()}
    return {**published, "prior": prior, "failed_runs": failed, "runs": [r["run"] for r in results], "seconds": seconds}


def _message(state: Any) -> str:
    """The exception text of a failed task state."""
    error = state.result(raise_on_failure=False)
    return f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(state.message)
