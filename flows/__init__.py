"""Thin Prefect flows over the `pipeline` library: they pass paths and manifests, never tensors.

This package initialiser runs before any flow module imports prefect, so the settings below
apply to every flow: offline use (no analytics), and a Prefect home only where the user has none.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path
from typing import Any

# Settings that mean "this user already chose where Prefect keeps its state or sends its runs".
USER_PREFECT_SETTINGS = ("PREFECT_HOME", "PREFECT_API_URL", "PREFECT_PROFILES_PATH", "PREFECT_PROFILE")


def default_prefect_home(
    environ: os._Environ[str] | dict[str, str], user_home: Path, cwd: Path, version: str
) -> str | None:
    """The project-local Prefect home to use, or None where the user has a profile or an API URL.

    One home per Prefect version (`./.prefect/<version>/`): a server never opens a database that
    another Prefect version migrated (an older server cannot read a newer schema, and
    `make demo` / `make test` on two versions once broke each other that way).
    """
    if any(environ.get(name) for name in USER_PREFECT_SETTINGS):
        return None
    if (user_home / ".prefect" / "profiles.toml").exists():
        return None
    return str(cwd / ".prefect" / version)


def home_paths(environ: os._Environ[str] | dict[str, str]) -> dict[str, str]:
    """The files Prefect writes that do not follow PREFECT_HOME, pointed into it.

    Prefect 3.7 computes the defaults of `results.local_storage_path` and `server.memo_store_path`
    inside their own settings sections, where the top-level `home` is not visible, so they fall back
    to `~/.prefect/` whatever PREFECT_HOME says (prefect/settings/models/_defaults.py): the tests
    left `~/.prefect/storage` behind and the demo warned about `~/.prefect/memo_store.toml`. Where a
    home is set (ours or the user's) and the user has not chosen these paths, they go under it.
    """
    home = environ.get("PREFECT_HOME")
    if not home:
        return {}
    wanted = {
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(Path(home) / "storage"),
        "PREFECT_SERVER_MEMO_STORE_PATH": str(Path(home) / "memo_store.toml"),
    }
    aliases = {"PREFECT_RESULTS_LOCAL_STORAGE_PATH": "PREFECT_LOCAL_STORAGE_PATH", "PREFECT_SERVER_MEMO_STORE_PATH":
               "PREFECT_MEMO_STORE_PATH"}  # fmt: skip
    return {k: v for k, v in wanted.items() if not environ.get(k) and not environ.get(aliases[k])}


def main() -> int:
    """The `target-sft` command. Without the CPU-kernel pinning variables it re-executes itself with
    them (`cpu_kernels.reexec_pinned`) before torch and the library load (~15 s on a small machine),
    so that a re-executed command pays that once, not twice."""
    from pipeline.common import cpu_kernels

    cpu_kernels.reexec_pinned()
    from flows.cli import main as run

    return run()


def retry_unexpected(task: Any, task_run: Any, state: Any) -> bool:
    """Every task's retry condition: retry what may pass next time (a lost GPU, a full node), never
    an input error or a divergence (`TargetSFTError`), which would only fail again."""
    from pipeline.common.errors import TargetSFTError

    try:
        state.result()
    except TargetSFTError:
        return False
    except BaseException:
        return True
    return False


os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# The library's own loggers (training progress: step, loss, tokens/s, ETA) go into the flow logs.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "pipeline")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")  # the library also runs outside flows
_home = default_prefect_home(os.environ, Path.home(), Path.cwd(), importlib.metadata.version("prefect"))
if _home is not None:
    Path(_home).mkdir(parents=True, exist_ok=True)  # Prefect creates only the last level itself
    os.environ["PREFECT_HOME"] = _home
    # A first start migrates a new database: on a busy 2-core machine that can pass Prefect's 20 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.update(home_paths(os.environ))
