"""SFT data: load rows, validate them, render with the chat template, tokenise, mask.

The label mask covers assistant tokens only (every assistant turn, its end-of-turn marker
included), found from character offsets: each assistant turn's span is the difference between
the template rendered up to that turn (with the generation prompt) and rendered through it.

Labels follow the Hugging Face convention: `labels[t] = input_ids[t]` on completion tokens and
-100 elsewhere; the model predicts token t+1 at position t, so the *scored positions* are the t
with `labels[t + 1] != -100`.
"""

from __future__ import annotations

import codecs
import dataclasses
import glob
import hashlib
import itertools
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from pipeline.common.errors import DataError
from pipeline.common.storage import fast_hash_file, sha256_json
from pipeline.data import tokens
from pipeline.data.config import DataConfig
from pipeline.data.render import Renderer, check_template_time, render_chat
from pipeline.data.tokens import (
    IGNORE,
    Example,  # re-exported: data.Example is how stages name it
)

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
TOKENIZE_BATCH = 64
"""Rows read, rendered and tokenised together (one call of the Rust tokenizer); two batches are held
at a time (one tokenising while the next renders), so a batch stays small."""
CANONICAL_COLUMNS = ("messages", "prompt", "completion", "question", "answer", "conversations")


@dataclass
class PreparedData:
    """Tokenised examples plus what happened on the way."""

    examples: list[Example]
    fingerprint: str
    """Content hash of exactly what training sees (ids, masks, tokenizer, template, policy)."""
    tokenizer_hash: str
    format: str
    rows: int
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_completion: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)
    """(row index, reason) of malformed rows left out because `skip_invalid` was set."""

    def counts(self) -> dict[str, int]:
        """What the rows came to: kept, truncated, dropped and skipped (for run.json and manifests)."""
        return {
            "rows": self.rows,
            "examples": len(self.examples),
            "truncated": self.truncated,
            "dropped_too_long": self.dropped_too_long,
            "dropped_no_completion": self.dropped_no_completion,
            "skipped_invalid": len(self.skipped),
        }


DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
BUILDERS = set(DATA_SUFFIXES.values())
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


@dataclass
class Source:
    """A dataset opened for reading: its column names now, its rows (only the needed columns) later."""

    where: str
    columns: list[str]
    stream: Callable[[list[str] | None], Iterator[Any]]
    """`stream(columns)`: the rows one by one, restricted to `columns` (None: all); a `datasets`
    source reads them a batch at a time, so the whole set is never held as Python objects."""

    def read(self, columns: list[str] | None) -> list[Any]:
        """Every row, restricted to `columns` (None: all)."""
        return list(self.stream(columns))


def open_source(
    path: str | Path, split: str | None = "train", subset: str | None = None, data_files: Any = None
) -> Source:
    """Open the rows at `path` (see `DataConfig.path` for every accepted form).

    Raises:
        DataError: missing path, unreadable file, unknown split or subset, offline Hub name.
    """
    text = str(path)
    local = Path(text)
    if local.is_file() and data_files is None:
        if local.suffix.lower() == ".jsonl":
            return _jsonl_source(local)
        rows = _read_file(local)
        return Source(text, list(rows[0]) if rows else [], lambda cols: iter(_only(rows, cols)))
    if local.is_dir() and any((local / name).exists() for name in ("dataset_info.json", "dataset_dict.json")):
        return _from_disk(local, split)
    if local.is_dir() or data_files is not None:
        return _load_dataset(text, split, subset, data_files)
    if glob.has_magic(text):
        builder = DATA_SUFFIXES.get(Path(text).suffix.lower())
        if builder is None or not glob.glob(text):
            raise DataError(f"no data files match {text} (a glob must end in one of {sorted(DATA_SUFFIXES)})")
        return _load_dataset(builder, "train", None, text)
    if HUB_NAME.fullmatch(text) and Path(text).suffix.lower() not in DATA_SUFFIXES:
        if _hub_offline():
            raise DataError(
                f"{text!r} is not a local path, and the Hub is offline (HF_HUB_OFFLINE); download it first "
                f"(`huggingface-cli download --repo-type dataset {text} --local-dir /data/NAME`) and set "
                "data.path to that folder"
            )
        return _load_dataset(text, split, subset, data_files)
    raise DataError(
        f"dataset not found: {text} (set data.path to a data file, a folder, a glob, a save_to_disk folder "
        "or a Hub name)"
    )


def load_rows(path: str | Path, split: str | None = "train", subset: str | None = None) -> list[dict[str, Any]]:
    """Every row at `path` with every column."""
    return open_source(path, split, subset).read(None)


def _only(rows: list[dict[str, Any]], columns: list[str] | None) -> list[dict[str, Any]]:
    if columns is None:
        return rows
    return [{k: row[k] for k in columns if k in row} if isinstance(row, dict) else row for row in rows]


def _jsonl_source(path: Path) -> Source:
    """A JSONL file read a line at a time: tokenising takes the rows a batch at a time, so the file
    is never held whole, as text or as Python objects (docs/benchmarks.md "Data preparation"). Our own reader,
    not Arrow's: its errors name the line, and pyarrow's JSON parser crashes the process on a row
    nested 100,000 deep."""
    _check_utf8(path)

    def rows() -> Iterator[Any]:
        with open(path, "rb") as fh:
            for i, raw in enumerate(fh):  # split on "\n" only, as _read_file does
                if raw.strip():
                    yield _parse_json(raw.decode("utf-8"), f"{path} line {i + 1}")

    first = next(rows(), None)
    columns = list(first) if isinstance(first, dict) else []
    return Source(str(path), columns, lambda cols: (_only([row], cols)[0] for row in rows()))


NEWLINE = b"\n"


def _check_utf8(path: Path, chunk: int = 1 << 24) -> None:
    """Refuse a file that is not UTF-8, naming the line, without holding it (Arrow would only fail
    later, on the row that holds the bad byte)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                at = max(e.start, 0)
                where = line + block[:at].count(NEWLINE)
                raise DataError(
                    f"{path} line {where} is not valid UTF-8 (byte {offset + at}); re-encode the file as UTF-8"
                ) from None
            if not block:
                return
            line += block.count(NEWLINE)
            offset += len(block)


def _read_file(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        text = _read_utf8(path)
        if suffix == ".json":
            data = _parse_json(text, f"{path}")
            if not isinstance(data, list):
                raise DataError(f"{path} must hold a JSON list of rows")
            return data
        # split on "\n" only: str.splitlines() would also split inside strings at U+2028 and friends
        return [_parse_json(line, f"{path} line {i + 1}") for i, line in enumerate(text.split("\n")) if line.strip()]
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path} is not a readable Parquet file: {str(e).splitlines()[0]}") from None
    if suffix in DATA_SUFFIXES:  # csv, arrow
        return _load_dataset(DATA_SUFFIXES[suffix], "train", None, str(path)).read(None)
    raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {sorted(DATA_SUFFIXES)} or a folder")


def _from_disk(path: Path, split: str | None) -> Source:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"{path} is not a `save_to_disk` dataset folder: {str(e).splitlines()[0]}") from None
    if isinstance(loaded, datasets.DatasetDict):
        loaded = _pick_split(loaded, split, str(path))
    return _dataset_source(str(path), loaded)


def _load_dataset(path: str, split: str | None, subset: str | None, data_files: Any) -> Source:
    """`datasets.load_dataset` on a local folder (README configs or data files), a builder with data
    files, or a Hub name; every failure becomes one DataError."""
    import datasets

    try:
        if Path(path).is_dir() and data_files is None:
            _check_files_inside(path, datasets.load_dataset_builder(path, name=subset).config.data_files)
        # a builder name (json, csv, ...) is keyed by the files it reads, or datasets' own key (their
        # mtimes) would serve an edit that kept the size and the timestamp from the old Arrow cache
        source = data_files if path in BUILDERS and isinstance(data_files, str) else path
        loaded = datasets.load_dataset(path, name=subset, data_files=data_files, cache_dir=_cache_dir(source))
    except DataError:
        raise
    except Exception as e:  # datasets raises many kinds (ValueError, FileNotFoundError, DatasetNotFoundError, ...)
        message = (str(e).splitlines() or [""])[0]
        if isinstance(e, StopIteration) or not message:  # datasets' own message for an empty file is empty
            raise DataError(f"cannot load the dataset {path}: it holds no rows (an empty data file?)") from None
        raise DataError(f"cannot load the dataset {path}: {type(e).__name__}: {message}") from None
    return _dataset_source(path, _pick_split(loaded, split, path))


def _check_files_inside(folder: str, data_files: Any) -> None:
    """A downloaded folder's README may name `../../secret.jsonl` or `/etc/...` in its `data_files`;
    `datasets` would read them. Only files inside the folder are data of that folder."""
    base = os.path.realpath(folder)
    for files in (data_files or {}).values():
        for name in files:
            if os.path.commonpath([base, os.path.realpath(name)]) != base:
                raise DataError(
                    f"the README of {folder} names data file {name!r}, outside the dataset folder; only files "
                    "inside it are read (fix its `data_files`, or point data.path at that file)"
                )


def _cache_dir(path: str) -> str | None:
    """A datasets cache folder per local source and its files' (name, size, content hash).

    `datasets` keys the Arrow cache of a local folder by its README's relative data-file patterns,
    so two folders laid out alike (two Hub snapshots, say) would share a cache and one would be read
    as the other. Keyed by the absolute path and the files' contents, a changed file gets a new cache.
    """
    import datasets

    stamps = _file_stamps(path)
    if stamps is None:
        return None  # a Hub name: the default cache is keyed by its revision
    return str(
        Path(datasets.config.HF_DATASETS_CACHE) / "target-sft" / sha256_json([os.path.abspath(path), stamps])[:20]
    )


def _file_stamps(path: str) -> list[tuple[str, int, str]] | None:
    """(absolute name, size, content hash) of every file a local source reads; None for a Hub name.

    Content, not mtime: an edit of the same length with its timestamp restored (`touch -r`) must
    not serve the old tokens."""
    local = Path(path)
    if local.is_dir():
        files = sorted(p for p in local.rglob("*") if p.is_file() and ".cache" not in p.parts)
    elif glob.has_magic(path):
        files = sorted(Path(p) for p in glob.glob(path))
    elif local.is_file():
        files = [local]
    else:
        return None
    return [(str(p.resolve()), p.stat().st_size, fast_hash_file(p)) for p in files]


def _pick_split(loaded: Any, split: str | None, where: str) -> Any:
    if split in loaded:
        return loaded[split]
    if split is None and len(loaded) == 1:
        return next(iter(loaded.values()))
    raise DataError(f"{where} has splits {sorted(loaded)}, not {split!r}; set data.split (or the eval set's split)")


def _dataset_source(where: str, dataset: Any) -> Source:
    def stream(columns: list[str] | None) -> Iterator[dict[str, Any]]:
        keep = dataset if columns is None else dataset.select_columns([c for c in columns if c in dataset.column_names])
        try:
            for batch in keep.iter(batch_size=TOKENIZE_BATCH):
                yield from (dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True))
        except UnicodeDecodeError:  # Arrow keeps a Latin-1 file's bytes as they are, until they are read
            raise DataError(f"{where} holds text that is not valid UTF-8; re-save it as UTF-8") from None

    return Source(where, list(dataset.column_names), stream)


def _hub_offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def _read_utf8(path: Path) -> str:
    _check_utf8(path)  # names the line of a bad byte
    return path.read_text(encoding="utf-8")


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where} is not valid JSON: {e}") from None
    except RecursionError:
        raise DataError(f"{where} nests arrays or objects too deeply to be a training row") from None


ROLE_NAMES = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant", "system": "system"}
FORMAT_COLUMNS = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "question_answer": ("question", "answer"),
    "conversations": ("conversations",),
}


def detect_format(column_names: list[str], columns: dict[str, str]) -> str:
    """`messages`, `prompt_completion`, `question_answer` or `conversations`, from the column names."""
    unknown = set(columns) - set(CANONICAL_COLUMNS)
    if unknown:
        raise DataError(f"data.columns has unknown names {sorted(unknown)}; use {list(CANONICAL_COLUMNS)}")
    for fmt, needed in FORMAT_COLUMNS.items():
        if all(columns.get(name, name) in column_names for name in needed):
            return fmt
    raise DataError(
        f"cannot detect the format from the columns {sorted(column_names)}; expected `messages`, "
        "`prompt`+`completion`, `question`+`answer` or `conversations` (map other names with data.columns)"
    )


def needed_columns(fmt: str, columns: dict[str, str]) -> list[str]:
    """The dataset columns a format reads (nothing else is loaded)."""
    return [columns.get(name, name) for name in FORMAT_COLUMNS[fmt]]


def to_messages(row: Any, fmt: str, cfg: DataConfig) -> list[dict[str, str]]:
    """Validate one row and return it as a chat. Raises DataError with the reason."""
    if not isinstance(row, dict):
        raise DataError(f"row is a {type(row).__name__}, not a mapping")

    def get(name: str) -> Any:
        column = cfg.columns.get(name, name)
        if column not in row or row[column] is None:
            raise DataError(f"missing field {column!r}")
        return row[column]

    if fmt in ("messages", "conversations"):
        messages = get(fmt)
        if not isinstance(messages, list) or not messages:
            raise DataError(f"`{fmt}` must be a non-empty list")
        if fmt == "conversations":
            messages = [_turn(m, i, cfg) for i, m in enumerate(messages)]
    else:
        first, second = ("prompt", "completion") if fmt == "prompt_completion" else ("question", "answer")
        prompt, completion = get(first), get(second)
        if fmt == "question_answer" and isinstance(completion, (int, float)) and not isinstance(completion, bool):
            completion = str(completion)
        if isinstance(prompt, list) or isinstance(completion, list):  # TRL's conversational prompt/completion
            if not (isinstance(prompt, list) and isinstance(completion, list)):
                raise DataError("prompt and completion must both be strings or both be message lists")
            messages = [*prompt, *completion]
        else:
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    _check_chat(messages)
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _turn(message: Any, i: int, cfg: DataConfig) -> dict[str, Any]:
    """A ShareGPT turn ({from, value}) as {role, content}, through data.message_keys and data.roles."""
    role_key, content_key = cfg.message_keys.get("role", "from"), cfg.message_keys.get("content", "value")
    if not isinstance(message, dict) or role_key not in message or content_key not in message:
        raise DataError(f"turn {i} must be a mapping with {role_key!r} and {content_key!r} (see data.message_keys)")
    names = {**ROLE_NAMES, **cfg.roles}
    if message[role_key] not in names:
        raise DataError(f"turn {i} has role {message[role_key]!r}; map it with data.roles (e.g. {{name: user}})")
    return {"role": names[message[role_key]], "content": message[content_key]}


def _check_chat(messages: list[Any]) -> None:
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"message {i} must be a mapping with `role` and `content`")
        if message["role"] not in ROLES:
            raise DataError(f"message {i} has unknown role {message['role']!r}; expected one of {ROLES}")
        if not isinstance(message["content"], str):
            raise DataError(f"message {i} has non-string content ({type(message['content']).__name__})")
    roles = [m["role"] for m in messages]
    turns = roles[1:] if roles[0] == "system" else roles
    expected = ["user", "assistant"] * (len(turns) // 2 + 1)
    if "system" in turns or not turns or turns != expected[: len(turns)] or turns[-1] != "assistant":
        raise DataError(
            f"bad role order {roles}: expected an optional system message, then user/assistant "
            "turns alternating, ending with the assistant"
        )
    for i, message in enumerate(messages):
        if message["role"] == "assistant" and not message["content"].strip():
            raise DataError(f"empty completion in message {i}")


def tokenize_chat(
    messages: list[dict[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    template_kwargs: dict[str, Any] | None = None,
    mask_template_text: bool = True,
) -> tuple[list[int], list[int]]:
    """Render with the chat template; return input_ids and labels (assistant tokens only)."""
    text, spans = render_chat(messages, tokenizer, template_kwargs or {}, mask_template_text)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    completion = _completion_mask(enc["offset_mapping"], spans)
    ids = list(enc["input_ids"])
    return ids, [t if c else IGNORE for t, c in zip(ids, completion.tolist(), strict=True)]


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str], spans: list[list[tuple[int, int]]]) -> Iterator[
    tuple[np.ndarray, np.ndarray]
]:  # fmt: skip
    """(input ids, completion mask) per text, tokenised as one batch by the Rust tokenizer.

    A fast tokenizer's backend is called directly: transformers' wrapper turns every token's ids and
    character offsets into Python lists and dicts, which cost as much as tokenising, while the mask
    needs only where each span's first and last tokens are (`_span_mask`, a binary search). A
    tokenizer without a Rust backend, or one whose backend pads or truncates, takes the wrapper."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or backend.truncation is not None or backend.padding is not None:
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        for ids, offsets, where in zip(enc["input_ids"], enc["offset_mapping"], spans, strict=True):
            yield np.asarray(ids, dtype=np.int32), _completion_mask(offsets, where)
        return
    for encoding, where in zip(backend.encode_batch(texts, add_special_tokens=False), spans, strict=True):
        ids = np.array(encoding.ids, dtype=np.int32)
        yield ids, _span_mask(encoding, len(ids), where)


def _span_mask(encoding: Any, n: int, spans: list[tuple[int, int]]) -> np.ndarray:
    """`_completion_mask` from a Rust `Encoding`: tokens start at non-decreasing characters, so the
    tokens whose first character lies in [lo, hi) are one run, found by two binary searches."""

    def first_at_or_after(char: int) -> int:
        lo, hi = 0, n
        while lo < hi:
            mid = (lo + hi) // 2
            if encoding.token_to_chars(mid)[0] < char:
                lo = mid + 1
            else:
                hi = mid
        return lo

    mask = np.zeros(n, dtype=bool)
    try:
        for lo, hi in spans:
            mask[first_at_or_after(lo) : first_at_or_after(hi)] = True
    except TypeError:  # a token without characters (token_to_chars gives None): test every token
        return _completion_mask(encoding.offsets, spans)
    return mask


def _completion_mask(offsets: Any, spans: list[tuple[int, int]]) -> np.ndarray:
    """True for each token whose first character lies in a completion span."""
    starts = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)[:, 0]
    mask = np.zeros(len(starts), dtype=bool)
    for lo, hi in spans:
        mask |= (starts >= lo) & (starts < hi)
    return mask


def chat_template_text(template: str) -> str:
    """`data.chat_template`: a Jinja string, or the path of a `.jinja` file."""
    if template.endswith(".jinja") and "{" not in template:
        try:
            return Path(template).read_text(encoding="utf-8")
        except OSError as e:
            raise DataError(f"cannot read data.chat_template {template}: {e.strerror}") from None
    return template


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of the tokenizer's vocabulary, merges, normalisation and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DataError("a fast (Rust) tokenizer is required; load it with use_fast=True")
    blob = backend.to_str() + json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def prepare(
    cfg: DataConfig, data_path: str | Path, tokenizer: PreTrainedTokenizerBase, cache: Path | None = None
) -> PreparedData:
    """Load, validate, tokenise, mask and fingerprint a dataset.

    With `cache` (the `tokens/` folder under the storage root), the result is read from
    `cache/<key>/` when this source, tokenizer and these settings were tokenised before, and
    written there otherwise (`pipeline.data.tokens`); a Hub name is not cached (its files are not local).

    Raises:
        DataError: A malformed row (with its index and reason) unless `cfg.skip_invalid`.
    """
    if cfg.chat_template is not None:
        tokenizer.chat_template = chat_template_text(cfg.chat_template)
    if tokenizer.chat_template is None:
        raise DataError("the tokenizer has no chat template; set data.chat_template (a string or a .jinja file)")
    tok_hash = tokenizer_hash(tokenizer)  # serialises the whole tokenizer: once per call
    stamps = _file_stamps(str(data_path))
    if cache is None or stamps is None:
        return _tokenize(cfg, data_path, tokenizer, tok_hash)
    folder = cache / token_key(cfg, data_path, tokenizer, tok_hash, stamps)

    def build(keep: Callable[[tokens.Example], None]) -> dict[str, Any]:
        prepared = _tokenize(cfg, data_path, tokenizer, tok_hash, keep)
        return {f.name: getattr(prepared, f.name) for f in dataclasses.fields(prepared) if f.name != "examples"}

    meta, examples = tokens.cached(folder, build, tokens.Limits(cfg.max_length, len(tokenizer)))
    meta["skipped"] = [tuple(pair) for pair in meta["skipped"]]
    prepared = PreparedData(examples=examples, **meta)
    log.info("data %s: %s (tokens from %s)", data_path, prepared.counts(), folder)
    return prepared


def token_key(
    cfg: DataConfig, data_path: str | Path, tokenizer: PreTrainedTokenizerBase, tok_hash: str, stamps: Any
) -> str:
    """What the tokenised examples depend on: the source files, the tokenizer and its template, every
    data setting that changes a token or a mask, and the tokenisation code's versions."""
    import tokenizers
    import transformers

    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("path", "eval_path", "chat_template")}
    return sha256_json(
        {
            "format_version": tokens.FORMAT_VERSION,
            "source": [os.path.abspath(data_path), stamps],
            "tokenizer": tok_hash,
            "template": tokenizer.chat_template,
            "settings": settings,
            "versions": [transformers.__version__, tokenizers.__version__],
        }
    )[:20]


def _tokenize(
    cfg: DataConfig,
    data_path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    tok_hash: str,
    keep: Callable[[tokens.Example], None] | None = None,
) -> PreparedData:
    """Read the rows, render them, tokenise them in batches (the Rust tokenizer runs on every core).

    Each example goes to `keep` (the cache's writer) as it is made, or into the result's examples."""
    source = open_source(data_path, cfg.split, cfg.subset, cfg.data_files)
    if not source.columns:
        raise DataError(f"{data_path} holds no rows")
    fmt = cfg.format if cfg.format != "auto" else detect_format(source.columns, cfg.columns)
    rows = enumerate(itertools.islice(source.stream(needed_columns(fmt, cfg.columns)), cfg.limit))
    digest = hashlib.sha256()
    for part in (tok_hash, tokenizer.chat_template, fmt, str(cfg.max_length), cfg.truncation):
        digest.update(part.encode() + b"\0")
    if cfg.chat_template_kwargs:  # only when set, so that existing fingerprints (and prior keys) stay
        digest.update(json.dumps(cfg.chat_template_kwargs, sort_keys=True).encode() + b"\0")
    out = PreparedData(examples=[], fingerprint="", tokenizer_hash=tok_hash, format=fmt, rows=0)
    kept = 0

    def counted(example: tokens.Example) -> None:
        nonlocal kept
        kept += 1
        (keep or out.examples.append)(example)

    def encode(rendered: list[tuple[int, str, list[tuple[int, int]]]]) -> list[tuple[np.ndarray, np.ndarray]]:
        return list(_encode(tokenizer, [text for _, text, _ in rendered], [spans for _, _, spans in rendered]))

    render = Renderer(tokenizer, cfg.chat_template_kwargs, cfg.mask_template_text)  # once per row where it can
    # The Rust tokenizer lets go of the GIL: a batch is tokenised in a thread while the next is rendered.
    with ThreadPoolExecutor(max_workers=1) as tokenizing:
        pending: list[tuple[list[Any], Future[list[tuple[np.ndarray, np.ndarray]]]]] = []
        while batch := list(itertools.islice(rows, TOKENIZE_BATCH)):  # a batch at a time: few rows held
            out.rows += len(batch)
            if out.rows == len(batch):  # the first batch: one row under a timer, before the template runs on all
                probe = PreparedData(examples=[], fingerprint="", tokenizer_hash=tok_hash, format=fmt, rows=0)
                first = batch[:1]
                check_template_time(lambda: _render_rows(first, fmt, cfg, render, probe))  # noqa: B023 (called at once)
            rendered = _render_rows(batch, fmt, cfg, render, out)
            pending.append((rendered, tokenizing.submit(encode, rendered)))
            if len(pending) > 1:
                _keep_batch(out, cfg, digest, *pending.pop(0), counted)
        for done in pending:
            _keep_batch(out, cfg, digest, *done, counted)
    if not kept:
        raise DataError(
            f"no examples left in {data_path} ({out.rows} rows: {out.dropped_too_long} too long, "
            f"{out.dropped_no_completion} without completion tokens, {len(out.skipped)} invalid); "
            "raise data.max_length, use data.truncation=truncate, or fix the data"
        )
    out.fingerprint = digest.hexdigest()
    log.info("data %s: tokenised %s", data_path, out.counts())
    return out


def _keep_batch(
    out: PreparedData,
    cfg: DataConfig,
    digest: Any,
    rendered: list[tuple[int, str, list[tuple[int, int]]]],
    encoded: Future[list[tuple[np.ndarray, np.ndarray]]],
    keep: Callable[[tokens.Example], None],
) -> None:
    """One batch's examples, in row order, once its tokenisation is done."""
    for (index, _, _), (ids, completion) in zip(rendered, encoded.result(), strict=True):
        _keep(out, cfg, digest, index, ids, completion, keep)


def _render_rows(
    rows: list[tuple[int, Any]], fmt: str, cfg: DataConfig, render: Renderer, out: PreparedData
) -> list[tuple[int, str, list[tuple[int, int]]]]:
    """(row index, text, completion spans) for one batch of rows; malformed rows stop or are skipped."""
    rendered = []
    for index, row in rows:
        try:
            messages = to_messages(row, fmt, cfg)
            text, spans = render(messages)
        except DataError as e:
            if not cfg.skip_invalid:
                raise DataError(f"row {index}: {e} (set data.skip_invalid=true to skip and report bad rows)") from e
            out.skipped.append((index, str(e)))
            continue
        rendered.append((index, text, spans))
    return rendered


def _keep(
    out: PreparedData,
    cfg: DataConfig,
    digest: Any,
    index: int,
    ids: np.ndarray,
    completion: np.ndarray,
    keep: Callable[[tokens.Example], None],
) -> None:
    """Apply the length policy, then add the example to `out` and to the fingerprint."""
    if len(ids) > cfg.max_length:
        if cfg.truncation == "drop":
            out.dropped_too_long += 1
            return
        ids, completion = ids[: cfg.max_length], completion[: cfg.max_length]
        out.truncated += 1
    example = tokens.Example(index, ids, completion)
    if example.num_scored == 0:
        out.dropped_no_completion += 1
        return
    keep(example)
    digest.update(np.asarray([index, len(ids)], dtype=np.int64).tobytes())
    digest.update(ids.astype(np.int64).tobytes())
    digest.update(example.labels.tobytes())


def summary(data: PreparedData) -> dict[str, Any]:
    """Counts and length statistics, as printed by `target-sft data inspect`."""
    lengths = np.array([len(e.input_ids) for e in data.examples])
    scored = sum(e.num_scored for e in data.examples)
    total = int(lengths.sum())
    return {
        "format": data.format,
        "rows": data.rows,
        "examples": len(data.examples),
        "skipped_invalid": len(data.skipped),
        "truncated": data.truncated,
        "dropped_too_long": data.dropped_too_long,
        "dropped_no_completion": data.dropped_no_completion,
        "tokens": total,
        "completion_tokens": scored,
        "prompt_tokens": total - scored,
        "length_min": int(lengths.min()),
        "length_mean": round(float(lengths.mean()), 1),
        "length_max": int(lengths.max()),
        "fingerprint": data.fingerprint,
    }


def highlight(example: Example, tokenizer: PreTrainedTokenizerBase, color: bool) -> str:
    """The example's text with completion tokens highlighted (ANSI green, or ⟦…⟧ brackets)."""
    parts: list[tuple[bool, str]] = []
    current: bool | None = None
    run: list[int] = []
    for token, is_completion in zip(example.input_ids.tolist(), example.completion.tolist(), strict=True):
        if current is not None and is_completion != current:
            parts.append((current, str(tokenizer.decode(run))))
            run = []
        current = is_completion
        run.append(token)
    if run:
        parts.append((bool(current), str(tokenizer.decode(run))))
    open_, close = ("\033[32m", "\033[0m") if color else ("⟦", "⟧")
    return "".join(f"{open_}{text}{close}" if completion else text for completion, text in parts)
