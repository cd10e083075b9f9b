"""Top-k logprob datasets of other tools, to and from prior sets (docs/design.md §4, "Imports").

**Axolotl's KD datasets.** Tested against Axolotl's own code: 0.19.0 from PyPI, whose
`src/axolotl/integrations/kd/` is byte-identical to 0.21.0's (tests/test_interop_upstream.py).

* Import reads a row per data row, either chat-shaped (`messages`, and per input token j
  `target_token_ids[j]` and `logprobs[j]`, the top-k over input_ids[j + 1], the dataset type
  `axolotl.integrations.kd.chat_template`), or pre-tokenized as Axolotl's KD strategy leaves it
  (`input_ids`, `target_token_ids`, `target_logprobs`). That is our alignment (§3: the prior row of
  position t is the distribution of token t+1), so a scored position t reads row t. A source has
  either T rows (the last one padding) or, stated with `rows="t-1"`, T−1 rows (vLLM's prompt
  logprobs without their empty first entry). Rows are matched by content: by `input_ids` where the
  source has them, else by `messages`; a source with neither is refused.
* Values are log-probs, or, stated with `normalized=True`, log-probs renormalized over the top-k
  (Axolotl's strategy writes those): no tail mass is known then, and the γ profile says so.
* Export writes pre-tokenized rows (`input_ids`, `attention_mask`, `labels`, `target_token_ids`,
  `target_logprobs`, `target_mask`), which Axolotl loads as an already-tokenized dataset and its
  `DataCollatorForKD` batches. Every row has k entries (the collator cannot pad a shorter one);
  `target_mask` is 1 exactly at our scored rows. Axolotl's chat strategy instead masks row j by
  token j's label, not token j+1's, and so never trains the first completion token's distribution;
  the pre-tokenized rows avoid that. Values are the raw log-probs (Axolotl renormalizes them in its
  loss by default, `kd_normalize_topk`).

Where the observed token is outside the source's top-k its log-probability is unknown: it is stored
as −inf with rank 0 (prior_schema: "unknown"), and the γ profile says it is a lower bound. Our own
export adds `observed_logprob` and `observed_rank` columns, which an import reads back.

Every record passes the prior schema's contract (`prior_schema.conform`) on its way into the store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.common import storage
from pipeline.common.config import parse_yaml
from pipeline.common.errors import ConfigError, PriorError
from pipeline.common.models import load_tokenizer
from pipeline.common.prior_schema import CLAMP_TOLERANCE, PriorRecord
from pipeline.common.storage import atomic_dir, sha256_file
from pipeline.data import sources
from pipeline.data.tokens import Example
from pipeline.priors import capture
from pipeline.priors.cache import PriorStore, cache_key
from pipeline.priors.engines import first_difference, scored_positions

log = logging.getLogger(__name__)

PADDING_LOGPROB = -1e9
"""What Axolotl's collator writes in padded slots (a large negative log-prob, never -inf); on
import anything at or below half of it is an absent entry (−inf)."""

Rows = Literal["t", "t-1"]


@dataclass
class ImportResult:
    key: str
    manifest_path: str
    examples: int
    reused: bool
    clamped: int = 0
    """Log-probs a hair above 0 (or, for DistillKit, any positive decoded value) stored as 0."""


def import_axolotl(
    job: capture.CaptureJob,
    source_path: str,
    ids_field: str = "target_token_ids",
    logprobs_field: str | None = None,
    progress: bool = True,
    normalized: bool = False,
    rows: Rows = "t",
) -> ImportResult:
    """Read an Axolotl KD dataset whose rows are the job's data rows, in order, into a prior set.

    Args:
        logprobs_field: the values' column; None: `logprobs` (chat-shaped) or `target_logprobs`
            (pre-tokenized), whichever the source has.
        normalized: the values are log-probs renormalized over the top-k (stated by the user: the
            format cannot tell).
        rows: `t` (a row per token, the last padding) or `t-1` (no padding row).

    Raises:
        PriorError: a row that does not align with this pipeline's tokenisation or breaks the prior
            schema's contract (one line naming it); nothing is left in the store then.
    """
    if not Path(source_path).exists():
        raise PriorError(f"{source_path} does not exist; pass the Axolotl KD dataset's file or folder")
    plan = capture.plan(job)
    source = sources.open_source(source_path, "train", None, None)
    if logprobs_field is None:
        logprobs_field = (
            "target_logprobs"
            if "logprobs" not in source.columns and "target_logprobs" in source.columns
            else "logprobs"
        )
    missing = sorted({ids_field, logprobs_field} - set(source.columns))
    if missing:
        raise PriorError(
            f"{source_path} has no column {', '.join(missing)} (it has {sorted(source.columns)}); "
            "name the columns with --ids-field and --logprobs-field"
        )
    if "input_ids" not in source.columns and "messages" not in source.columns:
        raise PriorError(
            f"{source_path} has neither input_ids nor messages, so its rows cannot be matched to the data's by "
            "content; export it with one of them"
        )
    optional = [c for c in ("input_ids", "messages", "observed_logprob", "observed_rank") if c in source.columns]
    engine: dict[str, Any] = {"name": "import", "format": "axolotl", "fields": [ids_field, logprobs_field]}
    engine.update({"versions": {}, "normalized": normalized, "rows": rows})
    vocab = len(load_tokenizer(plan.prior_model, job.model.trust_remote_code))
    examples = {e.index: e for e in plan.prepared.examples}
    ours = sources.open_source(job.data_path, job.data.split, job.data.subset, job.data.data_files)
    fmt = plan.prepared.format

    def aligned() -> Iterator[PriorRecord]:
        """The records in the data's order; the source's rows are the data's rows, one for one."""
        count = 0
        mine = ours.stream(sources.needed_columns(fmt, job.data.columns))
        for count, row in enumerate(source.stream([ids_field, logprobs_field, *optional]), start=1):
            if job.data.limit is not None and count > job.data.limit:
                count -= 1
                break
            own = next(mine, None)
            example = examples.get(count - 1)
            if example is None:  # a row this pipeline's data policy dropped (too long, invalid)
                continue
            by_messages = "input_ids" not in optional and own is not None
            if by_messages and _turns(row.get("messages")) != _turns(sources.to_messages(own, fmt, job.data)):
                raise PriorError(
                    f"row {example.index}: the source's messages differ from the data's row {example.index}; "
                    "an import needs one source row per data row, in the same order"
                )
            yield axolotl_record(example, row, job.priors.k, vocab, ids_field, logprobs_field, rows)
        if count != plan.prepared.rows:
            raise PriorError(
                f"{source_path} has {count} rows, the data {plan.prepared.rows}: an import needs one source row "
                "per data row, in the same order"
            )

    return _write_set(job, plan, engine, source_path, aligned(), progress, vocab, {"normalized": normalized})


def _write_set(
    job: capture.CaptureJob,
    plan: capture.CapturePlan,
    engine: dict[str, Any],
    source_path: str,
    records: Iterator[PriorRecord],
    progress: bool,
    vocab: int,
    stated: dict[str, Any],
    lossy: bool = False,
) -> ImportResult:
    """Write `records` (in the data's order) as a prior set keyed by the source's content; a failure
    anywhere removes what was written, unless another process had started the same set."""
    key_inputs = {**plan.key_inputs, "engine": engine, "source_sha256": files_sha256(source_path)}
    key = cache_key(key_inputs)
    store = PriorStore(job.root)
    manifest_path = store.url(f"{store.dir(key)}/manifest.json")
    total = len(plan.prepared.examples)
    if store.complete(key):
        return ImportResult(key, manifest_path, total, reused=True)
    capture = {"engine": "import", "source_format": engine["format"], "data_counts": plan.prepared.counts()}
    capture.update({"prior_role": "teacher" if plan.teacher else "model", "vocab": vocab, "lossy": lossy, **stated})
    with _writer_lock(store, key):
        if store.complete(key):  # another import finished it before this one took the lock: reuse
            return ImportResult(key, manifest_path, total, reused=True)
        return _write_records(job, store, key, key_inputs, records, total, progress, vocab, lossy, capture, source_path)


@contextlib.contextmanager
def _writer_lock(store: PriorStore, key: str) -> Iterator[None]:
    """One import at a time per set, on a local root (a file lock beside the set, held while writing):
    a second import of the same source stops with a line instead of writing the same shards, and its
    failure can never remove the first one's work. An object store has no file locks: there the
    imports write identical bytes, and only a failed one's own fresh folder is removed."""
    if storage.is_remote(store.root):
        yield
        return
    Path(store.base).mkdir(parents=True, exist_ok=True)
    with open(f"{store.base}/.{key}.import.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PriorError(
                f"another import into prior set {key} (the same source) is running; wait for it to finish, "
                "then rerun: the set is reused"
            ) from None
        yield


def _write_records(
    job: capture.CaptureJob,
    store: PriorStore,
    key: str,
    key_inputs: dict[str, Any],
    records: Iterator[PriorRecord],
    total: int,
    progress: bool,
    vocab: int,
    lossy: bool,
    capture: dict[str, Any],
    source_path: str,
) -> ImportResult:
    """The shards, manifest and _SUCCESS of an import (under `_writer_lock`); a failure removes the
    set's folder if this import created it."""
    manifest_path = store.url(f"{store.dir(key)}/manifest.json")
    existed = store.fs.exists(store.dir(key))
    shard: list[PriorRecord] = []
    written = 0
    bar = tqdm(total=total, unit="ex", desc=f"import {key[:8]}", disable=not progress)
    try:
        store.write_key_inputs(key, key_inputs)
        for record in records:
            shard.append(record)
            bar.update(1)
            if len(shard) == job.priors.shard_size:
                store.write_shard(key, written, shard, job.priors.k, 0.0, vocab, lossy)
                written, shard = written + 1, []
        if shard:
            store.write_shard(key, written, shard, job.priors.k, 0.0, vocab, lossy)
            written += 1
        manifest = store.finalize(key, key_inputs, written, "import", capture)
    except BaseException:
        if not existed and store.fs.exists(store.dir(key)):
            store.fs.rm(store.dir(key), recursive=True)  # an import that fails leaves nothing behind
        raise
    finally:
        bar.close()
    log.info("imported %s examples from %s into prior set %s", total, source_path, key)
    return ImportResult(key, manifest_path, total, reused=False, clamped=int(manifest["counts"]["clamped_logprobs"]))


def _turns(messages: Any) -> list[tuple[Any, Any]] | None:
    """A chat as (role, content) pairs: Parquet adds keys that other turns of the file had."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return None
    return [(m.get("role"), m.get("content")) for m in messages]


def _integers(value: Any, what: str) -> np.ndarray:
    """A list of whole numbers as int64; anything else (floats with a fraction, strings, nulls) is one line."""
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise PriorError(f"{what} are not numbers") from None
    if (
        array.ndim != 1
        or not np.all(np.isfinite(array))
        or np.any(array != np.round(array))
        or np.any(np.abs(array) > 2**62)
    ):
        raise PriorError(f"{what} are not whole numbers (e.g. {value if array.ndim != 1 else value[:4]})")
    return array.astype(np.int64)


def _floats(value: Any, what: str) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise PriorError(f"{what} are not numbers") from None
    if array.ndim != 1:
        raise PriorError(f"{what} are not a flat list of numbers")
    return array


def axolotl_record(
    example: Example,
    row: dict[str, Any],
    k: int,
    vocab: int,
    ids_field: str,
    logprobs_field: str,
    rows: Rows = "t",
) -> PriorRecord:
    """One row's prior at this pipeline's scored positions; any misalignment raises one line."""
    where = f"row {example.index}"
    ids_rows, lp_rows = row[ids_field], row[logprobs_field]
    length = len(example.input_ids)
    expected = length if rows == "t" else length - 1
    if not isinstance(ids_rows, list) or not isinstance(lp_rows, list) or len(ids_rows) != len(lp_rows):
        raise PriorError(f"{where}: {ids_field} and {logprobs_field} must be lists of the same length")
    if len(ids_rows) != expected:
        hint = (
            "; its rows are one fewer than the tokens: if row i describes token i+1 (vLLM's prompt logprobs without "
            "the empty first entry), pass --rows t-1"
            if len(ids_rows) == length - 1
            else "; the source was made with another tokenizer, chat template or length policy"
        )
        raise PriorError(
            f"{where}: the source has {len(ids_rows)} positions, this pipeline's tokenisation {length} tokens "
            f"(expected {expected} rows for --rows {rows}){hint}"
        )
    if row.get("input_ids") is not None:
        theirs = _integers(row["input_ids"], f"{where}: input_ids")
        differ = np.nonzero(theirs != example.input_ids.astype(np.int64))[0] if len(theirs) == length else [0]
        if len(differ):
            raise PriorError(
                f"{where}, position {int(differ[0])}: the source's input_ids differ from this pipeline's "
                "tokenisation; it was made with another tokenizer or chat template"
            )
    positions = scored_positions(example)
    top_ids = np.zeros((len(positions), k), dtype=np.int32)
    top_lp = np.zeros((len(positions), k), dtype=np.float32)
    obs_lp = np.full(len(positions), -np.inf, dtype=np.float32)
    obs_rank = np.zeros(len(positions), dtype=np.int32)
    observed_lp, observed_rank = row.get("observed_logprob"), row.get("observed_rank")
    for i, t in enumerate(positions):
        ids = _integers(ids_rows[t], f"{where}, position {t}: token ids")
        lps = _floats(lp_rows[t], f"{where}, position {t}: log-probs")
        if len(ids) != len(lps) or len(ids) < k:
            raise PriorError(
                f"{where}, position {t}: {len(ids)} top-k entries ({len(lps)} log-probs), fewer than priors.k={k}; "
                f"lower priors.k to at most the source's k"
            )
        if ids.min() < 0 or ids.max() >= vocab:
            raise PriorError(
                f"{where}, position {t}: token id {int(ids.max() if ids.max() >= vocab else ids.min())} is "
                f"outside the prior model's vocabulary of {vocab}; the source used another tokenizer"
            )
        lps = np.where(lps <= PADDING_LOGPROB / 2, -np.inf, lps)
        order = np.argsort(-lps, kind="stable")
        top_ids[i], top_lp[i] = ids[order[:k]], lps[order[:k]]
        observed = int(example.input_ids[t + 1])
        if observed_lp is not None and observed_lp[t] is not None:
            rank = observed_rank[t] if observed_rank is not None else None
            if rank is None:
                hit = np.nonzero(ids[order] == observed)[0]
                rank = int(hit[0]) + 1 if len(hit) else 0
            obs_lp[i], obs_rank[i] = (
                _floats([observed_lp[t]], f"{where}, position {t}: observed_logprob")[0],
                int(_integers([rank], f"{where}, position {t}: observed_rank")[0]),
            )
        elif observed in ids:
            at = int(np.nonzero(ids[order] == observed)[0][0])
            obs_lp[i], obs_rank[i] = lps[order[at]], at + 1
    return PriorRecord(example.index, length, positions, top_ids, top_lp, obs_lp, obs_rank)


def export_axolotl(job: capture.CaptureJob, key: str, out: Path, progress: bool = True) -> Path:
    """Write prior set `key` with the job's data rows as a pre-tokenized Axolotl KD dataset:
    `out/train.parquet` (the folder appears whole or not at all).

    Every input token j gets a row of k entries: the prior's top-k at scored positions, and a uniform
    placeholder elsewhere, masked out by `target_mask` (Axolotl's collator needs equal lengths).
    `labels` marks completion tokens as Axolotl's trainer reads them (−100 elsewhere). `messages`,
    `observed_logprob` and `observed_rank` are extra columns Axolotl's trainer drops and our import
    reads back.
    """
    try:
        if out.exists():
            raise PriorError(f"{out} exists; export into a new folder")
    except OSError as e:
        raise PriorError(f"cannot write {str(out)[:200]}: {e.strerror or e}; choose a writable folder") from None
    plan = capture.plan(job)
    reader = PriorStore(job.root).open(key)
    recorded = reader.manifest["key_inputs"]
    if recorded["dataset_fingerprint"] != plan.prepared.fingerprint:
        raise PriorError(f"prior set {key} was not made from this config's data ({job.data_path}); pass its config")
    k = reader.k
    records = reader.load_all()
    examples = {e.index: e for e in plan.prepared.examples}
    source = sources.open_source(job.data_path, job.data.split, job.data.subset, job.data.data_files)
    fmt = plan.prepared.format
    names = (
        "messages", "input_ids", "attention_mask", "labels", "target_token_ids", "target_logprobs", "target_mask",
        "observed_logprob", "observed_rank",
    )  # fmt: skip
    table: dict[str, list[Any]] = {name: [] for name in names}
    placeholder_ids, placeholder_lps = list(range(k)), [-math.log(k)] * k
    stream = source.stream(sources.needed_columns(fmt, job.data.columns))
    for index, row in enumerate(tqdm(stream, "export", unit="row", disable=not progress)):
        record = records.get(index)
        if record is None:
            continue
        length = record.num_tokens
        input_ids = examples[index].input_ids.tolist()
        ids = [placeholder_ids] * length
        lps = [placeholder_lps] * length
        mask = [[0] * k] * length
        labels = [-100] * length
        obs: list[float | None] = [None] * length
        ranks: list[int | None] = [None] * length
        for i, t in enumerate(record.positions.tolist()):
            ids[t] = record.topk_ids[i].tolist()
            lps[t] = [x if math.isfinite(x) else PADDING_LOGPROB for x in record.topk_logprobs[i].tolist()]
            mask[t] = [1 if math.isfinite(x) else 0 for x in record.topk_logprobs[i].tolist()]
            labels[t + 1] = input_ids[t + 1]
            obs[t] = float(record.obs_logprob[i]) if np.isfinite(record.obs_logprob[i]) else None
            ranks[t] = int(record.obs_rank[i])
        values = (
            sources.to_messages(row, fmt, job.data), input_ids, [1] * length, labels, ids, lps, mask, obs, ranks,
        )  # fmt: skip
        for name, value in zip(names, values, strict=True):
            table[name].append(value)
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pydict(table), buffer, compression="zstd")
    try:
        with atomic_dir(out) as folder:
            (folder / "train.parquet").write_bytes(buffer.getvalue())
    except FileExistsError:
        raise PriorError(f"{out} exists; export into a new folder") from None
    except OSError as e:
        raise PriorError(f"cannot write {str(out)[:200]}: {e.strerror or e}; choose a writable folder") from None
    return out / "train.parquet"


def files_sha256(path: str) -> str:
    """sha256 over a file, or over every file under a folder (each name with its file's sha256, sorted)."""
    digest = hashlib.sha256()
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file() and ".cache" not in p.parts) if root.is_dir() else [root]
    for file in files:
        name = os.fsencode(file.relative_to(root) if root.is_dir() else file.name)
        digest.update(name + b"\0" + sha256_file(file).encode())
    return digest.hexdigest()


# --- DistillKit ------------------------------------------------------------------------------------------
# arcee-ai/DistillKit: `distillkit/sample_logits_vllm.py` writes a folder of `data_N.parquet` shards
# (`input_ids`, and per position `compressed_logprobs` and `bytepacked_indices` byte lists; schema in
# `distillkit/sample_common.py`) beside `compression_config.yaml`, a `DistributionQuantizationConfig`
# (`distillkit/compression/config.py`). Its rows are shuffled, carry one extra pad token, and row j of
# a capture is the distribution over input_ids[j + 1] (vLLM's prompt logprobs without the first).

FLOATS: dict[str, Any] = {"float16": np.float16, "float32": np.float32, "float64": np.float64, "bfloat16": None}


def as_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    """`x` (float32) rounded to `dtype` as torch's `.to(dtype)` does (bfloat16: round to nearest even)."""
    if dtype == "bfloat16":
        bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
        rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16) << 16
        return rounded.astype(np.uint32).view(np.float32)
    return x.astype(FLOATS[dtype]).astype(np.float32)


@dataclass
class DistillKitCodec:
    """DistillKit's logprob codec, decoded as `decompress_monotonic_logprobs` does
    (`distillkit/compression/monotonic_logprobs.py`), per position:

        bytes = exact_k values (exact_dtype) | polynomial coefficients (term_dtype)
                | per residual bin: a scale (scale_dtype) and num_elements × element_bits, bit-packed
        logprobs[:exact_k] = the exact values
        logprobs[exact_k:] = X · coeffs + residual,  X[t] = (t^i or sqrt(t), exp(t) per term),
                             t = 0..k-exact_k-1 (or linspace(0, 1) with normalize_t),
                             residual = (q − 2^(bits−1)) · scale per bin (q·2−1 for 1 bit), zeros after
        delta_encoding: logprobs = cumsum(logprobs)

    Token ids are bit-packed, most significant bit first, in ceil(log2(d)) bits each.
    """

    d: int
    k: int
    exact_k: int
    exact_dtype: str
    polynomial_terms: list[int | str]
    term_dtype: str
    residual_bins: list[tuple[str, int, int]]
    """(scale_dtype, element_bits, num_elements) per bin."""
    delta_encoding: bool
    normalize_t: bool

    @classmethod
    def from_yaml(cls, path: Path) -> DistillKitCodec:
        """Read as DistillKit's `DistributionQuantizationConfig` (pydantic) would; a value it would refuse,
        or one that cannot decode (terms that overflow float32, k above d), is one line."""
        if not path.is_file():
            raise PriorError(
                f"{path} is not a regular file; the capture folder holds DistillKit's compression_config.yaml"
            )
        if path.stat().st_size > 1 << 16:
            raise PriorError(f"{path} is {path.stat().st_size:,} bytes, too large for a DistillKit compression config")
        try:
            raw = parse_yaml(path.read_text(), str(path))
        except (ConfigError, OSError, UnicodeDecodeError) as e:
            raise PriorError(f"{path}: not a DistillKit compression config ({str(e)[:300]})") from None
        try:
            if not isinstance(raw, dict):
                raise TypeError("not a mapping")
            codec = cls(
                d=_whole(raw["d"], "d"),
                k=_whole(raw["k"], "k"),
                exact_k=_whole(raw.get("exact_k", 0), "exact_k"),
                exact_dtype=str(raw.get("exact_dtype", "float32")),
                polynomial_terms=list(raw.get("polynomial_terms") or []),
                term_dtype=str(raw.get("term_dtype", "float32")),
                residual_bins=[
                    (
                        str(b["scale_dtype"]),
                        _whole(b["element_bits"], "element_bits"),
                        _whole(b["num_elements"], "num_elements"),
                    )
                    for b in raw.get("residual_bins") or []
                ],
                delta_encoding=_boolean(raw.get("delta_encoding", True), "delta_encoding"),
                normalize_t=_boolean(raw.get("normalize_t", False), "normalize_t"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise PriorError(
                f"{path}: not a DistillKit compression config ({type(e).__name__}: {str(e)[:200]})"
            ) from None
        unknown = [
            d for d in (codec.exact_dtype, codec.term_dtype, *(b[0] for b in codec.residual_bins)) if d not in FLOATS
        ]
        bad_terms = [t for t in codec.polynomial_terms if not isinstance(t, int) and t not in ("sqrt", "exp")]
        if unknown or bad_terms or not 0 <= codec.exact_k <= codec.k or codec.d < 2:
            raise PriorError(f"{path}: unsupported DistillKit compression config (dtypes {unknown}, terms {bad_terms})")
        if codec.k > codec.d or codec.d > 1 << 24:
            raise PriorError(f"{path}: k={codec.k} and d={codec.d} do not describe a top-k over a vocabulary")
        if any(not 1 <= bits <= 64 or count < 1 for _, bits, count in codec.residual_bins):
            raise PriorError(f"{path}: a residual bin needs 1 to 64 element_bits and at least one element")
        span = max(codec.k - codec.exact_k - 1, 1)
        big = [t for t in codec.polynomial_terms if isinstance(t, int) and (t < 0 or t * math.log10(span) > 38)]
        if big or (not codec.normalize_t and "exp" in codec.polynomial_terms and span > 88):
            raise PriorError(f"{path}: polynomial terms {big or ['exp']} overflow float32 over {span + 1} points")
        return codec

    @property
    def index_bits(self) -> int:
        return math.ceil(math.log2(self.d))

    def decode(self, logprob_bytes: np.ndarray, index_bytes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[n, B] and [n, C] uint8 → ids [n, k] int64 and log-probs [n, k] float32, most likely first."""
        n, at = len(logprob_bytes), 0

        def take(count: int, dtype: str) -> np.ndarray:
            nonlocal at
            width = 2 if dtype == "bfloat16" else int(np.dtype(FLOATS[dtype]).itemsize)
            part = np.ascontiguousarray(logprob_bytes[:, at : at + count * width])
            at += count * width
            if dtype == "bfloat16":  # the high half of a float32
                return (part.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(n, count)
            return part.view(FLOATS[dtype]).reshape(n, count)

        exact = take(self.exact_k, self.exact_dtype).astype(np.float32)
        approx_terms = self.k - self.exact_k
        residual = np.zeros((n, approx_terms), dtype=np.float32)
        coeffs = take(len(self.polynomial_terms), self.term_dtype) if self.polynomial_terms else None
        filled = 0
        for scale_dtype, bits, count in self.residual_bins:
            scale = take(1, scale_dtype).astype(np.float32)
            size = (count * bits + 7) // 8
            q = unpack_bits(logprob_bytes[:, at : at + size], bits, count).astype(np.float32)
            at += size
            residual[:, filled : filled + count] = (q * 2 - 1) * scale if bits == 1 else (q - 2 ** (bits - 1)) * scale
            filled += count
        if at != logprob_bytes.shape[1]:
            raise ValueError(f"{logprob_bytes.shape[1]} bytes per position, the config describes {at}")
        approx = as_dtype(residual, self.exact_dtype)  # DistillKit adds the residual in the output dtype
        if coeffs is not None:
            points = (np.linspace(0, 1, approx_terms) if self.normalize_t else np.arange(approx_terms)).astype(
                np.float32
            )
            terms = [points**i if isinstance(i, int) else getattr(np, str(i))(points) for i in self.polynomial_terms]
            approx = (np.stack(terms, axis=-1)[None] * coeffs[:, None, :]).sum(-1, dtype=np.float32) + approx
        logprobs = np.concatenate([exact, approx.astype(np.float32)], axis=-1)
        if self.delta_encoding:  # the sums are cast back to the output dtype there
            logprobs = as_dtype(np.cumsum(logprobs, axis=-1, dtype=np.float32), self.exact_dtype)
        return unpack_bits(index_bytes, self.index_bits, self.k), logprobs.astype(np.float32)


def _whole(value: Any, name: str) -> int:
    """An integer as pydantic reads one (a bool or a fraction is refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{name}={value!r} is not an integer")
    number = float(value)
    if not number.is_integer():
        raise ValueError(f"{name}={value!r} is not an integer")
    return int(number)


def _boolean(value: Any, name: str) -> bool:
    """A boolean as pydantic reads one: true/false, yes/no, on/off, 1/0 (a quoted 'false' is False)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1", "y", "t"):
        return True
    if text in ("false", "no", "off", "0", "n", "f"):
        return False
    raise ValueError(f"{name}={value!r} is not a boolean")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """[n, bytes] uint8 → [n, count] int64: `count` integers of `bits` bits, most significant first."""
    stream = np.unpackbits(np.asarray(packed, dtype=np.uint8), axis=-1)[:, : count * bits]
    if stream.shape[1] != count * bits:
        raise ValueError(f"{packed.shape[1]} bytes hold fewer than {count} values of {bits} bits")
    weights = 1 << np.arange(bits - 1, -1, -1, dtype=np.int64)
    return stream.reshape(len(stream), count, bits).astype(np.int64) @ weights


def import_distillkit(job: capture.CaptureJob, source_path: str, progress: bool = True) -> ImportResult:
    """Read a DistillKit capture folder into a prior set over the job's data rows, matching each data
    row to the capture row with its token ids (DistillKit shuffles rows and appends a pad token)."""
    folder = Path(source_path)
    if not folder.is_dir():
        raise PriorError(
            f"{folder} is not a folder; pass the DistillKit capture folder (compression_config.yaml, *.parquet)"
        )
    plan = capture.plan(job)
    codec = DistillKitCodec.from_yaml(folder / "compression_config.yaml")
    files = sorted(f for f in folder.glob("*.parquet") if f.is_file())
    if not files:
        raise PriorError(f"{folder} holds no .parquet shards (DistillKit writes data_N.parquet)")
    tokenizer = load_tokenizer(plan.prior_model, job.model.trust_remote_code)
    vocab = len(tokenizer)
    if job.priors.k > codec.k:
        raise PriorError(f"the capture stores k={codec.k}, fewer than priors.k={job.priors.k}; lower priors.k")
    if codec.d < vocab:
        raise PriorError(f"the capture's vocabulary size d={codec.d} is below the prior model's {vocab}")
    columns = ["input_ids", "compressed_logprobs", "bytepacked_indices"]
    try:
        tables = [pq.read_table(f, columns=columns) for f in files]
    except (OSError, pa.ArrowInvalid, KeyError) as e:
        raise PriorError(f"{folder}: not DistillKit shards with columns {columns} ({e})") from None
    # where each capture row's ids are: by their bytes, with and without the trailing pad token
    found: dict[bytes, tuple[int, int]] = {}
    by_start: dict[bytes, tuple[int, int]] = {}
    for f, table in enumerate(tables):
        for r, ids in enumerate(table.column("input_ids").to_pylist()):
            full = np.asarray(ids, dtype=np.int64)
            for variant in (full, full[:-1]):
                found.setdefault(variant.tobytes(), (f, r))
            by_start.setdefault(full[:4].tobytes(), (f, r))
    engine = {"name": "import", "format": "distillkit", "codec": dataclasses.asdict(codec), "versions": {}}

    def aligned() -> Iterator[PriorRecord]:
        for example in plan.prepared.examples:
            ids = example.input_ids.astype(np.int64)
            at = found.get(ids.tobytes())
            if at is None:
                near = by_start.get(ids[:4].tobytes())
                theirs = (
                    np.asarray(tables[near[0]].column("input_ids")[near[1]].as_py(), dtype=np.int64)
                    if near
                    else np.zeros(0, np.int64)
                )
                first = first_difference(ids.tolist(), theirs.tolist())
                raise PriorError(
                    f"row {example.index}: no row of the DistillKit capture holds this pipeline's {len(ids)} token ids "
                    f"(the nearest differs at position {first}); it was made with another tokenizer, chat template, "
                    "max_seq_len or dataset"
                )
            yield distillkit_record(example, tables[at[0]], at[1], codec, job.priors.k, vocab, files[at[0]].name)

    return _write_set(job, plan, engine, source_path, aligned(), progress, vocab, {}, lossy=True)


def distillkit_record(
    example: Example, table: pa.Table, row: int, codec: DistillKitCodec, k: int, vocab: int, file: str
) -> PriorRecord:
    """One data row's prior from capture row `row`: position t is capture position t."""
    lp_rows = table.column("compressed_logprobs")[row].as_py()
    id_rows = table.column("bytepacked_indices")[row].as_py()
    positions = scored_positions(example)
    length = len(example.input_ids)
    if len(lp_rows) != len(id_rows) or len(lp_rows) < length - 1:
        raise PriorError(
            f"row {example.index}: {file} row {row} has {len(lp_rows)} positions for {length} tokens; a damaged capture"
        )
    try:
        ids, lps = codec.decode(
            np.asarray([lp_rows[t] for t in positions], dtype=np.uint8).reshape(len(positions), -1),
            np.asarray([id_rows[t] for t in positions], dtype=np.uint8).reshape(len(positions), -1),
        )
    except ValueError as e:
        raise PriorError(
            f"row {example.index}: {file} row {row} does not decode with compression_config.yaml: {e}"
        ) from None
    if ids.max(initial=0) >= vocab:
        raise PriorError(
            f"row {example.index}: token id {int(ids.max())} is outside the prior model's vocabulary of {vocab}"
        )
    head = lps[:, : codec.exact_k]
    if (bad := head > CLAMP_TOLERANCE).any():  # stored as they were: not the curve fit's error
        raise PriorError(
            f"row {example.index}: {file} row {row} stores an exact log-prob of {float(head[bad][0]):+.4g} > 0; "
            "not a capture of log-probabilities"
        )
    # DistillKit's decoded curves are not monotone (the fit rises, and jumps where it meets the exact
    # head): sort what its `decompress_to_sparse` gives, most likely first; the store clamps
    # positive values to 0 and counts them (prior_schema.conform, lossy)
    order = np.argsort(-lps, axis=1, kind="stable")  # NaN last: the contract refuses it
    ids, lps = np.take_along_axis(ids, order, axis=1), np.take_along_axis(lps, order, axis=1).astype(np.float32)
    observed = example.input_ids[positions + 1].astype(np.int64)
    hit = ids == observed[:, None]  # over the capture's whole k: a rank beyond priors.k is still known
    rank = np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, 0).astype(np.int32)
    obs = np.where(rank > 0, lps[np.arange(len(positions)), np.maximum(rank - 1, 0)], -np.inf).astype(np.float32)
    return PriorRecord(example.index, length, positions, ids[:, :k].astype(np.int32), lps[:, :k], obs, rank)
