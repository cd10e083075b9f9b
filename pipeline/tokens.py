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
turns: the first builds, the others wait and read.
"""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.loss import IGNORE
from pipeline.storage import atomic_dir

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


class Damaged(Exception):
    """A cache entry that cannot be what `_save` wrote (truncated, edited, half-deleted)."""


def cached(folder: Path, build: Callable[[], Stored], limits: Limits) -> Stored:
    """The examples stored in `folder`, built by `build()` (meta, examples) first if it is absent.

    Builders take turns under a lock beside the folder; one that waited finds the folder complete
    and reads it, so a dataset is tokenised once however many processes start together. Where the
    cache cannot be written (a read-only storage root), the examples are built and kept in memory.
    A damaged entry is treated as absent: removed (under the lock) and built again, with one line.
    """
    if (folder / "meta.json").exists():
        try:
            return _load(folder, limits)
        except Damaged as e:
            damaged = str(e)
        log.warning("tokens: the cache entry %s is damaged (%s); rebuilding it", folder, damaged)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        lock = open(folder.parent / f".{folder.name}.lock", "w")  # noqa: SIM115 (the with below closes it)
    except OSError as e:  # an optimisation lost, not an error: INFO, not a second line on stderr
        log.info("tokens: cannot use the cache %s (%s); tokenising in memory", folder, e.strerror)
        return build()
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if the process dies
        if folder.exists():
            try:
                return _load(folder, limits)  # another process built it while we waited
            except Damaged:
                shutil.rmtree(folder, ignore_errors=True)
        if not (folder / "meta.json").exists():
            meta, examples = build()
            try:
                _save(folder, meta, examples)
            except OSError as e:
                log.info("tokens: cannot write %s (%s); using the examples in memory", folder, e.strerror)
                return meta, examples
            log.info("tokens: wrote %d examples to %s", len(examples), folder)
            del examples  # the in-memory copy goes before the mapped one is read
        try:
            return _load(folder, limits)
        except Damaged as e:  # unreadable right after writing it: the storage itself is at fault
            raise OSError(f"the tokenisation cache {folder} cannot be read back: {e}") from None


def _save(folder: Path, meta: dict[str, Any], examples: list[Example]) -> None:
    """The arrays, written example by example: a concatenated copy of every token would double the
    build's peak memory (README "Data preparation")."""
    lengths = np.array([len(e.input_ids) for e in examples], dtype=np.int64)
    with atomic_dir(folder) as tmp:
        for name, dtype in (("input_ids", np.int32), ("completion", np.bool_)):
            with open(tmp / f"{name}.npy", "wb") as fh:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False}
                np.lib.format.write_array_header_1_0(fh, {**header, "shape": (int(lengths.sum()),)})
                for e in examples:
                    fh.write(np.ascontiguousarray(getattr(e, name), dtype=dtype).tobytes())
        np.save(tmp / "offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
        np.save(tmp / "index.npy", np.array([e.index for e in examples], dtype=np.int64))
        (tmp / "meta.json").write_text(json.dumps({**meta, "format_version": FORMAT_VERSION}, sort_keys=True))


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
