"""Thin Prefect flows over the `pipeline` library: they pass paths and manifests, never tensors.

This package initialiser runs before any flow module imports prefect, so the settings below
apply to every flow.

Prefect is configured for offline use before it is imported anywhere in this package.
"""

import os
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_HOME", str(Path.cwd() / ".prefect"))
