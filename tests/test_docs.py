"""The documentation site builds with `mkdocs build --strict` (a broken link, anchor or page fails),
offline from the lock, and its configuration reference is generated from the code."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import typing

from pipeline.entry.config import RunConfig
from tests.conftest import REPO


def _keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        keys.append(f"{prefix}{f.name}")
        tp = hints[f.name]
        if typing.get_origin(tp) is typing.Annotated:
            tp = typing.get_args(tp)[0]
        for kind in typing.get_args(tp) or (tp,):
            if isinstance(kind, type) and dataclasses.is_dataclass(kind):
                keys += _keys(kind, f"{prefix}{f.name}.")
    return keys


def test_the_site_builds_strictly_and_the_config_reference_names_every_key(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    reference = (REPO / "docs" / "reference" / "config.md").read_text()
    missing = [k for k in _keys(RunConfig) if f"| `{k}` |" not in reference]
    assert missing == [], missing
    assert (tmp_path / "site" / "reference" / "config" / "index.html").exists()


def test_every_relative_link_in_the_readme_names_a_file():
    readme = (REPO / "README.md").read_text()
    targets = re.findall(r"\]\(((?!https?://|#)[^)\s#]+)", readme)
    assert targets, "the README links into docs/"
    assert [t for t in targets if not (REPO / t).exists()] == []
