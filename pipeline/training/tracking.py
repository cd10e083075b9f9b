"""Experiment tracking for `train.report_to`, the way TRL's `report_to` works.

TensorBoard is built in (event files under `<run>/tensorboard/`); MLflow and Weights & Biases are
optional extras (`pip install target-sft[mlflow]` / `[wandb]`) configured by their own environment
variables (`MLFLOW_TRACKING_URI`, `WANDB_PROJECT`, `WANDB_MODE`, ...). Each tracker gets every
metric of `metrics.jsonl` per step, the resolved run config once, and later the final eval report.

The tracker's own run id is kept in `<run>/tracking.json`, so a resumed run and its evaluation log
into the same tracker run instead of starting a new one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.common.config import flatten
from pipeline.common.errors import TrackingError
from pipeline.common.storage import atomic_write_text

log = logging.getLogger(__name__)


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v) for k, v in flatten(record, "/").items() if isinstance(v, int | float) and not isinstance(v, bool)
    }


class Trackers:
    """The trackers named in `report_to` for one run folder; a no-op when the list is empty."""

    def __init__(self, report_to: Sequence[str], run_dir: Path, run_name: str, config: dict[str, Any]) -> None:
        self.run_dir, self.names = Path(run_dir), list(report_to)
        ids_path = self.run_dir / "tracking.json"
        ids = _read_ids(ids_path) if self.names and ids_path.exists() else {}  # only trackers read it
        self._tb = self._mlflow = self._wandb = None
        if "tensorboard" in self.names:
            from torch.utils.tensorboard import SummaryWriter

            if (self.run_dir / "tensorboard").exists() and not (self.run_dir / "tensorboard").is_dir():
                raise TrackingError(
                    f"{self.run_dir / 'tensorboard'} is a file, not TensorBoard's folder; move it away, or drop "
                    "tensorboard from train.report_to"
                )
            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), flush_secs=10)
            self._tb.add_text("config", "```json\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)
        if "mlflow" in self.names:
            mlflow = _import("mlflow", "mlflow")
            try:  # a store it refuses or cannot write: at the first call, whichever that is
                self._mlflow = mlflow.MlflowClient()
                if "mlflow" not in ids:
                    experiment = mlflow.set_experiment(config.get("experiment", {}).get("name", "target-sft"))
                    run = self._mlflow.create_run(experiment.experiment_id, run_name=run_name)
                    ids["mlflow"] = run.info.run_id
                    params = {k: str(v)[:500] for k, v in flatten(config, "/").items()}
                    params_list = [mlflow.entities.Param(k, v) for k, v in params.items()]
                    self._mlflow.log_batch(ids["mlflow"], params=params_list)
            except (mlflow.exceptions.MlflowException, OSError) as e:
                raise TrackingError(
                    f"MLflow could not start ({_first_line(e)}); check MLFLOW_TRACKING_URI, or drop mlflow "
                    "from train.report_to"
                ) from None
        if "wandb" in self.names:
            wandb = _import("wandb", "wandb")
            try:
                self._wandb = wandb.init(
                    id=ids.get("wandb"), resume="allow", name=run_name, config=config, dir=str(self.run_dir)
                )
            except (wandb.errors.Error, OSError) as e:  # e.g. no API key and no offline mode
                raise TrackingError(
                    f"W&B could not start ({_first_line(e)}); set WANDB_API_KEY, or WANDB_MODE=offline, or drop "
                    "wandb from train.report_to"
                ) from None
            ids["wandb"] = self._wandb.id
        self._ids = ids
        if ids:
            atomic_write_text(ids_path, json.dumps(ids, indent=2))
        log.info("tracking %s to %s", run_name, self.names or "metrics.jsonl only")

    def log(self, record: dict[str, Any], step: int) -> None:
        """One step's metrics (the same record that goes into metrics.jsonl)."""
        values = {k: v for k, v in _numbers(record).items() if k != "step"}
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(f"train/{key}", value, step)
        if self._mlflow is not None:
            for key, value in values.items():
                self._mlflow.log_metric(self._ids["mlflow"], key, value, step=step)
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in values.items()}, step=step)

    def log_report(self, report: dict[str, Any], step: int) -> None:
        """The final eval report's numbers (per set and overall), at the run's last step."""
        values = _numbers({"sets": report.get("sets", {}), "overall": report.get("overall", {})})
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(f"eval/{key}", value, step)
        if self._mlflow is not None:
            for key, value in values.items():
                self._mlflow.log_metric(self._ids["mlflow"], f"eval/{key}", value, step=step)
        if self._wandb is not None:
            self._wandb.log({f"eval/{k}": v for k, v in values.items()}, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._mlflow is not None:
            self._mlflow.set_terminated(self._ids["mlflow"])
        if self._wandb is not None:
            self._wandb.finish()


def _first_line(error: Exception) -> str:
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}"


def _read_ids(path: Path) -> dict[str, Any]:
    try:
        ids = json.loads(path.read_text())
    except (OSError, ValueError):
        ids = None
    if not isinstance(ids, dict):
        raise TrackingError(
            f"{path} is damaged, so the tracker runs to continue are unknown; delete it to log to new tracker runs"
        )
    return ids


def _import(module: str, extra: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise TrackingError(
            f"train.report_to names {module!r} but it is not installed; `pip install target-sft[{extra}]` "
            f"or remove it from train.report_to"
        ) from None
