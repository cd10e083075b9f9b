"""`cache export` and `cache import` against Axolotl's own KD code, not a reading of its format.

Axolotl 0.19.0 from PyPI (the `interop-tests` extra, in the lock): its `src/axolotl/integrations/kd/`
is byte-identical to 0.21.0's, the version the interop issue tested, and unlike 0.21.0 it installs on
Python 3.11. The KD package's `__init__` imports Axolotl's plugin base, which pulls in peft; the
`axolotl_kd` fixture replaces that one `__init__` by an empty package and nothing else: the strategy
(`chat_template.py`), the collator (`collator.py`) and the loss (`topk_logprob/forward_kl.py`) are
Axolotl's files as released.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.common.config import load_config
from pipeline.entry import stages
from pipeline.entry.config import RunConfig
from pipeline.priors.cache import PriorStore
from pipeline.priors.engines import scored_positions
from tests.test_interop import K, args, errors, run, write_axolotl_kd

AXOLOTL_VERSION = "0.19.0"
LONG = ("data.max_length=512",)
"""No row truncated: Axolotl's strategy tokenizes whole chats (it drops long rows later)."""


@pytest.fixture
def axolotl_kd(monkeypatch) -> types.SimpleNamespace:
    """Axolotl's KD strategy, collator and loss, imported from the installed release."""
    spec = importlib.util.find_spec("axolotl.integrations")
    assert spec is not None and spec.submodule_search_locations, "axolotl is not installed (make install)"
    from importlib.metadata import version

    assert version("axolotl") == AXOLOTL_VERSION
    package = types.ModuleType("axolotl.integrations.kd")
    package.__path__ = [str(Path(next(iter(spec.submodule_search_locations))) / "kd")]
    monkeypatch.setitem(sys.modules, "axolotl.integrations.kd", package)
    from axolotl.utils.dict import DictDefault

    return types.SimpleNamespace(
        strategy=importlib.import_module("axolotl.integrations.kd.chat_template"),
        collator=importlib.import_module("axolotl.integrations.kd.collator"),
        forward_kl=importlib.import_module("axolotl.integrations.kd.topk_logprob.forward_kl"),
        DictDefault=DictDefault,
    )


def axolotl_strategy(kd: types.SimpleNamespace, tokenizer: Any) -> Any:
    """`type: axolotl.integrations.kd.chat_template` as Axolotl builds it (the v2 loader, its default)."""
    cfg = kd.DictDefault({"train_on_inputs": False, "sequence_len": 512, "kd_temperature": 1.0})
    return kd.strategy.load(tokenizer, cfg, {"field_messages": "messages", "logprobs_field": "logprobs"})


def our_examples(build, root: Path, *extra: str) -> list:
    return stages.plan_priors(load_config(RunConfig, None, args(build, root, *extra)), progress=False).prepared.examples


def test_axolotls_collator_and_loss_train_on_our_export(tiny_build, tmp_path, capsys, axolotl_kd):
    """Export, load the file as Axolotl loads a pre-tokenized dataset, batch it with Axolotl's
    `DataCollatorForKD`, and take optimizer steps on Axolotl's top-k forward KL."""
    captured = stages.capture_priors(load_config(RunConfig, None, args(tiny_build, tmp_path)), progress=False)
    cfg_args = [f"--set={a}" for a in args(tiny_build, tmp_path)]
    code, _, err = run(["cache", "export", captured.key, "--out", str(tmp_path / "kd"), *cfg_args], capsys)
    assert code == 0, err
    rows = pq.read_table(tmp_path / "kd" / "train.parquet").to_pylist()
    assert {"input_ids", "attention_mask", "labels"} <= set(rows[0])  # Axolotl's "already tokenized" test
    examples = {e.index: e for e in our_examples(tiny_build, tmp_path)}
    # the mask is 1 exactly at our scored rows, the first completion token's distribution included
    for index, row in enumerate(rows):
        scored = set(scored_positions(examples[index]).tolist())
        assert [j for j, m in enumerate(row["target_mask"]) if any(m)] == sorted(scored)
        first = min(scored)
        assert row["labels"][first] == -100 and row["labels"][first + 1] == row["input_ids"][first + 1]
    tokenizer = AutoTokenizer.from_pretrained(tiny_build.model)
    collate = axolotl_kd.collator.DataCollatorForKD(tokenizer=tokenizer, return_tensors="pt")
    keep = ("input_ids", "attention_mask", "labels", "target_token_ids", "target_logprobs", "target_mask")
    batch = collate([{name: row[name] for name in keep} for row in rows[:8]])  # what Trainer's column filter leaves
    assert batch["target_token_ids"].shape == (8, batch["input_ids"].shape[1], K)
    model = AutoModelForCausalLM.from_pretrained(tiny_build.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss_fn = axolotl_kd.forward_kl.ChunkedTopKKDLoss(num_output_chunks=2)
    losses = []
    for _ in range(4):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = loss_fn(logits, batch["target_token_ids"], batch["target_logprobs"], batch["target_mask"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses


def axolotl_chat_rows(build, root: Path, path: Path, drop_last: bool = False) -> Path:
    made = write_axolotl_kd(build, root, root / "kd.jsonl", extra=LONG)
    rows = [json.loads(line) for line in made.read_text().splitlines()]
    if drop_last:  # the T−1 layout: no padding row
        for row in rows:
            row["target_token_ids"], row["logprobs"] = row["target_token_ids"][:-1], row["logprobs"][:-1]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_set_built_by_axolotls_strategy_imports_exactly(tiny_build, tmp_path, capsys, axolotl_kd):
    """Axolotl's own KD strategy tokenizes a chat-shaped KD file (as it would for training) into
    pre-tokenized rows with renormalized top-k values; that file imports, stated `--normalized`,
    with the strategy's ids and values at every scored position."""
    source = axolotl_chat_rows(tiny_build, tmp_path / "fixture", tmp_path / "chat.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(tiny_build.model)
    strategy = axolotl_strategy(axolotl_kd, tokenizer)
    built = [strategy.tokenize_prompt(json.loads(line)) for line in source.read_text().splitlines()]
    examples = our_examples(tiny_build, tmp_path, *LONG)
    assert [b["input_ids"] for b in built] == [e.input_ids.tolist() for e in examples]  # the same tokens
    columns = ("input_ids", "attention_mask", "labels", "target_token_ids", "target_logprobs", "target_mask")
    pq.write_table(pa.Table.from_pylist([{c: b[c] for c in columns} for b in built]), tmp_path / "built.parquet")
    argv = ["cache", "import", str(tmp_path / "built.parquet"), "--normalized"]
    code, out, err = run([*argv, *[f"--set={a}" for a in args(tiny_build, tmp_path, *LONG)]], capsys)
    assert code == 0, err
    key = out.split("prior set ")[1].split(":")[0]
    assert "renormalized" in out  # the γ profile's caveat
    manifest = PriorStore(str(tmp_path)).manifest(key)
    assert manifest["capture"]["normalized"] is True and manifest["key_inputs"]["engine"]["normalized"] is True
    stored = PriorStore(str(tmp_path)).open(key).load_all()
    for example, row in zip(examples, built, strict=True):
        record = stored[example.index]
        for i, t in enumerate(record.positions.tolist()):
            theirs = np.asarray(row["target_logprobs"][t], dtype=np.float64)
            order = np.argsort(-theirs, kind="stable")[:K]
            np.testing.assert_array_equal(record.topk_ids[i], np.asarray(row["target_token_ids"][t])[order])
            np.testing.assert_allclose(record.topk_logprobs[i], theirs[order], atol=1 / 128 + 1e-6)
    # and Axolotl's chat strategy masks row j by token j's label: the first completion row is masked out
    first = int(scored_positions(examples[0])[0])
    mask = built[0]["target_mask"]
    assert not any(mask[first]) and any(mask[first + 1])


def test_the_t_minus_1_layout_imports_when_stated(tiny_build, tmp_path, capsys, axolotl_kd):
    full = axolotl_chat_rows(tiny_build, tmp_path / "a", tmp_path / "full.jsonl")
    short = axolotl_chat_rows(tiny_build, tmp_path / "b", tmp_path / "short.jsonl", drop_last=True)
    cfg_args = [f"--set={a}" for a in args(tiny_build, tmp_path, *LONG)]
    code, _, err = run(["cache", "import", str(short), *cfg_args], capsys)
    assert (code, errors(err)) == (2, 1) and "--rows t-1" in err, err
    code, out, err = run(["cache", "import", str(short), "--rows", "t-1", *cfg_args], capsys)
    assert code == 0, err
    short_key = out.split("prior set ")[1].split(":")[0]
    code, out, err = run(["cache", "import", str(full), *cfg_args], capsys)
    assert code == 0, err
    full_key = out.split("prior set ")[1].split(":")[0]
    a, b = PriorStore(str(tmp_path)).open(short_key).load_all(), PriorStore(str(tmp_path)).open(full_key).load_all()
    for index in a:
        for field in ("positions", "topk_ids", "topk_logprobs", "obs_logprob", "obs_rank"):
            np.testing.assert_array_equal(getattr(a[index], field), getattr(b[index], field))
    # what Axolotl does with the same T−1 rows: it front-pads one row, so its row j + 1 is the file's row j
    row = json.loads(short.read_text().splitlines()[0])
    built = axolotl_strategy(axolotl_kd, AutoTokenizer.from_pretrained(tiny_build.model)).tokenize_prompt(dict(row))
    assert built["target_token_ids"][1:] == row["target_token_ids"]
