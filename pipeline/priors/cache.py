"""The content-addressed prior cache on shared storage (docs/design.md §4), through fsspec.

    <root>/priors/<key>/key.json           the key inputs (written first, identical for every worker)
    <root>/priors/<key>/shards/NNNNN.parquet   one shard = a contiguous block of examples
    <root>/priors/<key>/manifest.json      key inputs, counts, statistics, shard checksums
    <root>/priors/<key>/_SUCCESS           written last: the set is complete

A shard is written under a temporary name and renamed into place (on object stores a single
PUT, which is atomic), so a name under `shards/` always means a complete shard. Shard content is
a deterministic function of the key and the shard's examples, so two workers that compute the
same shard write identical bytes: several workers on one key still give one consistent set.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import re
import time
import uuid
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any, cast

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.common import prior_schema
from pipeline.common.errors import CacheError
from pipeline.common.prior_schema import PriorRecord
from pipeline.common.storage import sha256_json
from pipeline.priors import regimes

KEY_RE = re.compile(r"^[0-9a-f]{20}$")
SHARD_FILE_RE = re.compile(r"shards/[0-9]{5,}\.parquet")
SHARD_RE = re.compile(r"^\d{5}\.parquet$")
FORMAT_VERSION = 1


def cache_key(inputs: dict[str, Any]) -> str:
    """20 hex digits of sha256 over the canonical JSON of everything that changes the content."""
    return sha256_json({**inputs, "format_version": FORMAT_VERSION})[:20]


def check_key(key: str) -> str:
    """Refuse anything that is not a cache key (so nothing resolves outside the storage root)."""
    if not KEY_RE.match(key):
        raise CacheError(f"{key!r} is not a prior cache key (20 lowercase hex digits); see `target-sft cache ls`")
    return key


@dataclass
class PriorStore:
    """The `priors/` folder under one storage root (local path or fsspec URL)."""

    root: str
    storage_options: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        try:
            self.fs, base = fsspec.core.url_to_fs(self.root, **(self.storage_options or {}))
        except ImportError as e:  # fsspec names the package: "Install gcsfs to access Google Storage"
            raise CacheError(f"storage root {self.root}: {e} (`pip install` it into this environment)") from None
        self.base = base.rstrip("/") + "/priors"

    # paths -----------------------------------------------------------------------------------
    def dir(self, key: str) -> str:
        return f"{self.base}/{check_key(key)}"

    def shard_path(self, key: str, index: int) -> str:
        return f"{self.dir(key)}/shards/{index:05d}.parquet"

    def url(self, path: str) -> str:
        """A path as the user gave the root (local path or s3://...), for messages and manifests."""
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return path if protocol in ("file", "local") else f"{protocol}://{path}"

    # state -----------------------------------------------------------------------------------
    def complete(self, key: str) -> bool:
        self.fs.invalidate_cache(self.dir(key))  # other workers write here too: no stale listings
        return self.fs.exists(f"{self.dir(key)}/_SUCCESS")

    def done_shards(self, key: str) -> set[int]:
        folder = f"{self.dir(key)}/shards"
        self.fs.invalidate_cache(folder)
        if not self.fs.exists(folder):
            return set()
        names = [p.rsplit("/", 1)[-1] for p in self.fs.ls(folder, detail=False)]
        return {int(n[:5]) for n in names if SHARD_RE.match(n)}

    def list_keys(self) -> list[str]:
        if not self.fs.exists(self.base):
            return []
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.base, detail=False)]
        return sorted(n for n in names if KEY_RE.match(n))

    def manifest(self, key: str) -> dict[str, Any]:
        path = f"{self.dir(key)}/manifest.json"
        if not self.fs.exists(path):
            raise CacheError(
                f"prior set {key} has no manifest; it is incomplete (rerun `target-sft priors` to finish it)"
            )
        try:
            manifest = json.loads(self.fs.cat_file(path))
            files = [shard["file"] for shard in manifest["shards"] if isinstance(shard, dict) and "file" in shard]
        except (ValueError, KeyError, TypeError):
            manifest, files = None, []
        for name in files:  # a manifest must never lead the reader outside its own set
            if not isinstance(name, str) or not SHARD_FILE_RE.fullmatch(name):
                raise CacheError(
                    f"the manifest of prior set {key} names shard file {name!r}, which is not a shard of the set; "
                    f"`target-sft cache rm {key}` and capture again"
                )
        missing = _missing_fields(manifest) if manifest is not None else "not the JSON a capture writes"
        if missing:
            raise CacheError(
                f"the manifest of prior set {key} is corrupted ({missing}); "
                f"`target-sft cache rm {key}` and capture again"
            )
        return cast(dict[str, Any], manifest)

    # writing ---------------------------------------------------------------------------------
    def write_bytes_atomic(self, path: str, data: bytes) -> None:
        """Temporary name + rename on filesystems; one PUT (already atomic) on object stores.

        Raises:
            CacheError: the filesystem refused (a full disk, a quota); the files already written stay.
        """
        try:
            self._write_bytes_atomic(path, data)
        except OSError as e:
            raise CacheError(
                f"cannot write {self.url(path)}: {e.strerror or e}; the shards already written are kept: free space "
                "(or raise the quota) and rerun `target-sft priors`, which resumes"
            ) from None

    def _write_bytes_atomic(self, path: str, data: bytes) -> None:
        if is_object_store(self.fs):
            self.fs.pipe_file(path, data)
            return
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.{path.rsplit('/', 1)[-1]}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, path)
        except FileNotFoundError:
            # finalize swept our temporary away because another worker had already written this
            # file; the content is identical (shards depend on their content alone), so we are done
            if not self.fs.exists(path):
                raise
        finally:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)

    def remove_stale_temporaries(self, key: str) -> None:
        """Delete temporary files a killed writer left in the shard folder (run once every shard exists)."""
        if is_object_store(self.fs):
            return
        for path in self.fs.glob(f"{self.dir(key)}/shards/.*.tmp-*"):
            self.fs.rm(path)

    def write_key_inputs(self, key: str, inputs: dict[str, Any]) -> None:
        path = f"{self.dir(key)}/key.json"
        if not self.fs.exists(path):
            self.write_bytes_atomic(path, json.dumps(inputs, indent=2, sort_keys=True).encode())

    def write_shard(
        self, key: str, index: int, records: list[PriorRecord], k: int, seconds: float, vocab: int, lossy: bool = False
    ) -> None:
        """Every record passes the schema's contract first (`prior_schema.conform`, which may clamp
        log-probs a hair above 0: counted); timing and that count go to a sidecar, so the shard bytes
        depend on the content alone.

        Raises:
            PriorError: a record that breaks the contract; nothing of this shard is written.
        """
        clamped = 0
        for i, record in enumerate(records):
            records[i], n = prior_schema.conform(record, vocab, lossy)
            clamped += n
        path = self.shard_path(key, index)
        sidecar = {"seconds": seconds, "clamped": clamped}
        data = encode_shard(records, k)
        self.write_bytes_atomic(path.replace(".parquet", ".timing.json"), json.dumps(sidecar).encode())
        self.write_bytes_atomic(path, data)

    def finalize(
        self, key: str, inputs: dict[str, Any], num_shards: int, engine: str, capture: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Checksum every shard, write manifest.json, then _SUCCESS. Idempotent. `capture` records how the
        set was made (device, dtype, what the rows came to); it is not part of the key."""
        self.remove_stale_temporaries(key)
        shards, totals = (
            [],
            {
                "examples": 0,
                "scored_tokens": 0,
                "bytes": 0,
                "seconds": 0.0,
                "prior_mass": 0.0,
                "outside_topk": 0,
                "observed_unknown": 0,
                "clamped": 0,
            },
        )
        histogram = regimes.code_histogram([])
        for index in range(num_shards):
            data = self.fs.cat_file(self.shard_path(key, index))
            table = pq.read_table(io.BytesIO(data))
            histogram += regimes.code_histogram([_flat(table, "obs_logprob_q")])
            timing = self.shard_path(key, index).replace(".parquet", ".timing.json")
            sidecar = json.loads(self.fs.cat_file(timing)) if self.fs.exists(timing) else {}
            seconds = sidecar.get("seconds", 0.0)
            totals["clamped"] += sidecar.get("clamped", 0)
            stats = shard_statistics(table, inputs["k"])
            shards.append(
                {
                    "index": index,
                    "file": f"shards/{index:05d}.parquet",
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "bytes": len(data),
                    "examples": table.num_rows,
                    "scored_tokens": stats["scored_tokens"],
                }
            )
            totals["examples"] += table.num_rows
            totals["bytes"] += len(data)
            totals["seconds"] += seconds
            for name in ("scored_tokens", "prior_mass", "outside_topk", "observed_unknown"):
                totals[name] += stats[name]
        tokens = max(totals["scored_tokens"], 1)
        manifest = {
            "key": key,
            "format_version": FORMAT_VERSION,
            "schema_version": prior_schema.SCHEMA_VERSION,
            "key_inputs": inputs,
            "engine": engine,
            "counts": {
                "shards": num_shards,
                "examples": totals["examples"],
                "scored_tokens": totals["scored_tokens"],
                "clamped_logprobs": totals["clamped"],  # values in (0, tolerance] read as 0 (prior_schema.conform)
                "observed_logprob_unknown": totals["observed_unknown"],  # rank 0: outside an import's top-k
            },
            "statistics": {
                "mean_prior_mass_captured": totals["prior_mass"] / tokens,
                "share_observed_outside_topk": (totals["outside_topk"] + totals["observed_unknown"]) / tokens,
                "bytes_per_scored_token": totals["bytes"] / tokens,
                "capture_tokens_per_s": totals["scored_tokens"] / max(totals["seconds"], 1e-9),
                "logprob_max_abs_error": prior_schema.MAX_ABS_ERROR,
            },
            "capture": capture or {},
            "gamma_profile": _profile_or_none(histogram, capture or {}, int(totals["observed_unknown"])),
            "shards": shards,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        self.write_bytes_atomic(f"{self.dir(key)}/manifest.json", json.dumps(manifest, indent=2).encode())
        self.write_bytes_atomic(f"{self.dir(key)}/_SUCCESS", b"")
        return manifest

    # checking and removing ------------------------------------------------------------------
    def verify(self, key: str) -> list[str]:
        """Problems found (empty = healthy): completeness, checksums, counts, every stored value against
        the schema's contract (prior_schema.table_problems), and the manifest's γ profile against the
        shards'."""
        if not self.complete(key):
            return [f"prior set {key} is incomplete (no _SUCCESS)"]
        manifest = self.manifest(key)
        problems = []
        on_disk = self.done_shards(key)
        entries = [s["index"] for s in manifest["shards"]]
        expected = set(entries)
        if len(entries) != len(expected) or len({s["file"] for s in manifest["shards"]}) != len(entries):
            problems.append("the manifest lists a shard twice")
        if on_disk != expected:
            problems.append(f"shards on storage {sorted(on_disk ^ expected)} differ from the manifest")
        counts = manifest["counts"]
        for name, total in (
            ("shards", len(entries)),
            ("examples", sum(s["examples"] for s in manifest["shards"])),
            ("scored_tokens", sum(s["scored_tokens"] for s in manifest["shards"])),
        ):
            if counts.get(name) != total:
                problems.append(f"counts.{name}={counts.get(name)} but the shard entries add up to {total}")
        seen: dict[int, str] = {}
        capture: dict[str, Any] = manifest["capture"] if isinstance(manifest.get("capture"), dict) else {}
        vocab = capture.get("vocab") if isinstance(capture.get("vocab"), int) else None
        histogram = regimes.code_histogram([])
        for shard in manifest["shards"]:
            path = f"{self.dir(key)}/{shard['file']}"
            if not self.fs.exists(path):
                problems.append(f"{shard['file']} is missing")
                continue
            data = self.fs.cat_file(path)
            if hashlib.sha256(data).hexdigest() != shard["sha256"]:
                problems.append(f"{shard['file']} checksum mismatch (corrupted or replaced)")
                continue
            table = pq.read_table(io.BytesIO(data))
            if table.num_rows != shard["examples"]:
                problems.append(f"{shard['file']} row count differs from the manifest")
            if shard_statistics(table, manifest["key_inputs"]["k"])["scored_tokens"] != shard["scored_tokens"]:
                problems.append(f"{shard['file']} scored-token count differs from the manifest")
            k = manifest["key_inputs"]["k"]
            problems += [
                f"{shard['file']}: {p}"
                for p in prior_schema.table_problems(table, k, vocab, capture.get("lossy", False))
            ]
            histogram += regimes.code_histogram([_flat(table, "obs_logprob_q")])
            for index in table.column("example_index").to_pylist():
                if index in seen:
                    problems.append(f"example {index} appears in {seen[index]} and in {shard['file']}")
                seen[index] = shard["file"]
        if not problems:
            problems += _profile_problems(manifest.get("gamma_profile"), histogram, capture)
        return problems

    def gamma_profile(self, key: str) -> dict[str, Any]:
        """The set's γ profile (pipeline/priors/regimes.py): from its manifest, or, for a set captured before
        profiles were recorded, computed from its shards and written back into the manifest.

        Raises:
            CacheError: the set is incomplete, corrupted, or has no scored tokens.
        """
        manifest = self.manifest(key)
        recorded = manifest.get("gamma_profile")
        if recorded is not None and "gamma_profile" in manifest:
            problem = regimes.profile_problem(recorded, manifest.get("counts", {}).get("scored_tokens"))
            if problem is not None:
                raise CacheError(
                    f"prior set {key}: the manifest's gamma_profile is damaged or edited ({problem}); "
                    f"`cache verify {key}` checks the set, `cache rm {key}` and a new capture replace it"
                )
            return cast(dict[str, Any], recorded)
        reader = self.open(key)
        histogram = regimes.code_histogram(
            _flat(pq.read_table(io.BytesIO(reader.shard_bytes(shard)), columns=["obs_logprob_q"]), "obs_logprob_q")
            for shard in manifest["shards"]
        )
        try:
            found = regimes.profile(histogram, manifest.get("capture", {}).get("prior_role", "unknown"))
        except CacheError as e:
            raise CacheError(f"prior set {key}: {e}") from None
        with contextlib.suppress(OSError, PermissionError):  # a read-only cache still gets its answer
            self.write_bytes_atomic(
                f"{self.dir(key)}/manifest.json", json.dumps({**manifest, "gamma_profile": found}, indent=2).encode()
            )
        return found

    def remove(self, key: str) -> None:
        folder = self.dir(key)
        if not self.fs.exists(folder):
            raise CacheError(f"no prior set {key} under {self.url(self.base)}")
        self.fs.rm(folder, recursive=True)

    # reading ---------------------------------------------------------------------------------
    def open(self, key: str, expected_inputs: dict[str, Any] | None = None) -> PriorReader:
        """A reader over a complete set; refuses a set whose key inputs differ from `expected_inputs`."""
        if not self.fs.exists(self.dir(key)):
            raise CacheError(f"no prior set {key} under {self.url(self.base)}; run `target-sft priors` first")
        if not self.complete(key):
            raise CacheError(f"prior set {key} is incomplete (no _SUCCESS); rerun `target-sft priors` to finish it")
        manifest = self.manifest(key)
        if expected_inputs is not None and manifest["key_inputs"] != expected_inputs:
            diff = sorted(
                k
                for k in set(manifest["key_inputs"]) | set(expected_inputs)
                if manifest["key_inputs"].get(k) != expected_inputs.get(k)
            )
            raise CacheError(
                f"prior set {key} was captured for different inputs ({', '.join(diff)} differ); "
                "recapture priors for this configuration"
            )
        return PriorReader(self, key, manifest)


def _flat(table: pa.Table, column: str) -> np.ndarray:
    """One list column of a shard as one flat array (every example's entries in order)."""
    return table.column(column).combine_chunks().flatten().to_numpy(zero_copy_only=False)


def _profile_problems(recorded: Any, histogram: np.ndarray, capture: dict[str, Any]) -> list[str]:
    """The manifest's γ profile against the one its shards give (an edited profile is caught)."""
    if recorded is None and not histogram.sum():
        return []
    if not isinstance(recorded, dict):
        return ["the manifest's gamma_profile is missing or not a mapping; the shards give one"]
    found = _profile_or_none(histogram, capture, 0)  # (the caveat is not compared)
    assert found is not None
    differ = sorted(
        name
        for name, value in found.items()
        if name not in ("caveat", "captured_by")
        and not (
            recorded.get(name) == value
            or (
                isinstance(value, float)
                and isinstance(recorded.get(name), (int, float))
                and abs(recorded[name] - value) < 1e-9
            )
        )
    )
    return [f"the manifest's gamma_profile disagrees with its shards on {', '.join(differ)}"] if differ else []


def _profile_or_none(histogram: np.ndarray, capture: dict[str, Any], unknown: int) -> dict[str, Any] | None:
    """A set with no scored tokens has no profile; `cache show` and `priors` then say so in one line.
    An import that lacks some observed log-probs, or holds renormalized values, gets a caveat."""
    if not histogram.sum():
        return None
    caveat = None
    if capture.get("normalized"):
        caveat = ("the source's values are renormalized over its top-k: p(observed) is overstated inside the "
                  "top-k and unknown outside it, so this profile is no bound")  # fmt: skip
    elif unknown:
        caveat = (f"a lower bound: the observed token's log-prob is unknown at {unknown / histogram.sum():.1%} of "
                  "tokens (outside the source's top-k), counted as γ = 0")  # fmt: skip
    return regimes.profile(histogram, capture.get("prior_role", "unknown"), caveat)


MANIFEST_FIELDS: dict[str, type] = {
    "key_inputs": dict,
    "engine": str,
    "counts": dict,
    "statistics": dict,
    "shards": list,
}
SHARD_FIELDS: dict[str, type] = {
    "index": int,
    "file": str,
    "sha256": str,
    "bytes": int,
    "examples": int,
    "scored_tokens": int,
}
COUNT_FIELDS = ("shards", "examples", "scored_tokens")


def _missing_fields(manifest: Any) -> str | None:
    """What a manifest lacks of the structure `finalize` writes, or None; every reader relies on it."""
    if not isinstance(manifest, dict):
        return "not a JSON object"
    for name, kind in MANIFEST_FIELDS.items():
        if not isinstance(manifest.get(name), kind):
            return f"field {name!r} is missing or not a {kind.__name__}"
    if "k" not in manifest["key_inputs"]:
        return "key_inputs has no 'k'"
    for name in COUNT_FIELDS:
        if not isinstance(manifest["counts"].get(name), int):
            return f"counts.{name} is missing"
    for i, shard in enumerate(manifest["shards"]):
        for name, kind in SHARD_FIELDS.items():
            if not isinstance(shard, dict) or not isinstance(shard.get(name), kind):
                return f"shard entry {i} has no {name!r}"
    return None


def storage_error(root: str, error: Exception) -> CacheError:
    """One clear message for an unusable storage root; never echoes credentials."""
    name = type(error).__name__
    if "Credential" in name or "credential" in str(error).lower():
        return CacheError(
            f"no credentials for {root}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the "
            "environment; credentials are never read from run configs"
        )
    if isinstance(error, PermissionError):
        return CacheError(f"storage root {root} is not writable (permission denied)")
    return CacheError(f"cannot write to storage root {root}: {name}: {error}")


def is_object_store(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    return bool(protocols & {"s3", "s3a", "gs", "gcs", "az", "abfs", "memory"})


def encode_shard(records: list[PriorRecord], k: int) -> bytes:
    """Records → Parquet bytes in the shared schema (zstd). Deterministic for equal records."""

    def flat(arrays: list[np.ndarray], dtype: Any) -> pa.Array:
        offsets = np.concatenate([[0], np.cumsum([a.size for a in arrays])]).astype(np.int32)
        values = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.empty(0)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.astype(dtype)))

    columns = [
        pa.array([r.example_index for r in records], pa.int64()),
        pa.array([r.num_tokens for r in records], pa.int32()),
        flat([r.positions for r in records], np.int32),
        flat([r.topk_ids for r in records], np.int32),
        flat([prior_schema.delta_encode(prior_schema.encode_logprobs(r.topk_logprobs), k) for r in records], np.uint16),
        flat([prior_schema.encode_logprobs(r.obs_logprob) for r in records], np.uint16),
        flat([r.obs_rank for r in records], np.int32),
    ]
    meta = {**prior_schema.SCHEMA.metadata, b"target_sft.k": str(k).encode()}
    table = pa.Table.from_arrays(columns, schema=prior_schema.SCHEMA.with_metadata(meta))
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", compression_level=9, write_statistics=False)
    return sink.getvalue()


def shard_statistics(table: pa.Table, k: int) -> dict[str, float]:
    lp = prior_schema.decode_logprobs(prior_schema.delta_decode(_values(table, "topk_logprob_q"), k)).reshape(-1, k)
    ranks = _values(table, "obs_rank")
    return {
        "scored_tokens": int(ranks.size),
        "prior_mass": float(np.exp(lp.astype(np.float64)).sum()),
        "outside_topk": int((ranks > k).sum()),
        "observed_unknown": int((ranks == 0).sum()),
    }


def _values(table: pa.Table, column: str) -> np.ndarray:
    return table.column(column).combine_chunks().values.to_numpy(zero_copy_only=False)


@dataclass
class PriorReader:
    """Streams a verified prior set shard by shard, decoded into per-example records."""

    store: PriorStore
    key: str
    manifest: dict[str, Any]

    @property
    def k(self) -> int:
        return int(self.manifest["key_inputs"]["k"])

    def shard_bytes(self, shard: dict[str, Any]) -> bytes:
        """A shard file's bytes, refused unless they match the manifest's checksum."""
        data = self.store.fs.cat_file(f"{self.store.dir(self.key)}/{shard['file']}")
        if hashlib.sha256(data).hexdigest() != shard["sha256"]:
            raise CacheError(
                f"prior set {self.key}: {shard['file']} fails its checksum (corrupted); "
                f"run `target-sft cache verify {self.key}` and recapture"
            )
        return cast(bytes, data)

    def iter_records(self) -> Iterator[PriorRecord]:
        for shard in self.manifest["shards"]:
            yield from self.read_shard(shard)

    def read_shard(self, shard: dict[str, Any], indices: pa.Array | None = None) -> list[PriorRecord]:
        """One shard's records (only the examples in `indices`, when given), after its checksum."""
        table = pq.read_table(io.BytesIO(self.shard_bytes(shard)))
        if indices is not None:  # drop other examples before decoding: memory and work stay per share
            table = table.filter(pc.is_in(table.column("example_index"), value_set=indices))
        return decode_shard(table, self.k)

    def load_all(self) -> dict[int, PriorRecord]:
        """Every record keyed by example index (fine for sets that fit in memory)."""
        return {r.example_index: r for r in self.iter_records()}

    def load(self, indices: Collection[int]) -> dict[int, PriorRecord]:
        """The records of the given examples only (one training process's share), keyed by index.

        Every shard is still read once, since its checksum covers the whole file, but only the
        wanted rows are decoded and kept.
        """
        wanted = pa.array(sorted(indices), type=pa.int64())
        records = {r.example_index: r for shard in self.manifest["shards"] for r in self.read_shard(shard, wanted)}
        missing = set(indices) - set(records)
        if missing:
            raise CacheError(f"prior set {self.key} has no records for examples {sorted(missing)[:5]}...")
        return records


def decode_shard(table: pa.Table, k: int) -> list[PriorRecord]:
    """Parquet table → records, decoded vectorised over the whole shard, then sliced (views)."""
    bounds = table.column("positions").combine_chunks().offsets.to_numpy()
    positions = _values(table, "positions").astype(np.int32, copy=False)
    ids = _values(table, "topk_ids").astype(np.int32, copy=False).reshape(-1, k)
    codes = prior_schema.delta_decode(_values(table, "topk_logprob_q"), k)
    lps = prior_schema.decode_logprobs(codes).reshape(-1, k)
    obs = prior_schema.decode_logprobs(_values(table, "obs_logprob_q"))
    ranks = _values(table, "obs_rank").astype(np.int32, copy=False)
    index = table.column("example_index").to_numpy()
    num_tokens = table.column("num_tokens").to_numpy()
    return [
        PriorRecord(int(index[i]), int(num_tokens[i]), positions[a:b], ids[a:b], lps[a:b], obs[a:b], ranks[a:b])
        for i, (a, b) in enumerate(itertools.pairwise(bounds))
    ]
