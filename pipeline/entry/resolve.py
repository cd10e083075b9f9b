"""Turn a run config into concrete things: input paths (the embedded model and data when unset),
the run, experiment and eval folders under the storage root, and the engine, device and dtype.

Every stage imports these from here, so each path is built in one place and checked to stay
inside the storage root.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.common.errors import ConfigError
from pipeline.common.storage import inside
from pipeline.entry.config import RunConfig
from pipeline.world import builder


@dataclass
class ResolvedInputs:
    """Concrete model and dataset paths for a run."""

    model_path: Path
    data_path: Path
    prior_model_path: Path
    """The model the priors come from: `priors.model_path`, the embedded teacher, or the model itself."""
    embedded: builder.WorldPaths | None
    """The embedded build (its held-out, forgetting and validation splits), when one is used."""

    @property
    def heldout_path(self) -> Path | None:
        """The embedded held-out problems of the SFT skill, or None."""
        return self.embedded.sft_heldout if self.embedded is not None else None


def half_set_paths(cfg: RunConfig) -> str | None:
    """Both model and data paths unset means the embedded world; one of them unset is a mistake (a
    user's model would train on the embedded arithmetic set): the line that says so, or None."""
    if (cfg.model.path is None) == (cfg.data.path is None):
        return None
    given, missing = ("model.path", "data.path") if cfg.data.path is None else ("data.path", "model.path")
    return (
        f"{given} is set but {missing} is not; set {missing} too (or unset both to use the embedded tiny world, "
        "whose model and data belong together)"
    )


def resolve_inputs(cfg: RunConfig, progress: bool = True) -> ResolvedInputs:
    """Use the configured paths, or build the embedded base model and data when both are unset (and
    the embedded teacher where asked).

    Raises:
        ConfigError: one of model.path and data.path set without the other.
    """
    if (problem := half_set_paths(cfg)) is not None:
        raise ConfigError(problem)
    embedded = None
    if cfg.model.path is None and cfg.data.path is None:
        embedded = builder.build(cfg.world, cfg.storage_root, progress=progress)
    model_path = Path(cfg.model.path) if cfg.model.path else embedded.model  # type: ignore[union-attr]
    data_path = Path(cfg.data.path) if cfg.data.path else embedded.sft_train  # type: ignore[union-attr]
    prior_model = Path(cfg.priors.model_path) if cfg.priors.model_path else model_path
    if cfg.priors.embedded_teacher:
        prior_model = builder.build_teacher(cfg.world, cfg.storage_root, progress=progress)
    return ResolvedInputs(model_path, data_path, prior_model, embedded)


def run_dir(cfg: RunConfig, name: str | None = None) -> Path:
    """`<storage>/runs/<train.name>/` (or another run's `name`)."""
    return inside(cfg.storage_root, "runs", name or cfg.train.name)


def experiment_dir(cfg: RunConfig) -> Path:
    """`<storage>/experiments/<experiment.name>/`."""
    return inside(cfg.storage_root, "experiments", cfg.experiment.name)


def eval_dir(cfg: RunConfig, name: str) -> Path:
    """`<storage>/evals/<name>/`: evaluations of models that are not a run's final model."""
    return inside(cfg.storage_root, "evals", name)


def tokens_dir(cfg: RunConfig) -> Path:
    """`<storage>/tokens/`, the tokenisation cache (memory-mapped, so always on a local filesystem:
    with an fsspec storage root such as s3://, it lives in the `datasets` cache folder instead)."""
    if "://" in cfg.storage_root:
        import datasets

        return Path(datasets.config.HF_DATASETS_CACHE) / "target-sft-tokens"
    return inside(cfg.storage_root, "tokens")
