"""The stages called from the whole run config: the entry layer resolves the config into paths and
the world, and hands each stage its own section (docs/design.md §5). Only the entry layer and
`flows/` see the whole config."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.common.config import to_dict
from pipeline.common.errors import EvalError
from pipeline.entry.config import RunConfig
from pipeline.entry.resolve import eval_dir, resolve_inputs, run_dir
from pipeline.evaluation import evaluate
from pipeline.evaluation.config import EvalSetConfig
from pipeline.training.tracking import Trackers
from pipeline.world.base_model import embedded_sets


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
