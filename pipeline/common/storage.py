"""Small filesystem helpers: atomic writes and content hashes.

Outputs appear whole or not at all: everything is written under a temporary name in the same
folder and renamed into place, which is atomic on POSIX filesystems (local disk, NFS).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from pipeline.common.errors import ConfigError


class Damaged(ValueError):
    """Stored bytes that are not what was written (truncated, edited, half-deleted; another size or
    digest than recorded): the tokenisation cache rebuilds such an entry, resume skips such a
    checkpoint. One class for every reader that checks what it reads."""


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder that is renamed to `final` if the block succeeds.

    Raises:
        FileExistsError: `final` already exists (callers decide whether to reuse it).
    """
    final = Path(final)
    if final.exists():
        raise FileExistsError(f"{final} already exists")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def lock_file(path: Path, shared: bool = False, wait: bool = True) -> IO[str] | None:
    """`path` opened and flock-ed (shared or exclusive); None when `wait` is False and another
    process holds it. Lock files are removed by `cache gc` (holding them exclusively) once what they
    guard is gone, so a lock taken on a file that was unlinked meanwhile guards nothing: then the
    file at `path` is opened and locked again."""
    how = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB)
    while True:
        handle = open(path, "a")  # noqa: SIM115 (the caller closes it, which lets go of the lock)
        try:
            fcntl.flock(handle, how)
        except BlockingIOError:
            handle.close()
            return None
        except BaseException:
            handle.close()
            raise
        try:
            current = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            current = False
        if current:
            return handle
        handle.close()


REMOTE_SCHEMES = ("s3", "gs", "gcs")
"""fsspec protocols a storage root may name; anything else with `://` is refused by `resolve_root`."""


def resolve_root(root: str) -> str:
    """The one reading of `storage_root` that every stage uses (docs/design.md §5).

    `~` and `$VARS` are expanded here, once, so fsspec (which expands `~`) and pathlib (which does
    not) can never disagree about where a stage writes; `file://` becomes its plain path. Remote
    roots keep their URL; only persistent object stores are accepted (a `memory://` set would be
    gone in the next process).
    """
    text = str(root).strip()
    if not text:
        raise ConfigError("storage_root is empty; give a folder (or s3://bucket/prefix)")
    scheme, sep, rest = text.partition("://")
    if sep and scheme == "file":
        if not rest.startswith("/"):
            raise ConfigError(f"storage_root={root!r}: a file:// URL needs an absolute path, e.g. file:///data/x")
        text = rest
    elif sep:
        if scheme not in REMOTE_SCHEMES:
            why = " (it does not persist beyond one process)" if scheme == "memory" else ""
            raise ConfigError(
                f"storage_root={root!r}: {scheme}:// is not a supported storage{why}; use a local or mounted "
                "folder, s3://bucket/prefix or gs://bucket/prefix"
            )
        if not rest.strip("/"):
            raise ConfigError(f"storage_root={root!r} names no bucket; use {scheme}://bucket/prefix")
        return text
    text = os.path.expandvars(os.path.expanduser(text))
    if "$" in text or text.startswith("~"):
        raise ConfigError(
            f"storage_root={root!r}: {text!r} still holds an unset variable or an unknown ~user; write the path out"
        )
    return text


def is_remote(root: str | Path) -> bool:
    """Whether a (resolved) storage root is an object store rather than a folder."""
    return "://" in str(root)


def inside(root: str | Path, *parts: str) -> Path:
    """`root/parts...`, refused unless it stays inside `root` (lexically: shared storage may be a symlink).

    Every writer builds its folder through this, so no name can lead a write or a delete elsewhere.
    Runs, evaluations and builds need a real folder (checkpoints, memory maps, file locks): a remote
    root is refused here rather than turned into a local folder named `s3:`.
    """
    if is_remote(root):
        raise ConfigError(
            f"storage_root={str(root)!r} holds prior sets only; runs, evaluations, tokens and the embedded "
            f"model ({'/'.join(parts)}) need a local or mounted folder (NFS, a FUSE mount of the bucket)"
        )
    base = os.path.normpath(root)
    path = os.path.normpath(os.path.join(base, *parts))
    if os.path.commonpath([base, path]) != base or path == base:
        raise ConfigError(f"{'/'.join(parts)!r} would leave the storage root {root}; use a plain name")
    return Path(path)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))


def _digest_file(path: Path, digest: Any, chunk: int = 1 << 24) -> str:
    """Feed a file to `digest` in 16 MiB chunks; its hex digest."""
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return str(digest.hexdigest())


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes."""
    return _digest_file(path, hashlib.sha256())


SUMS = "SHA256SUMS"
"""A model folder's checksums, in `sha256sum`'s format (`sha256sum -c SHA256SUMS` checks them too)."""


def write_sums(folder: Path) -> None:
    """`folder/SHA256SUMS` over every file in it (a finished model folder, before it is renamed into place)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != SUMS)
    lines = [f"{sha256_file(p)}  {p.relative_to(folder).as_posix()}\n" for p in files]
    (folder / SUMS).write_text("".join(lines))


def sums_problem(folder: Path) -> str | None:
    """Why a model folder does not match its SHA256SUMS (a file changed, cut short or missing), or None
    (also when it has none: a folder from elsewhere)."""
    sums = folder / SUMS
    if not sums.is_file():
        return None
    for line in sums.read_text(errors="replace").splitlines():
        digest, _, name = line.partition("  ")
        path = folder / name
        if not path.is_file():
            return f"{name[:80]} is missing"
        if sha256_file(path) != digest:
            return f"{name[:80]} does not match {SUMS}"
    return None


def fast_hash_file(path: Path) -> str:
    """xxh3-128 of a file's bytes: a content key for caches (not for integrity against tampering,
    which the prior cache's sha256 checksums cover), fast enough to read every data file each time."""
    import xxhash

    return _digest_file(path, xxhash.xxh3_128())


def sha256_json(obj: Any) -> str:
    """Stable hash of JSON-serialisable data (sorted keys, no whitespace)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()
