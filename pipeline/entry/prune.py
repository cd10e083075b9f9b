"""`target-sft cache gc`: what a shared storage root can lose, and nothing else (docs/design.md §5).

Prior sets are the product (an expensive capture every later experiment reuses), so gc never
removes one: `cache rm KEY` does, by name. What it removes:

* temporaries: a `.name.tmp-*` left by a killed writer (folders appear by rename, so a temporary
  is never the only copy of anything);
* tokenisation entries (`tokens/<key>/`) that no run, prior set or capture in progress was built
  from (their dataset fingerprint), and damaged ones: `tokens/` is a cache, rebuilt on demand;
* unfinished runs (a folder with our `run.json` but no `final/`) that no experiment lists: a
  `train` that was killed or failed and was never resumed. A folder under `runs/` without
  `run.json` is not ours (notes, TensorBoard's `runs/<date>_<host>/`) and is never touched;
* evaluations in `evals/` of a model folder that no longer exists.

Rules that hold for every candidate: nothing a process holds (the run's lock, or the tokenisation
entry's lock, which every process using the entry holds shared; taken without waiting and held
while removing); nothing touched within `min_age` (a temporary without a lock may still be being
written; an unfinished run may be resumed); nothing reached through a symlink or outside the root.
The lock file of a removed entry or run goes with it (`storage.lock_file` makes that safe). A
candidate is renamed to a temporary before it is deleted, so a removal that fails half-way (a file
it may not delete) leaves a temporary, never half a run; the failure is named and gc goes on.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.common.storage import lock_file


@dataclass
class Dead:
    """One thing gc would remove."""

    path: Path
    why: str
    size: int
    lock: Path | None = None
    """The lock its writer holds (`runs/.<name>.lock`, `tokens/.<key>.lock`), taken while removing it:
    exclusively for an entry or run (any holder, a user too, keeps it), shared for a temporary (only
    a writer, who holds it exclusively, keeps one: users of the finished entry do not)."""

    @property
    def shared(self) -> bool:
        return self.why == "temporary"


def find(root: Path, min_age: float, now: float | None = None) -> list[Dead]:
    """Everything under `root` that gc would remove (temporaries, tokens, runs, evals); reads, never writes."""
    now = time.time() if now is None else now
    old = [p for p in _candidates(root) if now - _newest_mtime(p.path) >= min_age]
    return [d for d in old if d.lock is None or not _held(d.lock, d.shared)]


def collect(dead: list[Dead]) -> tuple[list[Dead], list[str]]:
    """Remove `dead` (as `find` returned it), each under its lock; returns what was removed and a
    line per candidate that could not be (its path and why). A candidate whose lock was taken since
    `find` is left alone."""
    removed, failed = [], []
    for d in dead:
        with _lock(d.lock, d.shared) as ours:
            if not ours or not d.path.exists():
                continue
            try:
                if d.path.is_dir() and not d.path.is_symlink():
                    doomed = d.path
                    if d.why != "temporary":  # whole or not at all: what is left after a failure is a temporary
                        doomed = d.path.with_name(f".{d.path.name}.tmp-gc-{os.getpid()}")
                        d.path.rename(doomed)
                    shutil.rmtree(doomed)
                else:
                    d.path.unlink()
                if d.lock is not None and not d.shared:  # held exclusively: a process that opened it
                    d.lock.unlink(missing_ok=True)  # before this finds it unlinked (storage.lock_file)
            except OSError as e:
                failed.append(f"{e.filename or d.path}: {e.strerror or e} (not removed; gc went on)")
                continue
            removed.append(d)
    return removed, failed


def _candidates(root: Path) -> Iterator[Dead]:
    real = root.resolve()
    for dead in _all_candidates(root):
        # never through a symlink: not the candidate itself, not any folder between it and the root
        hops = [dead.path, *dead.path.parents[: len(dead.path.relative_to(root).parts) - 1]]
        if any(p.is_symlink() for p in hops) or not dead.path.resolve().is_relative_to(real):
            continue
        yield dead


def _all_candidates(root: Path) -> Iterator[Dead]:
    runs, tokens, priors = root / "runs", root / "tokens", root / "priors"
    fingerprints, listed_runs = _references(root)
    for area in ("models", "datasets", "tokens", "priors", "runs", "evals", "experiments"):
        for tmp in sorted((root / area).glob(".*.tmp*")):
            yield Dead(tmp, "temporary", _size(tmp), _owner_lock(tmp))
    for tmp in sorted([*priors.glob("*/shards/.*.tmp-*"), *runs.glob("*/checkpoints/.*.tmp*")]):
        owner = tmp.parent.parent
        yield Dead(tmp, "temporary", _size(tmp), runs / f".{owner.name}.lock" if owner.parent == runs else None)
    for entry in sorted(p for p in tokens.glob("*") if p.is_dir() and not p.name.startswith(".")):
        fingerprint = _json(entry / "meta.json").get("fingerprint")
        if fingerprint is None or fingerprint not in fingerprints:
            why = "damaged tokenisation entry" if fingerprint is None else "tokenisation entry nothing was built from"
            yield Dead(entry, why, _size(entry), tokens / f".{entry.name}.lock")
    for run in sorted(p for p in runs.glob("*") if p.is_dir() and not p.name.startswith(".")):
        ours = (run / "run.json").is_file() and not (run / "run.json").is_symlink()
        if ours and not (run / "final" / "config.json").exists() and run.name not in listed_runs:
            yield Dead(run, "unfinished run no experiment lists", _size(run), runs / f".{run.name}.lock")
    for folder in sorted(p for p in (root / "evals").glob("*") if p.is_dir() and not p.name.startswith(".")):
        model = _json(folder / "report.json").get("model")
        if model and not Path(model).exists():
            yield Dead(folder, f"evaluation of a model that is gone ({model})", _size(folder))


def _references(root: Path) -> tuple[set[str], set[str]]:
    """The dataset fingerprints that runs and prior sets (complete or in progress) were built from,
    and the runs that experiments list."""
    fingerprints = {_json(p).get("dataset_fingerprint") for p in (root / "runs").glob("*/run.json")}
    for key in (root / "priors").glob("*"):
        fingerprints.add(_json(key / "key.json").get("dataset_fingerprint"))
        fingerprints.add(_json(key / "manifest.json").get("key_inputs", {}).get("dataset_fingerprint"))
    listed = set()
    for summary in (root / "experiments").glob("*/summary.json"):
        listed |= {r.get("run") for r in _json(summary).get("runs", []) if isinstance(r, dict)}
    return {f for f in fingerprints if isinstance(f, str)}, {r for r in listed if isinstance(r, str)}


def _owner_lock(tmp: Path) -> Path | None:
    """`.name.tmp-*` is written under `.name.lock` where its writer takes one (tokens, runs)."""
    name = tmp.name[1:].split(".tmp", 1)[0]
    lock = tmp.parent / f".{name}.lock"
    return lock if lock.exists() else None


def _json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or {} when it is absent or damaged (gc must survive both)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _size(path: Path) -> int:
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_dir() or p.is_symlink())


def _newest_mtime(path: Path) -> float:
    """The last time anything in `path` changed: a run writing its metrics is young."""
    stamps = [path.lstat().st_mtime]
    if path.is_dir() and not path.is_symlink():
        stamps += [p.lstat().st_mtime for p in path.rglob("*")]
    return max(stamps)


def _held(lock: Path, shared: bool = False) -> bool:
    with _lock(lock, shared) as ours:
        return not ours


@contextlib.contextmanager
def _lock(lock: Path | None, shared: bool = False) -> Iterator[bool]:
    """Take `lock` (exclusively, or `shared`) without waiting, for the block; yields whether we have it
    (no lock file: yes)."""
    if lock is None or not lock.exists():
        yield True
        return
    handle = lock_file(lock, shared, wait=False)
    if handle is None:
        yield False
        return
    with handle:
        yield True


def report(dead: list[Dead], root: Path, removed: bool, failed: list[str] | None = None) -> str:
    """What gc removed (or, with a dry run, would remove), as a table with the space it frees, and
    what it could not remove."""
    verb = "removed" if removed else "would remove"
    lines = [f"| {verb} | why | size |", "|---|---|---:|"]
    lines += [f"| {os.path.relpath(d.path, root)} | {d.why} | {_human(d.size)} |" for d in dead]
    total = sum(d.size for d in dead)
    lines.append(f"\n{len(dead)} entries, {_human(total)} {'freed' if removed else 'to free'} under {root}")
    lines += [f"could not remove {line}" for line in failed or []]
    return "\n".join(lines)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
