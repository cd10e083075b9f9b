"""SFT data: load rows, validate them, render with the chat template, tokenise, mask.

The label mask covers assistant tokens only (every assistant turn, its end-of-turn marker
included), found from character offsets: each assistant turn's span is the difference between
the template rendered up to that turn (with the generation prompt) and rendered through it.

Labels follow the Hugging Face convention: `labels[t] = input_ids[t]` on completion tokens and
-100 elsewhere; the model predicts token t+1 at position t, so the *scored positions* are the t
with `labels[t + 1] != -100`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from pipeline.config import DataConfig

IGNORE = -100
ROLES = ("system", "user", "assistant")
CANONICAL_COLUMNS = ("messages", "prompt", "completion", "question", "answer")


class DataError(ValueError):
    """A dataset or row is unusable; the message says which and why."""


@dataclass
class Example:
    """One tokenised example."""

    index: int
    """Row index in the source file (stable for error messages and shards)."""
    input_ids: list[int]
    """Token ids of the whole rendered conversation."""
    labels: list[int]
    """input_ids on completion tokens, -100 elsewhere."""

    @property
    def num_scored(self) -> int:
        """Completion tokens that some earlier position predicts (the first token never is)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE)


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


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """Read rows from .jsonl, .json, .parquet or a `datasets.save_to_disk` folder."""
    path = Path(path)
    if not path.exists():
        raise DataError(
            f"dataset not found: {path} (set data.path to a .jsonl/.json/.parquet file or a save_to_disk folder)"
        )
    if path.is_dir():
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise DataError(f"{path} holds splits {list(loaded)}; point data.path at one split folder")
            loaded = loaded["train"]
        return loaded.to_list()
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for i, line in enumerate(path.read_text().splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path} line {i + 1} is not valid JSON: {e}") from e
        return rows
    if suffix == ".json":
        data = json.loads(path.read_text())
        if not isinstance(data, list):
            raise DataError(f"{path} must hold a JSON list of rows")
        return data
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .parquet or a save_to_disk folder")


def detect_format(row: dict[str, Any], columns: dict[str, str]) -> str:
    """`messages`, `prompt_completion` or `question_answer`, from the first row's columns."""
    unknown = set(columns) - set(CANONICAL_COLUMNS)
    if unknown:
        raise DataError(f"data.columns has unknown names {sorted(unknown)}; use {list(CANONICAL_COLUMNS)}")

    def has(name: str) -> bool:
        return columns.get(name, name) in row

    if has("messages"):
        return "messages"
    if has("prompt") and has("completion"):
        return "prompt_completion"
    if has("question") and has("answer"):
        return "question_answer"
    raise DataError(
        f"cannot detect the format from the first row's columns {sorted(row)}; expected `messages`, "
        "`prompt`+`completion` or `question`+`answer` (map other names with data.columns)"
    )


def to_messages(row: Any, fmt: str, columns: dict[str, str]) -> list[dict[str, str]]:
    """Validate one row and return it as a chat. Raises DataError with the reason."""
    if not isinstance(row, dict):
        raise DataError(f"row is a {type(row).__name__}, not a mapping")

    def get(name: str) -> Any:
        column = columns.get(name, name)
        if column not in row or row[column] is None:
            raise DataError(f"missing field {column!r}")
        return row[column]

    if fmt == "messages":
        messages = get("messages")
        if not isinstance(messages, list) or not messages:
            raise DataError("`messages` must be a non-empty list")
    else:
        first, second = ("prompt", "completion") if fmt == "prompt_completion" else ("question", "answer")
        prompt, completion = get(first), get(second)
        if fmt == "question_answer" and isinstance(completion, (int, float)) and not isinstance(completion, bool):
            completion = str(completion)
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    _check_chat(messages)
    return [{"role": m["role"], "content": m["content"]} for m in messages]


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


def tokenize_chat(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """Render with the chat template; return input_ids and labels (assistant tokens only)."""
    text = _render(tokenizer, messages, generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise DataError(
                "the chat template is not prefix-stable (rendering a conversation's first turns "
                "is not a prefix of rendering all of it), so completion tokens cannot be located"
            )
        spans.append((len(before), len(through)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [
        token if any(lo <= start < hi for lo, hi in spans) else IGNORE
        for token, (start, _end) in zip(ids, enc["offset_mapping"], strict=True)
    ]
    return ids, labels


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    if not messages:
        return ""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    assert isinstance(text, str)
    return text


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of the tokenizer's vocabulary, merges, normalisation and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DataError("a fast (Rust) tokenizer is required; load it with use_fast=True")
    blob = backend.to_str() + json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def prepare(cfg: DataConfig, data_path: str | Path, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    """Load, validate, tokenise, mask and fingerprint a dataset.

    Raises:
        DataError: A malformed row (with its index and reason) unless `cfg.skip_invalid`.
    """
    if tokenizer.chat_template is None:
        raise DataError("the tokenizer has no chat template; set one (tokenizer.chat_template) before training")
    rows = load_rows(data_path)
    if cfg.limit is not None:
        rows = rows[: cfg.limit]
    if not rows:
        raise DataError(f"{data_path} holds no rows")
    fmt = cfg.format if cfg.format != "auto" else detect_format(rows[0], cfg.columns)
    tok_hash = tokenizer_hash(tokenizer)
    digest = hashlib.sha256()
    for part in (tok_hash, tokenizer.chat_template, fmt, str(cfg.max_length), cfg.truncation):
        digest.update(part.encode() + b"\0")
    out = PreparedData(examples=[], fingerprint="", tokenizer_hash=tok_hash, format=fmt, rows=len(rows))
    for index, row in enumerate(rows):
        try:
            ids, labels = tokenize_chat(to_messages(row, fmt, cfg.columns), tokenizer)
        except DataError as e:
            if not cfg.skip_invalid:
                raise DataError(f"row {index}: {e} (set data.skip_invalid=true to skip and report bad rows)") from e
            out.skipped.append((index, str(e)))
            continue
        if len(ids) > cfg.max_length:
            if cfg.truncation == "drop":
                out.dropped_too_long += 1
                continue
            ids, labels = ids[: cfg.max_length], labels[: cfg.max_length]
            out.truncated += 1
        example = Example(index, ids, labels)
        if example.num_scored == 0:
            out.dropped_no_completion += 1
            continue
        out.examples.append(example)
        digest.update(np.asarray([index, len(ids)], dtype=np.int64).tobytes())
        digest.update(np.asarray(ids, dtype=np.int64).tobytes())
        digest.update(np.asarray(labels, dtype=np.int64).tobytes())
    out.fingerprint = digest.hexdigest()
    return out


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
    for token, label in zip(example.input_ids, example.labels, strict=True):
        is_completion = label != IGNORE
        if current is not None and is_completion != current:
            parts.append((current, str(tokenizer.decode(run))))
            run = []
        current = is_completion
        run.append(token)
    if run:
        parts.append((bool(current), str(tokenizer.decode(run))))
    open_, close = ("\033[32m", "\033[0m") if color else ("⟦", "⟧")
    return "".join(f"{open_}{text}{close}" if completion else text for completion, text in parts)
