"""A real Prefect server on 127.0.0.1, the experiment served as a cron deployment, one triggered run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, free_port


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    out = log.open("w")
    return subprocess.Popen(args, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def _wait_until(check, timeout: float, what: str, log: Path):
    deadline = time.time() + timeout
    while time.time() < deadline:
        result = check()
        if result:
            return result
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}; log:\n{log.read_text()[-3000:]}")


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def test_cron_deployment_on_a_real_server_runs_to_completed_with_artifact(tiny_build, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_UI_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    config = tmp_path / "experiment.yaml"
    eval_sets = [{"name": "arith", "path": str(tiny_build.sft_heldout), "answer_type": "numeric"}]
    config.write_text(
        yaml.safe_dump(
            {
                "storage_root": str(tmp_path / "storage"),
                "model": {"path": str(tiny_build.model)},
                "data": {"path": str(tiny_build.sft_train), "max_length": 128},
                "train": {"batch_size": 4, "micro_batch_size": 2, "max_steps": 2, "eval_every": 0},
                "eval": {"engine": "hf", "n": 2, "limit": 4, "max_new_tokens": 16, "sets": eval_sets},
                "experiment": {"name": "nightly", "targets": ["sft"], "seeds": [0], "schedule": "0 3 * * *"},
            }
        )
    )
    server_log, serve_log = tmp_path / "server.log", tmp_path / "serve.log"
    server_cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    server = _start(server_cmd, env, server_log)
    serve = None
    try:
        _wait_until(lambda: _healthy(api), 180, "the Prefect server", server_log)
        serve_cmd = [sys.executable, "-m", "flows.cli", "serve", str(config), "--name", "nightly-test"]
        serve = _start(serve_cmd, {**env, "PREFECT_API_URL": api}, serve_log)
        with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:

            def deployment():
                try:
                    return client.read_deployment_by_name("target-sft-experiment/nightly-test")
                except Exception:  # not registered yet
                    return None

            found = _wait_until(deployment, 120, "the deployment to be registered", serve_log)
            assert [s.schedule.cron for s in found.schedules] == ["0 3 * * *"]
            run = client.create_flow_run_from_deployment(found.id)

            def finished():
                state = client.read_flow_run(run.id).state
                return state if state is not None and state.is_final() else None

            state = _wait_until(finished, 300, "the triggered flow run to finish", serve_log)
            assert state.is_completed(), f"{state.type}: {state.message}\n{serve_log.read_text()[-3000:]}"
            by_run = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
            artifacts = client.read_artifacts(artifact_filter=by_run)
            assert any(a.key == "experiment-nightly" and "nightly-sft-s0" in str(a.data) for a in artifacts)
        summary = json.loads((tmp_path / "storage" / "experiments" / "nightly" / "summary.json").read_text())
        assert [r["status"] for r in summary["runs"]] == ["ok"]
    finally:
        for process in (serve, server):
            if process is not None:
                _stop(process)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
