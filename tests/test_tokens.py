"""The tokenisation cache (pipeline/data/tokens.py): built once, memory-mapped after, safe under concurrency."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.common.config import load_config
from pipeline.data import sources, tokens
from pipeline.data.config import DataConfig
from pipeline.data.tokens import Example, pad_rows
from pipeline.entry import stages
from pipeline.entry.config import RunConfig
from tests.conftest import tiny_args


@pytest.fixture
def tokenizer(tiny_build):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_build.model)


def _tokenised(caplog) -> int:
    return sum("tokenised" in r.getMessage() for r in caplog.records)


def test_second_prepare_reads_the_cache_without_tokenising(tiny_build, tokenizer, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pipeline")
    cfg = DataConfig(max_length=128)
    fresh = sources.prepare(cfg, tiny_build.sft_train, tokenizer)  # no cache: the reference
    first = sources.prepare(cfg, tiny_build.sft_train, tokenizer, tmp_path)
    assert _tokenised(caplog) == 2
    second = sources.prepare(cfg, tiny_build.sft_train, tokenizer, tmp_path)
    assert _tokenised(caplog) == 2  # read back, not tokenised again
    assert isinstance(second.examples[0].input_ids.base, np.memmap)  # mapped, not loaded
    for prepared in (first, second):
        assert prepared.fingerprint == fresh.fingerprint and prepared.counts() == fresh.counts()
        assert [e.index for e in prepared.examples] == [e.index for e in fresh.examples]
        for a, b in zip(prepared.examples, fresh.examples, strict=True):
            assert a.input_ids.tolist() == b.input_ids.tolist() and a.labels.tolist() == b.labels.tolist()
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    stored = sum(f.stat().st_size for f in folder.iterdir())
    assert stored / sum(len(e.input_ids) for e in fresh.examples) < 10  # bytes per token on disk


def test_a_changed_setting_or_file_gets_its_own_entry(tiny_build, tokenizer, tmp_path):
    source = tmp_path / "sft.jsonl"
    source.write_bytes(Path(tiny_build.sft_train).read_bytes())
    cache = tmp_path / "tokens"
    base = sources.prepare(DataConfig(max_length=128), source, tokenizer, cache)
    shorter = sources.prepare(DataConfig(max_length=40), source, tokenizer, cache)
    assert shorter.truncated > 0 and shorter.fingerprint != base.fingerprint
    lines = source.read_text().splitlines(keepends=True)
    source.write_text("".join(lines[:10]))
    os.utime(source, ns=(time.time_ns(), time.time_ns() + 10**9))
    edited = sources.prepare(DataConfig(max_length=128), source, tokenizer, cache)
    assert len(edited.examples) == 10
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 3


def _build_with_log(folder: str, log: str) -> list[int]:
    def build(keep) -> dict:
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # long enough for every other process to reach the lock
        for i in range(5):
            keep(Example.from_labels(i, [i, i + 1, i + 2], [-100, i + 1, i + 2]))
        return {"note": "built"}

    meta, examples = tokens.cached(Path(folder), build, tokens.Limits(max_length=8, vocab_size=16))
    assert meta == {"note": "built"}
    return [int(x) for e in examples for x in e.input_ids]


def test_concurrent_builders_take_turns_and_one_builds(tmp_path):
    folder, log = tmp_path / "cache" / "key", tmp_path / "builds.log"
    with mp.get_context("spawn").Pool(4) as pool:
        results = pool.starmap(_build_with_log, [(str(folder), str(log))] * 4)
    assert len(log.read_text().split()) == 1  # one process tokenised; three waited and read
    assert all(r == results[0] for r in results) and results[0][:3] == [0, 1, 2]
    assert sorted(p.name for p in folder.parent.iterdir()) == [".key.lock", "key"]  # no temporary left


def test_capture_plan_after_capture_reads_tokens_from_the_cache(tiny_build, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pipeline")
    cfg = load_config(RunConfig, None, tiny_args(tiny_build, tmp_path))
    result = stages.capture_priors(cfg, progress=False)
    before = _tokenised(caplog)
    again = stages.plan_priors(cfg, progress=False)  # what every training process and capture worker does
    assert _tokenised(caplog) == before and again.key == result.key


@pytest.mark.parametrize("left", [False, True])
def test_pad_rows_places_tokens_and_mask(left):
    ids, mask = pad_rows([np.array([5, 6, 7], dtype=np.int32), [8]], value=0, left=left)
    expected = [[5, 6, 7], [0, 0, 8]] if left else [[5, 6, 7], [8, 0, 0]]
    assert ids.tolist() == expected and ids.dtype == torch.long
    assert mask.tolist() == [[1, 1, 1], [int(x != 0) for x in expected[1]]]


def test_an_edit_of_the_same_length_with_its_timestamp_restored_is_tokenised_again(tiny_build, tokenizer, tmp_path):
    """The cache is keyed on content: `touch -r` cannot make it serve the old tokens (issue 25)."""
    source = tmp_path / "sft.jsonl"
    text = Path(tiny_build.sft_train).read_text()
    source.write_text(text)
    stamp = source.stat()
    cache = tmp_path / "tokens"
    before = sources.prepare(DataConfig(max_length=128), source, tokenizer, cache)
    first = json.loads(text.split("\n", 1)[0])
    completion = first["messages"][-1]["content"]
    digits = str.maketrans("0123456789", "9876543210")
    edited_row = {
        **first,
        "messages": [*first["messages"][:-1], {"content": completion.translate(digits), "role": "assistant"}],
    }
    assert len(json.dumps(edited_row)) == len(json.dumps(first)) and edited_row != first
    lines = text.split("\n")
    lines[0] = json.dumps(edited_row)
    source.write_text("\n".join(lines))
    os.utime(source, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert source.stat().st_size == stamp.st_size and source.stat().st_mtime_ns == stamp.st_mtime_ns
    after = sources.prepare(DataConfig(max_length=128), source, tokenizer, cache)
    assert after.fingerprint != before.fingerprint
    assert after.examples[0].input_ids.tolist() != before.examples[0].input_ids.tolist()


def _stretch_first(offsets: np.ndarray) -> np.ndarray:
    """Example 0 runs into example 1, which keeps one token: counts stay, a length breaks the limit."""
    offsets = offsets.copy()
    offsets[1] = offsets[2] - 1
    return offsets


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "truncated input_ids.npy": lambda f: _truncate(f / "input_ids.npy"),
    "truncated meta.json": lambda f: _truncate(f / "meta.json"),
    "empty meta.json": lambda f: (f / "meta.json").write_text(""),
    "deleted index.npy": lambda f: (f / "index.npy").unlink(),
    "ids outside the vocabulary": lambda f: np.save(f / "input_ids.npy", np.load(f / "input_ids.npy") + 10**6),
    "offsets that merge examples": lambda f: np.save(
        f / "offsets.npy", np.concatenate([[0], np.load(f / "offsets.npy")[2:]])
    ),
    "an example past max_length": lambda f: np.save(f / "offsets.npy", _stretch_first(np.load(f / "offsets.npy"))),
}


@pytest.mark.parametrize("damage", list(DAMAGE), ids=list(DAMAGE))
def test_a_damaged_entry_is_rebuilt_with_one_line(tiny_build, tokenizer, tmp_path, damage, caplog):
    """A truncated, emptied, half-deleted or edited entry is treated as absent: rebuilt, said once."""
    cfg = DataConfig(max_length=48, limit=64)  # truncated to 48: two examples together are longer
    prepared = sources.prepare(cfg, tiny_build.sft_train, tokenizer, tmp_path)
    expected = [(e.input_ids.tolist(), e.labels.tolist()) for e in prepared.examples]
    del prepared  # its arrays map the files about to be damaged
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    DAMAGE[damage](folder)
    caplog.set_level(logging.WARNING, logger="pipeline")
    again = sources.prepare(cfg, tiny_build.sft_train, tokenizer, tmp_path)
    warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(warnings) == 1 and "rebuilding it" in warnings[0]
    assert [(e.input_ids.tolist(), e.labels.tolist()) for e in again.examples] == expected


def test_the_streamed_arrays_are_plain_npy_files(tmp_path):
    """The writer reserves the `.npy` header and fills it in last; numpy reads what it wrote."""
    rng = np.random.default_rng(0)
    examples = [
        Example(i, rng.integers(0, 50_000, n).astype(np.int32), rng.random(n) > 0.5) for i, n in enumerate([3, 1, 40])
    ]
    with tokens.Writer(tmp_path) as writer:
        for e in examples:
            writer.add(e)
        writer.finish({"note": 1})
    ids, mask = np.load(tmp_path / "input_ids.npy"), np.load(tmp_path / "completion.npy")
    assert ids.dtype == np.int32 and mask.dtype == np.bool_ and len(ids) == 44
    np.testing.assert_array_equal(ids, np.concatenate([e.input_ids for e in examples]))
    np.testing.assert_array_equal(mask, np.concatenate([e.completion for e in examples]))
    assert np.load(tmp_path / "offsets.npy").tolist() == [0, 3, 4, 44]
