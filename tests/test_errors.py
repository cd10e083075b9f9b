"""The error family: every kind through the CLI (message, exit code) and through a Prefect task
(retried or not)."""

from __future__ import annotations

import pytest

from pipeline.common import errors
from pipeline.entry import check, cli

REPO_CONFIG = "configs/worlds/model-strong.yaml"

FAMILY = [
    errors.ConfigError,
    errors.DataError,
    errors.PriorError,
    errors.CacheError,
    errors.TargetError,
    errors.TrainError,
    errors.DivergedError,
    errors.ModelError,
    errors.EvalError,
    errors.TrackingError,
]


def test_every_stage_error_is_one_family():
    assert all(issubclass(e, errors.TargetSFTError) for e in FAMILY)
    found = {c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.TargetSFTError)}
    assert found == {*FAMILY, errors.TargetSFTError}  # the table below covers every kind


@pytest.mark.parametrize(
    "raised,code,stderr_has,stderr_lacks",
    [
        *[
            (kind(f"bad {kind.__name__} input"), 2, f"error: bad {kind.__name__} input\n", "Traceback")
            for kind in FAMILY
        ],
        (RuntimeError("CUDA out of memory"), 1, "Traceback", "error: CUDA out of memory\n"),
        (FileNotFoundError("/no/such/file"), 1, "Traceback", "error: /no/such/file\n"),
        (KeyboardInterrupt(), 130, "interrupted", "Traceback"),
    ],
    ids=[k.__name__ for k in FAMILY] + ["RuntimeError", "FileNotFoundError", "KeyboardInterrupt"],
)
def test_cli_prints_one_line_for_input_errors_and_a_traceback_otherwise(
    monkeypatch, capsys, raised, code, stderr_has, stderr_lacks
):
    def fail(cfg):
        raise raised

    monkeypatch.setattr(check, "dry_run", fail)
    assert cli.main(["check", REPO_CONFIG]) == code
    err = capsys.readouterr().err
    assert stderr_has in err and stderr_lacks not in err, err
    if code == 2:
        assert err.count("\n") == 1


def test_wrapped_errors_keep_their_cause_message(tmp_path):
    from pipeline.priors.cache import storage_error

    error = storage_error(str(tmp_path), OSError(28, "No space left on device"))
    assert "No space left on device" in str(error) and isinstance(error, errors.CacheError)


@pytest.mark.parametrize(
    "kind,attempts",
    [*[(k, 1) for k in FAMILY], (RuntimeError, 2), (OSError, 2)],
    ids=[k.__name__ for k in FAMILY] + ["RuntimeError", "OSError"],
)
def test_flow_tasks_retry_only_unexpected_errors(prefect_server, tmp_path, kind, attempts):
    from prefect import flow, task

    from flows import retry_unexpected

    counter = tmp_path / "attempts"

    @task(retries=1, retry_delay_seconds=0, retry_condition_fn=retry_unexpected)
    def failing() -> None:
        counter.write_text(str(int(counter.read_text() or 0) + 1) if counter.exists() else "1")
        raise kind("boom")

    @flow
    def one_task() -> None:
        failing()

    state = one_task(return_state=True)
    assert state.is_failed()
    assert int(counter.read_text()) == attempts
