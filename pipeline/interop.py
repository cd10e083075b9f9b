"""Top-k logprob datasets of other tools, to and from prior sets (docs/design.md §4, "Imports").

**Axolotl's KD datasets** (the `axolotl.integrations.kd.chat_template` dataset type;
axolotl-ai-cloud/axolotl `src/axolotl/integrations/kd/chat_template.py` and the README beside it,
"Target alignment") hold per row a chat (`messages`) and, for every input token j, the teacher's
top-k as `target_token_ids[j]` and `logprobs[j]`: the distribution over `input_ids[j + 1]`; the last
row is padding. That is our alignment (§3: the prior row of position t is the distribution of token
t+1), so a scored position t reads row t. The format has no tokens: the rows are tokenised again by
whoever reads them, so an import checks the row counts against this pipeline's tokenisation (and the
ids, where an `input_ids` column is present) and refuses the first row that differs.

An imported set is an ordinary prior set (shards, manifest, γ profile), keyed by the source files'
content, the declared prior model and the tokenisation; training reads it by `train.prior_key`.
Where the observed token is outside the source's top-k its log-probability is unknown: it is stored
as −inf with rank 0, so the set's γ profile is a lower bound (Axolotl's format never stores it;
our own export adds `observed_logprob` and `observed_rank` columns, which an import reads back).
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline import data, priors
from pipeline.config import RunConfig
from pipeline.errors import PriorError
from pipeline.models import load_tokenizer
from pipeline.prior_cache import PriorStore, cache_key
from pipeline.prior_engines import PriorRecord, scored_positions
from pipeline.resolve import resolve_inputs
from pipeline.storage import atomic_dir
from pipeline.tokens import Example

log = logging.getLogger(__name__)

PADDING_LOGPROB = -1e9
"""What Axolotl's collator writes in padded slots (a large negative log-prob, never -inf)."""


@dataclass
class ImportResult:
    key: str
    manifest_path: str
    examples: int
    reused: bool


def import_axolotl(
    cfg: RunConfig,
    source_path: str,
    ids_field: str = "target_token_ids",
    logprobs_field: str = "logprobs",
    progress: bool = True,
) -> ImportResult:
    """Read an Axolotl KD dataset whose rows are `cfg`'s data rows, in order, into a prior set.

    Raises:
        PriorError: a row that does not align with this pipeline's tokenisation (one line naming it);
            nothing is left in the store then.
    """
    # --- setup: this pipeline's tokenisation of the rows, the source, the key ----------------------------
    plan = priors.plan(cfg, progress)
    source = data.open_source(source_path, "train", None, None)
    missing = sorted({ids_field, logprobs_field} - set(source.columns))
    if missing:
        raise PriorError(
            f"{source_path} has no column {', '.join(missing)} (it has {sorted(source.columns)}); "
            "name the columns with --ids-field and --logprobs-field"
        )
    optional = [c for c in ("input_ids", "observed_logprob", "observed_rank") if c in source.columns]
    key_inputs = {
        **plan.key_inputs,
        "engine": {"name": "import", "format": "axolotl", "fields": [ids_field, logprobs_field], "versions": {}},
        "source_sha256": files_sha256(source_path),
    }
    key = cache_key(key_inputs)
    store = PriorStore(cfg.storage_root)
    manifest_path = store.url(f"{store.dir(key)}/manifest.json")
    if store.complete(key):
        return ImportResult(key, manifest_path, len(plan.prepared.examples), reused=True)

    # --- loop: align each row, write a shard whenever one is full ------------------------------------------
    k, size = cfg.priors.k, cfg.priors.shard_size
    vocab = len(load_tokenizer(plan.prior_model, cfg.model.trust_remote_code))
    examples = {e.index: e for e in plan.prepared.examples}
    existed = store.fs.exists(store.dir(key))
    shard: list[PriorRecord] = []
    written = rows = 0
    bar = tqdm(total=len(examples), unit="ex", desc=f"import {key[:8]}", disable=not progress)
    try:
        store.write_key_inputs(key, key_inputs)
        for rows, row in enumerate(source.stream([ids_field, logprobs_field, *optional]), start=1):
            if cfg.data.limit is not None and rows > cfg.data.limit:
                rows -= 1
                break
            example = examples.get(rows - 1)
            if example is None:  # a row this pipeline's data policy dropped (too long, no completion, invalid)
                continue
            shard.append(axolotl_record(example, row, k, vocab, ids_field, logprobs_field))
            bar.update(1)
            if len(shard) == size:
                store.write_shard(key, written, shard, k, 0.0)
                written, shard = written + 1, []
        if rows != plan.prepared.rows:
            raise PriorError(
                f"{source_path} has {rows} rows, the data {plan.prepared.rows}: an import needs one source row "
                "per data row, in the same order"
            )
        if shard:
            store.write_shard(key, written, shard, k, 0.0)
            written += 1
        capture = {"engine": "import", "source_format": "axolotl", "data_counts": plan.prepared.counts()}
        capture["prior_role"] = "teacher" if plan.teacher else "model"
        store.finalize(key, key_inputs, written, "import", capture)
    except BaseException:
        if not existed and store.fs.exists(store.dir(key)):
            store.fs.rm(store.dir(key), recursive=True)  # an import that fails leaves nothing behind
        raise
    finally:
        bar.close()
    log.info("imported %s rows from %s into prior set %s", len(examples), source_path, key)
    return ImportResult(key, manifest_path, len(examples), reused=False)


def axolotl_record(
    example: Example, row: dict[str, Any], k: int, vocab: int, ids_field: str, logprobs_field: str
) -> PriorRecord:
    """One row's prior at this pipeline's scored positions; any misalignment raises one line."""
    where = f"row {example.index}"
    ids_rows, lp_rows = row[ids_field], row[logprobs_field]
    length = len(example.input_ids)
    if not isinstance(ids_rows, list) or not isinstance(lp_rows, list) or len(ids_rows) != len(lp_rows):
        raise PriorError(f"{where}: {ids_field} and {logprobs_field} must be lists of the same length")
    if len(ids_rows) != length:
        raise PriorError(
            f"{where}: the source has {len(ids_rows)} positions, this pipeline's tokenisation {length} tokens "
            f"(first unmatched position {min(len(ids_rows), length)}); the source was made with another "
            "tokenizer, chat template or length policy"
        )
    if row.get("input_ids") is not None:
        theirs = np.asarray(row["input_ids"], dtype=np.int64)
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
        ids, lps = np.asarray(ids_rows[t], dtype=np.int64), np.asarray(lp_rows[t], dtype=np.float64)
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
        order = np.argsort(-lps, kind="stable")
        top_ids[i], top_lp[i] = ids[order[:k]], lps[order[:k]]
        observed = int(example.input_ids[t + 1])
        if observed_lp is not None and observed_lp[t] is not None:
            obs_lp[i], obs_rank[i] = observed_lp[t], observed_rank[t] if observed_rank is not None else 0
        elif observed in ids:
            at = int(np.nonzero(ids[order] == observed)[0][0])
            obs_lp[i], obs_rank[i] = lps[order[at]], at + 1
    return PriorRecord(example.index, length, positions, top_ids, top_lp, obs_lp, obs_rank)


def export_axolotl(cfg: RunConfig, key: str, out: Path, progress: bool = True) -> Path:
    """Write prior set `key` with `cfg`'s data rows as an Axolotl KD dataset: `out/train.parquet`
    (the folder appears whole or not at all).

    Every input token j gets a row: the prior's top-k at scored positions, and empty lists elsewhere
    (Axolotl masks those by their labels). `input_ids`, `observed_logprob` and `observed_rank` are
    extra columns Axolotl ignores and our import checks and reads back.
    """
    if out.exists():
        raise PriorError(f"{out} exists; export into a new folder")
    plan = priors.plan(cfg, progress)
    reader = PriorStore(cfg.storage_root).open(key)
    recorded = reader.manifest["key_inputs"]
    if recorded["dataset_fingerprint"] != plan.prepared.fingerprint:
        raise PriorError(f"prior set {key} was not made from this config's data ({cfg.data.path}); pass its config")
    records = reader.load_all()
    examples = {e.index: e for e in plan.prepared.examples}
    data_path = resolve_inputs(cfg, progress=False).data_path
    source = data.open_source(data_path, cfg.data.split, cfg.data.subset, cfg.data.data_files)
    fmt = plan.prepared.format
    names = ("messages", "input_ids", "target_token_ids", "logprobs", "observed_logprob", "observed_rank")
    rows: dict[str, list[Any]] = {name: [] for name in names}
    stream = source.stream(data.needed_columns(fmt, cfg.data.columns))
    for index, row in enumerate(tqdm(stream, "export", unit="row", disable=not progress)):
        record = records.get(index)
        if record is None:
            continue
        length = record.num_tokens
        ids: list[list[int]] = [[] for _ in range(length)]
        lps: list[list[float]] = [[] for _ in range(length)]
        obs: list[float | None] = [None] * length
        ranks: list[int | None] = [None] * length
        for i, t in enumerate(record.positions.tolist()):
            ids[t] = record.topk_ids[i].tolist()
            lps[t] = [x if math.isfinite(x) else PADDING_LOGPROB for x in record.topk_logprobs[i].tolist()]
            obs[t] = float(record.obs_logprob[i]) if np.isfinite(record.obs_logprob[i]) else None
            ranks[t] = int(record.obs_rank[i])
        for name, value in zip(
            names,
            (data.to_messages(row, fmt, cfg.data), examples[index].input_ids.tolist(), ids, lps, obs, ranks),
            strict=True,
        ):
            rows[name].append(value)
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pydict(rows), buffer, compression="zstd")
    try:
        with atomic_dir(out) as folder:
            (folder / "train.parquet").write_bytes(buffer.getvalue())
    except FileExistsError:
        raise PriorError(f"{out} exists; export into a new folder") from None
    return out / "train.parquet"


def files_sha256(path: str) -> str:
    """sha256 over a file, or over every file under a folder (names and contents, sorted)."""
    digest = hashlib.sha256()
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file() and ".cache" not in p.parts) if root.is_dir() else [root]
    for file in files:
        digest.update(os.fsencode(file.relative_to(root) if root.is_dir() else file.name) + b"\0")
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()
