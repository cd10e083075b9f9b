"""Tokenised examples as arrays, and the tokenisation cache that stores them.

An `Example` is two array views: int32 token ids and a boolean completion mask (labels are derived
from them, never stored). A prepared dataset is written once per data source and settings to
`<storage>/tokens/<key>/` (docs/design.md §5):

    input_ids.npy   int32 [total tokens]   every example's ids, concatenated
    completion.npy  bool  [total tokens]   True where the label is the token (loss is taken)
    offsets.npy     int64 [examples + 1]   example i is tokens offsets[i]:offsets[i+1]
    index.npy       int64 [examples]       each example's row in the source
    meta.json       fingerprint, tokenizer hash, format, counts, skipped rows, key inputs

That is 5 bytes per token. Later runs, every training process and every capture worker
memory-map the arrays instead of tokenising again, so a process holds in memory only the pages of
the examples it touches. The folder is written under a temporary name and renamed into place, and
a file lock beside it makes concurrent builders (torchrun ranks, capture workers, two runs) take
turns: the first builds, the others wait and read. Every process that uses an entry holds that lock
shared for as long as it lives, so `cache gc` never removes an entry in use.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import numpy as np
import torch
from torch import Tensor

from pipeline.common.storage import Damaged, atomic_dir, lock_file
from pipeline.core.targets import IGNORE

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Bump when the arrays or what goes into them change: old folders are then never read."""


@dataclass
class Example:
    """One tokenised example, as views into the cache's arrays (or small arrays of its own)."""

    index: int
    """Row index in the source (stable for error messages and shards)."""
    input_ids: np.ndarray
    """[T] int32 token ids of the whole rendered conversation."""
    completion: np.ndarray
    """[T] bool: True on completion tokens (the ones the loss is taken on)."""

    @classmethod
    def from_labels(cls, index: int, input_ids: Sequence[int], labels: Sequence[int]) -> Example:
        """From Hugging Face style labels (the token on completion tokens, -100 elsewhere)."""
        return cls(index, np.asarray(input_ids, dtype=np.int32), np.asarray(labels) != IGNORE)

    @property
    def labels(self) -> np.ndarray:
        """[T] int64: the token on completion tokens, -100 elsewhere."""
        return np.where(self.completion, self.input_ids, IGNORE).astype(np.int64)

    @property
    def num_scored(self) -> int:
        """Completion tokens that some earlier position predicts (the first token never is)."""
        return int(np.count_nonzero(self.completion[1:]))


def pad_rows(rows: Sequence[Sequence[int] | np.ndarray], value: int, left: bool = False) -> tuple[Tensor, Tensor]:
    """Token rows as one [B, longest] int64 tensor padded with `value` (right, or left for
    generation), and the attention mask (1 on tokens, 0 on padding)."""
    lengths = torch.tensor([len(r) for r in rows])
    longest = int(lengths.max())
    filled = torch.arange(longest) < lengths[:, None]
    if left:
        filled = filled.flip(1)
    ids = torch.full((len(rows), longest), value, dtype=torch.long)
    ids[filled] = torch.from_numpy(np.concatenate([np.asarray(r, dtype=np.int64) for r in rows]))
    return ids, filled.long()


Stored = tuple[dict[str, Any], list[Example]]
"""What the cache holds: the dataset's metadata (JSON) and its examples."""


@dataclass(frozen=True)
class Limits:
    """What every stored example must satisfy; a cache entry that breaks it is damaged."""

    max_length: int
    vocab_size: int


Build = Callable[[Callable[[Example], None]], dict[str, Any]]
"""Tokenises a source, handing each example to the callable it is given; returns the meta."""


def cached(folder: Path, build: Build, limits: Limits) -> Stored:
    """The examples stored in `folder`, built by `build` first if it is absent.

    A build streams each example into the arrays as it is tokenised (`Writer`), so it never holds
    the dataset in memory: its peak is a tokeniser batch plus what the caller maps afterwards.
    Builders take turns under a lock beside the folder; one that waited finds the folder complete
    and reads it, so a dataset is tokenised once however many processes start together. Where the
    cache cannot be written (a read-only storage root, a full disk), the examples are built and kept
    in memory. A damaged entry is treated as absent: removed (under the lock) and built again, with
    one line.
    """
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        lock = _entry_lock(folder)
    except OSError as e:  # a read-only root: read a complete entry as it is, else tokenise in memory
        with contextlib.suppress(Damaged, OSError):
            if (folder / "meta.json").exists():
                return _load(folder, limits)
        log.info("tokens: cannot use the cache %s (%s); tokenising in memory", folder, e.strerror)
        return _in_memory(build)
    if (folder / "meta.json").exists():
        try:
            return _load(folder, limits)
        except Damaged as e:
            log.warning("tokens: the cache entry %s is damaged (%s); rebuilding it", folder, e)
    fcntl.flock(lock, fcntl.LOCK_EX)  # builders take turns (converting the hold above)
    try:
        if folder.exists():
            try:
                return _load(folder, limits)  # another process built it while we waited
            except Damaged:
                shutil.rmtree(folder, ignore_errors=True)
        if not (folder / "meta.json").exists():
            try:
                with atomic_dir(folder) as tmp, Writer(tmp) as writer:
                    writer.finish(build(writer.add))
            except OSError as e:
                log.info("tokens: cannot write %s (%s); tokenising in memory", folder, e.strerror or e)
                return _in_memory(build)
            log.info("tokens: wrote %d examples to %s", writer.count, folder)
            _give_back_freed_heap()
        try:
            return _load(folder, limits)
        except Damaged as e:  # unreadable right after writing it: the storage itself is at fault
            raise OSError(f"the tokenisation cache {folder} cannot be read back: {e}") from None
    finally:
        fcntl.flock(lock, fcntl.LOCK_SH)  # back to a user's hold


_HELD: dict[Path, IO[str]] = {}
"""The lock file of every entry this process has used, held (shared) until the process exits: the
examples are memory-mapped from the entry, and `cache gc` removes only entries whose lock it can
take exclusively. One handle per entry, so a second use in the same process never waits on itself."""


def release(under: Path) -> None:
    """Let go of the entries under `under` that this process used (their locks close): for a
    long-lived process done with a storage root, and for unmounting one."""
    for folder in [f for f in _HELD if f.is_relative_to(under)]:
        _HELD.pop(folder).close()


def _entry_lock(folder: Path) -> IO[str]:
    """The entry's lock file, held shared (a user's hold) from the first use until the process exits."""
    handle = _HELD.get(folder)
    if handle is None:
        handle = _HELD[folder] = cast(IO[str], lock_file(folder.parent / f".{folder.name}.lock", shared=True))
    return handle


def _give_back_freed_heap() -> None:
    """Return the heap the tokeniser's batches freed to the OS before the arrays are mapped. glibc
    keeps freed memory of other threads' arenas (the Rust tokenizer's); at 414 tokens per example
    that is about 4 bytes per token the process would hold for its whole life (docs/benchmarks.md "Data
    preparation"). Best effort: only glibc has `malloc_trim`."""
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def _in_memory(build: Build) -> Stored:
    examples: list[Example] = []
    return build(examples.append), examples


class Writer:
    """Examples appended to a cache folder's arrays one at a time. The `.npy` headers are written
    last, over a fixed-size reservation, once the token count is known."""

    HEADER = 128  # bytes reserved for each .npy header (magic, version, length, padded dict)

    def __init__(self, folder: Path) -> None:
        self.folder, self.count, self.tokens = folder, 0, 0
        self._files = {name: open(folder / f"{name}.npy", "wb") for name in ("input_ids", "completion")}  # noqa: SIM115
        for handle in self._files.values():
            handle.write(b"\0" * self.HEADER)
        self._ends: list[int] = []
        self._index: list[int] = []

    def add(self, example: Example) -> None:
        self._files["input_ids"].write(np.ascontiguousarray(example.input_ids, dtype=np.int32).tobytes())
        self._files["completion"].write(np.ascontiguousarray(example.completion, dtype=np.bool_).tobytes())
        self.tokens += len(example.input_ids)
        self.count += 1
        self._ends.append(self.tokens)
        self._index.append(example.index)

    def finish(self, meta: dict[str, Any]) -> None:
        """Headers, offsets, index, then meta.json: the entry is readable only once all are there."""
        for name, dtype in (("input_ids", np.int32), ("completion", np.bool_)):
            handle = self._files[name]
            handle.seek(0)
            handle.write(_npy_header(np.dtype(dtype), self.tokens, self.HEADER))
        self.close()
        np.save(self.folder / "offsets.npy", np.array([0, *self._ends], dtype=np.int64))
        np.save(self.folder / "index.npy", np.array(self._index, dtype=np.int64))
        (self.folder / "meta.json").write_text(json.dumps({**meta, "format_version": FORMAT_VERSION}, sort_keys=True))

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _npy_header(dtype: np.dtype, length: int, size: int) -> bytes:
    """A version-1.0 `.npy` header of exactly `size` bytes for a 1-D array (NEP 1: the dict is
    padded with spaces and ends in a newline)."""
    text = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (length,)})
    body = size - 10  # magic (6), version (2), header length (2)
    return b"\x93NUMPY\x01\x00" + body.to_bytes(2, "little") + text.encode("latin1").ljust(body - 1) + b"\n"


def _load(folder: Path, limits: Limits) -> Stored:
    """Map the arrays, after checking they fit together and within `limits`.

    Raises:
        Damaged: a missing, truncated or edited file, or an example longer than `max_length` or
            with an id outside the vocabulary.
    """
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if not isinstance(meta, dict) or meta.pop("format_version", None) != FORMAT_VERSION:
            raise Damaged("meta.json is not this format's")
        ids, completion, offsets, index = (
            np.load(folder / f"{name}.npy", mmap_mode="r") for name in ("input_ids", "completion", "offsets", "index")
        )
    except Damaged:
        raise
    except (OSError, ValueError, EOFError) as e:  # missing, truncated, not JSON / not .npy
        raise Damaged(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}") from None
    if ids.ndim != 1 or completion.shape != ids.shape or offsets.ndim != 1 or index.ndim != 1:
        raise Damaged("array shapes do not fit together")
    if len(offsets) != len(index) + 1 or len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != len(ids):
        raise Damaged("offsets do not span input_ids")
    lengths = np.diff(offsets)
    if lengths.min() < 1 or lengths.max() > limits.max_length:
        raise Damaged(f"an example is {int(lengths.max())} tokens, over data.max_length={limits.max_length}")
    if ids.min() < 0 or ids.max() >= limits.vocab_size:
        raise Damaged(f"token ids outside the vocabulary (0..{limits.vocab_size - 1})")
    bounds = offsets.tolist()
    examples = [
        Example(i, ids[lo:hi], completion[lo:hi])
        for i, lo, hi in zip(index.tolist(), bounds[:-1], bounds[1:], strict=True)
    ]
    return meta, examples
