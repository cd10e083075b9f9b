"""The whole run config: the storage root plus one section per stage, and the checks between
sections. Only the entry layer and `flows/` see it; each stage takes its own section.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from pipeline.common.config import ModelConfig
from pipeline.common.errors import ConfigError, TargetError
from pipeline.common.storage import resolve_root
from pipeline.data.config import DataConfig, template_kwargs_problems
from pipeline.evaluation.config import EvalConfig
from pipeline.experiments.config import ExperimentConfig, SelectConfig
from pipeline.priors.config import PriorsConfig
from pipeline.training.config import TrainConfig, target_config
from pipeline.world.config import WorldConfig

DEFAULT_STORAGE = os.environ.get("TARGET_SFT_STORAGE", "storage")


@dataclass
class RunConfig:
    """A run file: storage root plus one section per stage."""

    storage_root: str = DEFAULT_STORAGE
    """Root folder (local or shared filesystem) for models, datasets, priors and runs; relative
    paths are relative to the working directory. Default: $TARGET_SFT_STORAGE or `storage`."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model (and its tokenizer) every stage uses."""
    data: DataConfig = field(default_factory=DataConfig)
    """The SFT dataset."""
    world: WorldConfig = field(default_factory=WorldConfig)
    """The embedded world (its problems, base model and teacher), built when `model.path` and `data.path`
    are both unset. Its former name, `base_model`, is still read, with a note."""
    priors: PriorsConfig = field(default_factory=PriorsConfig)
    """Stage 1: prior capture."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Stage 2: training."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation on held-out problems."""
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    """The grid `target-sft run` trains and compares."""
    select: SelectConfig = field(default_factory=SelectConfig)
    """`target-sft select`: where train.lr and train.max_steps come from."""

    def problems(self) -> list[str]:
        """Called by `load_config` once every field is well-formed: resolves `storage_root` (the one
        reading every stage uses) and returns what `cross_field_problems` finds."""
        try:
            self.storage_root = resolve_root(self.storage_root)
        except ConfigError as e:
            return [str(e)]
        return cross_field_problems(self)


def cross_field_problems(cfg: RunConfig) -> list[str]:
    """Constraints between fields that no single field's type can express."""
    from pipeline.core.targets import from_config

    problems = []
    try:
        from_config(cfg.train.target)
    except TargetError as e:
        problems.append(f"train.target: {e}")
    bm = cfg.world
    if bm.hidden_size % bm.num_heads:
        problems.append(f"world.num_heads={bm.num_heads} must divide world.hidden_size={bm.hidden_size}")
    if cfg.priors.embedded_teacher and (cfg.model.path is not None or cfg.priors.model_path is not None):
        problems.append(
            "priors.embedded_teacher shares the embedded model's tokenizer: it needs model.path and "
            "priors.model_path unset; for your own model, set priors.model_path to its teacher instead"
        )
    try:
        from_config(target_config(cfg.select.target, "select.target"))
    except (ConfigError, TargetError) as e:
        problems.append(f"select.target: {e}")
    if not cfg.select.lrs or not cfg.select.max_steps or not cfg.select.seeds:
        problems.append("select.lrs, select.max_steps and select.seeds each need at least one value")
    for key in ("lrs", "max_steps", "seeds"):
        values = getattr(cfg.select, key)
        for value in sorted({v for v in values if values.count(v) > 1}):
            problems.append(f"select.{key} lists {value:g} twice; each candidate is trained once: drop one")
    if cfg.priors.engine == "vllm_server" and not cfg.priors.server_url:
        problems.append("priors.engine=vllm_server needs priors.server_url (e.g. http://localhost:8000)")
    if cfg.priors.server_url and not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", cfg.priors.server_url):
        shown = re.sub(r"//[^/@\s]*@", "//***@", cfg.priors.server_url)  # never echo a password
        problems.append(f"priors.server_url={shown!r} must be an http:// or https:// URL")
    if cfg.priors.worker_index >= cfg.priors.num_workers:
        problems.append(
            f"priors.worker_index={cfg.priors.worker_index} must be below priors.num_workers={cfg.priors.num_workers}"
        )
    if "::" in cfg.storage_root:
        problems.append(f"storage_root={cfg.storage_root!r}: '::' would chain two filesystems; rename the folder")
    problems += template_kwargs_problems(cfg.data.chat_template_kwargs)
    names = [s.name for s in cfg.eval.sets]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"eval.sets names {name!r} twice; one report would replace the other: rename one")
    for i, s in enumerate(cfg.eval.sets):
        if not re.search(r"\{[A-Za-z_][A-Za-z0-9_]*\}", s.prompt_template):
            problems.append(
                f"eval.sets[{i}].prompt_template names no column (e.g. {{question}}); every problem would get "
                "the same prompt"
            )
    return problems
