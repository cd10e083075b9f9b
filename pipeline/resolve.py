"""Turn a run config's defaults into concrete paths (the embedded model and data when unset)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline import base_model
from pipeline.config import RunConfig


@dataclass
class ResolvedInputs:
    """Concrete model and dataset paths for a run."""

    model_path: Path
    data_path: Path
    heldout_path: Path | None
    """Held-out problems (embedded default only)."""


def resolve_inputs(cfg: RunConfig, progress: bool = True) -> ResolvedInputs:
    """Use the configured paths, building the embedded base model for whatever is unset."""
    embedded = None
    if cfg.model.path is None or cfg.data.path is None:
        embedded = base_model.build(cfg.base_model, cfg.storage_root, progress=progress)
    model_path = Path(cfg.model.path) if cfg.model.path else embedded.model  # type: ignore[union-attr]
    data_path = Path(cfg.data.path) if cfg.data.path else embedded.sft_train  # type: ignore[union-attr]
    heldout = embedded.sft_heldout if embedded is not None else None
    return ResolvedInputs(model_path, data_path, heldout)
