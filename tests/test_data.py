from __future__ import annotations

import json
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from pipeline.common.errors import DataError
from pipeline.core.targets import IGNORE
from pipeline.data import sources
from pipeline.data.config import DataConfig
from pipeline.data.tokens import Example

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Ana has 3 pens. Ana finds 2 more. How many?"},
    {"role": "assistant", "content": "3 + 2 = 5.\n#### 5"},
    {"role": "user", "content": "And if she loses 1?"},
    {"role": "assistant", "content": "5 - 1 = 4.\n#### 4"},
]


@pytest.fixture
def tokenizer(tiny_build):
    return AutoTokenizer.from_pretrained(tiny_build.model)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def completion_text(example, tokenizer):
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE])


def test_multi_turn_mask_covers_every_assistant_turn(tokenizer):
    ids, labels = sources.tokenize_chat(CHAT, tokenizer)
    example = Example.from_labels(0, ids, labels)
    assert completion_text(example, tokenizer) == "3 + 2 = 5.\n#### 5<|end|>\n5 - 1 = 4.\n#### 4<|end|>\n"
    # prompt side (system, users, role markers) is never a label
    prompt = tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label == IGNORE])
    assert "Be brief." in prompt and "And if she loses 1?" in prompt and "#### 5" not in prompt


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{% for m in messages|reverse %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}", "not prefix-stable"),
        (
            "{% for m in messages %}{{ m['role'] }}: {{ m['content'] if loop.last or m['role'] != 'assistant' "
            "else '(earlier answer)' }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}",
            "cannot be found in the full rendering",
        ),
    ],
)
def test_templates_whose_answers_cannot_be_located_are_refused(tmp_path, tokenizer, template, message):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n")
    with pytest.raises(DataError, match=rf"row 0: .*{message}"):
        sources.prepare(DataConfig(chat_template=template), path, tokenizer)


@pytest.mark.parametrize(
    ("rows", "columns", "fmt"),
    [
        ([{"messages": CHAT[1:3]}], {}, "messages"),
        ([{"prompt": "Q?", "completion": "A."}], {}, "prompt_completion"),
        ([{"question": "Q?", "answer": 7}], {}, "question_answer"),
        (
            [{"instruction": "Q?", "output": "A."}],
            {"prompt": "instruction", "completion": "output"},
            "prompt_completion",
        ),
        ([{"conv": CHAT[1:3]}], {"messages": "conv"}, "messages"),
    ],
)
def test_format_detection_and_column_mapping(tmp_path, tokenizer, rows, columns, fmt):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    prepared = sources.prepare(DataConfig(columns=columns), path, tokenizer)
    assert prepared.format == fmt
    assert len(prepared.examples) == 1
    assert completion_text(prepared.examples[0], tokenizer).endswith("<|end|>\n")


def test_unknown_format_is_clear(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    with pytest.raises(DataError, match=r"cannot detect the format from the columns"):
        sources.prepare(DataConfig(), path, tokenizer)


def test_file_kinds_load_the_same(tmp_path, tokenizer):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"Q{i}?", "completion": f"A{i}."} for i in range(5)]
    paths = [write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "d.json", tmp_path / "d.parquet", tmp_path / "ds"]
    paths[1].write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), paths[2])
    datasets.Dataset.from_list(rows).save_to_disk(str(paths[3]))
    prints = {sources.prepare(DataConfig(), p, tokenizer).fingerprint for p in paths}
    assert len(prints) == 1


def test_missing_dataset_is_clear(tmp_path, tokenizer):
    with pytest.raises(DataError, match="dataset not found"):
        sources.prepare(DataConfig(), tmp_path / "nope.jsonl", tokenizer)


def test_truncate_and_drop(tmp_path, tokenizer):
    long = {"prompt": "Q?", "completion": "word " * 80}
    short = {"prompt": "Q?", "completion": "A."}
    path = write_jsonl(tmp_path / "d.jsonl", [long, short])
    truncated = sources.prepare(DataConfig(max_length=32, truncation="truncate"), path, tokenizer)
    assert truncated.truncated == 1 and len(truncated.examples) == 2
    assert max(len(e.input_ids) for e in truncated.examples) == 32
    dropped = sources.prepare(DataConfig(max_length=32, truncation="drop"), path, tokenizer)
    assert dropped.dropped_too_long == 1 and len(dropped.examples) == 1
    assert [e.index for e in dropped.examples] == [1]
    # a cut that leaves no completion token drops the example and says so
    prompt_heavy = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "word " * 80, "completion": "A."}, short])
    one_left = sources.prepare(DataConfig(max_length=16), prompt_heavy, tokenizer)
    assert one_left.dropped_no_completion == 1 and [e.index for e in one_left.examples] == [1]
    # and when nothing is left, one clear error says why (not an empty set that fails later)
    with pytest.raises(DataError, match=r"no examples left .* \(2 rows: 2 too long"):
        sources.prepare(DataConfig(max_length=8, truncation="drop"), path, tokenizer)


MALFORMED = [
    ({"prompt": "Q?"}, "missing field 'completion'"),
    ({"prompt": "Q?", "completion": "   "}, "empty completion"),
    ({"messages": [{"role": "assistant", "content": "A"}, {"role": "user", "content": "Q"}]}, "bad role order"),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "user", "content": "Q"}]}, "bad role order"),
    ({"messages": [{"role": "user", "content": ["Q"]}, {"role": "assistant", "content": "A"}]}, "non-string content"),
    ({"prompt": 3, "completion": "A"}, "non-string content"),
    ({"messages": [{"role": "robot", "content": "Q"}]}, "unknown role 'robot'"),
]


@pytest.mark.parametrize(("bad", "reason"), MALFORMED)
def test_malformed_rows_name_index_and_reason(tmp_path, tokenizer, bad, reason):
    good = {"messages": CHAT[1:3]} if "messages" in bad else {"prompt": "Q?", "completion": "A."}
    path = write_jsonl(tmp_path / "d.jsonl", [good, good, bad, good])
    with pytest.raises(DataError, match=f"row 2: .*{reason}"):
        sources.prepare(DataConfig(), path, tokenizer)
    skipped = sources.prepare(DataConfig(skip_invalid=True), path, tokenizer)
    assert [index for index, _ in skipped.skipped] == [2]
    assert reason in skipped.skipped[0][1]
    assert [e.index for e in skipped.examples] == [0, 1, 3]


FINGERPRINT_SCRIPT = """
import sys
from transformers import AutoTokenizer
from pipeline.data import sources
from pipeline.data.config import DataConfig
tok = AutoTokenizer.from_pretrained(sys.argv[1])
print(sources.prepare(DataConfig(), sys.argv[2], tok).fingerprint)
"""


def test_fingerprint_stable_across_processes_and_sensitive(tmp_path, tiny_build, tokenizer):
    rows = [json.loads(line) for line in tiny_build.sft_train.read_text().splitlines()][:20]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    base = sources.prepare(DataConfig(), path, tokenizer).fingerprint
    other_process = subprocess.run(
        [sys.executable, "-c", FINGERPRINT_SCRIPT, str(tiny_build.model), str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert other_process == base

    edited = [dict(r) for r in rows]
    msgs = [dict(m) for m in edited[5]["messages"]]
    msgs[1]["content"] = msgs[1]["content"].replace("=", "=", 1) + "."  # one character
    edited[5] = {**edited[5], "messages": msgs}
    assert sources.prepare(DataConfig(), write_jsonl(tmp_path / "e.jsonl", edited), tokenizer).fingerprint != base

    templated = AutoTokenizer.from_pretrained(tiny_build.model)
    templated.chat_template = templated.chat_template.replace("|>\n'", "|>\n\n'")
    assert templated.chat_template != tokenizer.chat_template
    assert sources.prepare(DataConfig(), path, templated).fingerprint != base

    retokenized = AutoTokenizer.from_pretrained(tiny_build.model)
    retokenized.add_tokens(["<|tool|>"])
    assert sources.prepare(DataConfig(), path, retokenized).fingerprint != base

    assert sources.prepare(DataConfig(max_length=64), path, tokenizer).fingerprint != base


def test_summary_and_highlight(tiny_build, tokenizer):
    prepared = sources.prepare(DataConfig(limit=10), tiny_build.sft_train, tokenizer)
    info = sources.summary(prepared)
    assert info["examples"] == 10
    assert info["tokens"] == info["completion_tokens"] + info["prompt_tokens"]
    assert 0 < info["completion_tokens"] < info["tokens"]
    shown = sources.highlight(prepared.examples[0], tokenizer, color=False)
    assert "⟦" in shown and "####" in shown.split("⟦", 1)[1]


@pytest.mark.parametrize("glob_form", [False, True])
def test_a_csv_edited_in_place_with_its_timestamp_restored_is_read_again(tmp_path, glob_form):
    """datasets keys its Arrow cache of a builder's files (csv, globs) by their mtimes; ours reads
    their content (pipeline/data/sources.py `_cache_dir`)."""
    import os

    path = tmp_path / "rows.csv"
    path.write_text("prompt,completion\nwhat is 1+1,2\n")
    stamp = path.stat()
    target = str(tmp_path / "*.csv") if glob_form else path
    assert sources.open_source(target).read(None) == [{"prompt": "what is 1+1", "completion": 2}]
    path.write_text("prompt,completion\nwhat is 1+2,3\n")
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert sources.open_source(target).read(None) == [{"prompt": "what is 1+2", "completion": 3}]
