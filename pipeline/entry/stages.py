"""The stages called from the whole run config: the entry layer resolves the config into paths and
the world, and hands each stage its own section (docs/design.md §5). Only the entry layer and
`flows/` see the whole config."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.common.config import to_dict
from pipeline.common.errors import EvalError
from pipeline.core.targets import from_config
from pipeline.entry.config import RunConfig
from pipeline.entry.resolve import ResolvedInputs, eval_dir, resolve_inputs, run_dir, tokens_dir
from pipeline.evaluation import evaluate
from pipeline.evaluation.config import EvalSetConfig
from pipeline.experiments.experiment import slug, target_label
from pipeline.priors import capture
from pipeline.training import train as training
from pipeline.training.config import TrainJob, target_config
from pipeline.training.tracking import Trackers
from pipeline.world.builder import embedded_sets

if TYPE_CHECKING:  # TRL is an extra
    from pipeline.training.trl_integration import CachedPriors


# --- stage 1: priors ------------------------------------------------------------------------------


def prior_role(cfg: RunConfig) -> str:
    """`teacher` when the priors come from another model than the one trained, else `model`."""
    other = cfg.priors.model_path is not None and cfg.priors.model_path != cfg.model.path
    return "teacher" if cfg.priors.embedded_teacher or other else "model"


def capture_job(cfg: RunConfig, progress: bool = True, inputs: ResolvedInputs | None = None) -> capture.CaptureJob:
    """Stage 1's sections and concrete paths (the embedded world built here when both paths are unset)."""
    inputs = inputs or resolve_inputs(cfg, progress=progress)
    return capture.CaptureJob(
        cfg.priors, cfg.data, cfg.model, cfg.storage_root, inputs.model_path, inputs.data_path,
        inputs.prior_model_path, tokens_dir(cfg),
    )  # fmt: skip


def plan_priors(cfg: RunConfig, progress: bool = False) -> capture.CapturePlan:
    """Stage 1's plan for `cfg` (the data tokenised, the cache key): no engine, no vLLM."""
    return capture.plan(capture_job(cfg, progress))


def capture_priors(
    cfg: RunConfig, progress: bool = True, planned: capture.CapturePlan | None = None
) -> capture.CaptureResult:
    """Stage 1 in this process (`pipeline.entry.launch.capture_priors` fans it out over GPUs)."""
    return capture.capture(capture_job(cfg, progress), progress, planned)


def cached_priors(cfg: RunConfig, key: str | None = None) -> CachedPriors:
    """For TRL (`pipeline.training.trl_integration`): the set `cfg` captures, or `key` /
    `train.prior_key` (an import), with this pipeline's tokenisation of its rows."""
    from pipeline.training.trl_integration import CachedPriors

    return CachedPriors.open(capture_job(cfg, progress=False), key or cfg.train.prior_key)


# --- stage 2: training ------------------------------------------------------------------------------


def train_job(cfg: RunConfig, progress: bool = True) -> TrainJob:
    """Stage 2's sections, concrete paths and prior key. With `train.prior_key` unset, a target that
    needs a prior reads the set stage 1 makes for this config: its key is computed here (tokenising,
    hashing the prior model: no engine, no vLLM)."""
    inputs = resolve_inputs(cfg, progress=progress and os.environ.get("RANK", "0") == "0")
    key = cfg.train.prior_key
    if key is None and from_config(cfg.train.target).needs_prior:
        key = capture.plan(capture_job(cfg, inputs=inputs)).key
    return TrainJob(
        cfg.train, cfg.model, cfg.data, cfg.storage_root, run_dir(cfg), inputs.model_path, inputs.data_path,
        tokens_dir(cfg), inputs.heldout_path, key, cfg.priors.k, to_dict(cfg), to_dict(RunConfig()),
    )  # fmt: skip


def train(cfg: RunConfig, resume: bool = False, progress: bool = True) -> Path:
    """Stage 2 in this process (`pipeline.entry.launch.train_or_launch` starts several under torchrun);
    the final model's folder."""
    return training.train(train_job(cfg, progress), resume, progress)


# --- experiments -----------------------------------------------------------------------------------


def selection_overrides(cfg: RunConfig, validation: EvalSetConfig) -> list[str]:
    """Overrides that turn the experiment into `target-sft select`'s grid: `select.target` (plain SFT
    by default) at every (lr, max_steps) of `cfg.select`, evaluated on `validation` alone, with the
    training-time eval loss on it too, so nothing reads the held-out problems."""
    sel = cfg.select
    target = target_config(sel.target, "select.target").compact()
    entry = {"preset": target} if isinstance(target, str) else dict(target)
    targets = [{**entry, "train": {"lr": lr, "max_steps": steps}} for lr in sel.lrs for steps in sel.max_steps]
    label = target_label(target)
    suffix = "select" if label == "sft" else f"select-{slug(label)}"  # each objective's selection apart
    return [
        f"experiment.name={cfg.experiment.name}-{suffix}",
        f"experiment.targets={json.dumps(targets)}",
        f"experiment.seeds={json.dumps(sel.seeds)}",
        "experiment.evaluate_base=false",
        "experiment.compare_to=null",
        f"eval.sets={json.dumps([to_dict(validation)])}",
        f"data.eval_path={json.dumps(validation.path)}",
    ]


# --- stage 3: evaluation ----------------------------------------------------------------------------


def eval_target(cfg: RunConfig, base: bool = False, prior: bool = False) -> tuple[Path, Path, list[EvalSetConfig]]:
    """Which model `target-sft eval` evaluates, where its report goes, and the default sets.

    Default: the trained run `<storage>/runs/<train.name>/final`, reported into that run's `eval/`.
    `base=True`: the untrained base model, reported into `<storage>/evals/base-<model folder>/`.
    `prior=True`: the model the priors come from (a teacher), into `<storage>/evals/prior-<folder>/`.
    """
    run = run_dir(cfg)
    if prior:
        resolved = resolve_inputs(cfg, progress=True)
        sets = embedded_sets(resolved.embedded, cfg.eval.forgetting) if resolved.embedded else []
        return resolved.prior_model_path, eval_dir(cfg, f"prior-{resolved.prior_model_path.name}"), sets
    if not base and not cfg.eval.model_path and not (run / "final" / "config.json").exists():
        raise EvalError(
            f"run {cfg.train.name!r} has no final model at {run / 'final'}; train it first "
            "(`target-sft train`), or set eval.model_path, or pass --base"
        )
    inputs = resolve_inputs(cfg, progress=False) if (base or not cfg.eval.sets) else None
    default = embedded_sets(inputs.embedded, cfg.eval.forgetting) if inputs and inputs.embedded else []
    if base:
        assert inputs is not None
        return inputs.model_path, eval_dir(cfg, f"base-{inputs.model_path.name}"), default
    model, out = run / "final", run / "eval"
    if cfg.eval.model_path:
        model = Path(cfg.eval.model_path)
        out = eval_dir(cfg, model.name)
    return model, out, default


def evaluate_run(
    cfg: RunConfig, base: bool = False, out_dir: Path | None = None, progress: bool = True, prior: bool = False
) -> Path:
    """`target-sft eval` and the flows: evaluate the run (or the base model, or the prior model),
    report it to the run's trackers, and return the report.json path. An unchanged model and settings
    reuse the report."""
    model, default_out, default_sets = eval_target(cfg, base=base, prior=prior)
    base = base or prior
    out = out_dir or default_out
    report = evaluate.evaluate(cfg.eval, model, out, default_sets, progress, cfg.model.trust_remote_code, cfg.data)
    run = run_dir(cfg)
    if not base and not cfg.eval.model_path and cfg.train.report_to and not report.get("reused"):
        metrics = run / "metrics.jsonl"
        steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()] if metrics.exists() else []
        trackers = Trackers(cfg.train.report_to, run, cfg.train.name, to_dict(cfg))
        trackers.log_report(report, steps[-1] if steps else 0)
        trackers.close()
    return out / "report.json"
