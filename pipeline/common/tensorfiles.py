"""Safetensors files written and read in one pass, hashing the bytes as they go (docs/design.md §5).

A checkpoint of a 7B run with fp32 master weights and AdamW state is ~84 GB. Hashing a file after
writing it, and again before loading it, reads all of that back twice, on NFS too. Here the sha256
is computed from the very buffers that are written, and on load from the buffers that are read
into the destination tensors, so every byte crosses the disk once.

The files are plain safetensors (8-byte little-endian header length, a JSON header, the raw
tensors in header order), so `safetensors`, transformers and vLLM read them as usual. Nested
states (an optimizer's, an RNG's) are split into their tensors and a JSON skeleton by
`split_tree`/`join_tree`: no pickle, so loading a checkpoint never runs code.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import torch

from pipeline.common.storage import Damaged

DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
BY_NAME = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 2**20  # the safetensors library's own bound
CHUNK = 16 * 2**20  # hashed on one thread while the next is read or written on the other


class _Digest:
    """sha256 computed on a second thread, in submission order, while this one reads or writes:
    hashlib releases the GIL, so the disk and the hash overlap instead of adding up."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._worker = ThreadPoolExecutor(1)  # one worker: updates run in order
        self._pending: list[Future[None]] = []

    def update(self, view: memoryview) -> None:
        self._pending.append(self._worker.submit(self._hash.update, view))

    def hexdigest(self) -> str:
        for job in self._pending:
            job.result()
        return self._hash.hexdigest()

    def close(self) -> None:
        self._worker.shutdown(wait=True)


def _chunks(view: memoryview) -> Iterator[memoryview]:
    for start in range(0, view.nbytes, CHUNK):
        yield view[start : start + CHUNK]


class _HashingWriter:
    """A file that hashes everything written to it."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle, self.digest, self.size = handle, _Digest(), 0

    def write(self, data: Any) -> None:
        for chunk in _chunks(memoryview(data).cast("B")):
            self.digest.update(chunk)
            self.handle.write(chunk)
            self.size += chunk.nbytes


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A tensor's raw bytes, without a copy when it is already contiguous on the CPU."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy().data) if flat.numel() else memoryview(b"")


def save_tensors(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> dict[str, Any]:
    """Write `tensors` as one safetensors file; returns {"sha256", "size"} of the bytes written."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in DTYPES:
            raise TypeError(f"tensor {name!r} has dtype {t.dtype}, which a checkpoint cannot hold")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as handle:
        out = _HashingWriter(handle)
        try:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            for t in tensors.values():
                out.write(_bytes_of(t))
            return {"sha256": out.digest.hexdigest(), "size": out.size}
        finally:
            out.digest.close()


def load_tensors(path: Path, expected: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Read a safetensors file straight into fresh tensors, checking its size before and its sha256
    after (`expected` as `save_tensors` returned it).

    Raises:
        Damaged: the size, the digest or the layout is not what was recorded.
    """
    size = path.stat().st_size
    if size != expected["size"]:
        raise Damaged(f"{path.name} has {size} bytes, its manifest says {expected['size']}")
    digest = _Digest()
    try:
        with open(path, "rb") as handle:
            out = _read_all(handle, size, path, digest)
        if digest.hexdigest() != expected["sha256"]:
            raise Damaged(f"{path.name} does not match its checksum")
        return out
    finally:
        digest.close()


def _read_all(handle: IO[bytes], size: int, path: Path, digest: _Digest) -> dict[str, torch.Tensor]:
    """Every tensor of an open safetensors file, in file order, each chunk hashed as it lands."""
    head = _read_exactly(handle, 8, path)
    (length,) = struct.unpack("<Q", head)
    if length > min(MAX_HEADER, size - 8):
        raise Damaged(f"{path.name}: header length {length} does not fit the file")
    blob = _read_exactly(handle, length, path)
    digest.update(memoryview(head + blob))
    try:  # the layout is checked before any memory is allocated: a header cannot ask for more than the file holds
        header = json.loads(blob)
        entries = sorted(
            ((name, e) for name, e in header.items() if name != "__metadata__"), key=lambda x: x[1]["data_offsets"][0]
        )
        layout = [
            (name, BY_NAME[e["dtype"]], [int(n) for n in e["shape"]], *map(int, e["data_offsets"]))
            for name, e in entries
        ]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise Damaged(f"{path.name}: not a safetensors header ({type(e).__name__}: {e})") from None
    out: dict[str, torch.Tensor] = {}
    position = 8 + length
    for name, dtype, shape, begin, end in layout:
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if (
            min(shape, default=0) < 0
            or 8 + length + begin != position
            or end - begin != nbytes
            or position + nbytes > size
        ):
            raise Damaged(f"{path.name}: tensor {name!r} is not where the header says")
        t = torch.empty(shape, dtype=dtype)
        if nbytes:
            for chunk in _chunks(t.reshape(-1).view(torch.uint8).numpy().data):
                _read_into(handle, chunk, path)
                digest.update(chunk)
        out[name] = t
        position += nbytes
    if position != size:
        raise Damaged(f"{path.name}: {size - position} bytes after the last tensor")
    return out


def _read_exactly(handle: IO[bytes], n: int, path: Path) -> bytes:
    data = handle.read(n)
    if len(data) != n:
        raise Damaged(f"{path.name} ends early")
    return data


def _read_into(handle: IO[bytes], view: memoryview, path: Path) -> None:
    done = 0
    while done < view.nbytes:
        got = handle.readinto(view[done:])  # type: ignore[attr-defined]
        if not got:
            raise Damaged(f"{path.name} ends early")
        done += got


def split_tree(
    obj: Any, tensors: dict[str, torch.Tensor] | None = None, path: str = "t"
) -> tuple[Any, dict[str, torch.Tensor]]:
    """A nested state (dicts, lists, tuples, numbers, strings, tensors) as a JSON skeleton plus its
    tensors, named by their place in the tree. Dict keys keep their type (an optimizer's state is
    keyed by int)."""
    tensors = {} if tensors is None else tensors
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj
        return {"tensor": path}, tensors
    if isinstance(obj, dict):
        return {
            "dict": [[k, split_tree(v, tensors, f"{path}.{i}")[0]] for i, (k, v) in enumerate(obj.items())]
        }, tensors
    if isinstance(obj, (list, tuple)):
        items = [split_tree(v, tensors, f"{path}.{i}")[0] for i, v in enumerate(obj)]
        return ({"tuple": items} if isinstance(obj, tuple) else {"list": items}), tensors
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"value": obj}, tensors
    raise TypeError(f"{type(obj).__name__} at {path} cannot be stored in a checkpoint")


def join_tree(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `split_tree`."""
    if "tensor" in skeleton:
        return tensors[skeleton["tensor"]]
    if "dict" in skeleton:
        return {k: join_tree(v, tensors) for k, v in skeleton["dict"]}
    if "list" in skeleton:
        return [join_tree(v, tensors) for v in skeleton["list"]]
    if "tuple" in skeleton:
        return tuple(join_tree(v, tensors) for v in skeleton["tuple"])
    return skeleton["value"]
