"""Shared fixtures: a tiny embedded build (seconds) and the real default build (minutes, cached).

Tests never download anything: every model and tokenizer here is built locally.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

if not torch.cuda.is_available():  # Triton kernels run with numpy here; must be set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
# torch.compile's C++ kernels go to a cache of this run's own, not the machine-wide
# /tmp/torchinductor_<user>: a stale entry there (found on this machine) made the compiled chunk step
# return 2.976 instead of 2.601 in every checkout, while a fresh cache gives the eager numbers.
# Likewise matplotlib's font cache: a run of the suite leaves nothing in the user's home (~/.config).
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="target-sft-test-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)
if "MPLCONFIGDIR" not in os.environ:
    os.environ["MPLCONFIGDIR"] = tempfile.mkdtemp(prefix="target-sft-test-matplotlib-")
    atexit.register(shutil.rmtree, os.environ["MPLCONFIGDIR"], ignore_errors=True)

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.entry import stages
from pipeline.world import builder
from pipeline.world.config import WorldConfig

REPO = Path(__file__).resolve().parent.parent

# Small enough to build in a few seconds; head_dim stays 32 as vLLM's CPU build needs.
TINY = WorldConfig(
    name="tiny-test",
    pretrain_problems=400,
    sft_train_problems=60,
    heldout_problems=20,
    forgetting_problems=10,
    validation_problems=10,
    hidden_size=64,
    num_heads=2,
    num_layers=2,
    intermediate_size=128,
    seq_len=64,
    batch_size=4,
    steps=4,
    warmup_steps=2,
)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for test servers and torchrun rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_args(build: builder.WorldPaths, storage: Path | str, *extra: str) -> list[str]:
    """`--set`-style overrides for a run on a tiny build: its model and SFT set, short examples, the hf
    prior engine with k=8, storage under `storage`; `extra` comes last and wins."""
    return [
        f"storage_root={storage}",
        f"model.path={build.model}",
        f"data.path={build.sft_train}",
        "data.max_length=128",
        "priors.engine=hf",
        "priors.k=8",
        *extra,
    ]


def hub_snapshot(folder: Path, rows: list[dict], test_rows: list[dict] | None = None) -> Path:
    """What `huggingface-cli download --repo-type dataset` leaves: README `configs:` plus sharded parquet."""
    (folder / "data").mkdir(parents=True)
    half = len(rows) // 2
    for i, part in enumerate((rows[:half], rows[half:])):
        pq.write_table(pa.Table.from_pylist(part), folder / "data" / f"train-0000{i}-of-00002.parquet")
    files = ["  - split: train\n    path: data/train-*"]
    if test_rows:
        pq.write_table(pa.Table.from_pylist(test_rows), folder / "data" / "test-00000-of-00001.parquet")
        files.append("  - split: test\n    path: data/test-*")
    readme = "---\nconfigs:\n- config_name: default\n  data_files:\n" + "\n".join(files) + "\n---\n# A dataset\n"
    (folder / "README.md").write_text(readme)
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# The files that take longest (`--durations=0`, docs/development.md), longest first. `make test` runs
# `--dist loadfile --no-loadscope-reorder`: a file goes to whichever worker is free, in collection order,
# so these start first and the many short files fill in at the end. pytest-xdist's default order (most
# tests first) left test_train_processes.py (5 tests, ~150 s) for last, on one worker while the other
# stood idle. A file not listed keeps its place after them; a stale list costs time, never a test.
LONGEST_FIRST = (
    "test_train_processes.py",
    "test_hostile_inputs.py",
    "test_interop.py",
    "test_priors_processes.py",
    "test_experiment.py",
    "test_demo_reproducible.py",
    "test_deployment.py",
    "test_world.py",
    "test_errors.py",
    "test_recipes.py",
    "test_s3.py",
    "test_flows.py",
    "test_tokens.py",
    "test_train.py",
    "test_cli.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory) -> builder.WorldPaths:
    return builder.build(TINY, tmp_path_factory.mktemp("tiny-storage"), progress=False)


@pytest.fixture(scope="session")
def default_build() -> builder.WorldPaths:
    """The real embedded base model, built once into the default storage root and reused."""
    return builder.build(WorldConfig(), REPO / "storage", progress=False)


@pytest.fixture(autouse=True)
def _log_handlers_keep_an_open_stream():
    """A log handler made during a test (Prefect's console handler, made when Prefect configures its
    logging) keeps the object that was sys.stderr then: that test's captured stream, closed when the
    test ends. The next test to log through it fails on "I/O operation on closed file", depending only
    on test order (seen under pytest-xdist). Point such handlers back at the process's stderr."""
    yield
    import logging
    import sys

    loggers = [
        logging.getLogger(),
        *(v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger)),
    ]
    for handler in {h for logger in loggers for h in logger.handlers}:
        stream = getattr(handler, "stream", None)
        if isinstance(handler, logging.StreamHandler) and getattr(stream, "closed", False):
            handler.stream = sys.__stderr__  # not setStream(): it flushes the closed stream first
            if getattr(handler, "console", None) is not None:  # rich's Console (Prefect) holds it too
                handler.console.file = sys.__stderr__


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real temporary Prefect server (prefect_test_harness) for the flow tests."""
    home = tmp_path_factory.mktemp("prefect-home")
    os.environ["PREFECT_HOME"] = str(home)
    os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(home / "storage")  # see flows.home_paths
    os.environ["PREFECT_SERVER_MEMO_STORE_PATH"] = str(home / "memo_store.toml")
    import contextlib
    import sys

    from prefect.testing.utilities import prefect_test_harness

    with contextlib.ExitStack() as stack:
        # Prefect's console log handler keeps the stream it was configured on: configure it on the
        # process's own stderr, never on the captured stream of whichever test came first (closed
        # after that test; under pytest-xdist's test order, flows then failed on logging).
        with contextlib.redirect_stderr(sys.__stderr__), contextlib.redirect_stdout(sys.__stdout__):
            stack.enter_context(prefect_test_harness(server_startup_timeout=120))
        yield


LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@pytest.fixture(scope="session")
def llama3_style(tiny_build, tmp_path_factory) -> Path:
    """The tiny model with a Llama-3-style tokenizer: header and eot special tokens, eos = <|eot_id|>,
    and no pad token (as Llama 3 ships)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("llama3-style")
    tok = AutoTokenizer.from_pretrained(tiny_build.model)
    end_of_text = tok.eos_token_id
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tok.eos_token = "<|eot_id|>"
    tok.pad_token = None
    tok.chat_template = LLAMA3_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(tiny_build.model)
    model.resize_token_embeddings(len(tok))
    model.config.pad_token_id = None
    model.generation_config.pad_token_id = None
    model.config.eos_token_id = model.generation_config.eos_token_id = [tok.eos_token_id, end_of_text]
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder).pad_token_id is None
    return folder


# Qwen3's own template, cut to what matters here: the last assistant turn after the last user query
# gets an (empty) think block the template writes itself, and `enable_thinking: false` puts the empty
# block into the generation prompt instead.
QWEN3_TEMPLATE = (
    "{%- set ns = namespace(last_query=-1) %}"
    "{%- for m in messages %}{%- if m['role'] == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}"
    "{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m['role'] != 'assistant' %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if loop.index0 > ns.last_query and loop.last %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{{- m['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


@pytest.fixture(scope="session")
def qwen3_style(tiny_build, tmp_path_factory) -> Path:
    """The tiny model with a Qwen3-style tokenizer: <|im_start|>/<|im_end|> and <think>/</think> as
    added tokens, eos = <|im_end|>, pad = <|endoftext|>, and the template above."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("qwen3-style")
    tok = AutoTokenizer.from_pretrained(tiny_build.model)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]})
    tok.add_tokens(["<think>", "</think>"])  # Qwen3 adds these as ordinary added tokens, not special ones
    tok.eos_token, tok.pad_token = "<|im_end|>", "<|endoftext|>"
    tok.chat_template = QWEN3_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(tiny_build.model)
    model.resize_token_embeddings(len(tok))
    model.config.pad_token_id = model.generation_config.pad_token_id = tok.pad_token_id
    model.config.eos_token_id = model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def wide_teacher(student: Path, out: Path, extra: int = 16) -> Path:
    """The student with `extra` more output rows (as Qwen2.5-Math-7B has 128 more than the 1.5B), the
    same tokenizer; the new rows copy the most likely tokens' rows, so the teacher's top-k holds them."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    rows = model.get_output_embeddings().weight.shape[0]
    model.resize_token_embeddings(rows + extra, mean_resizing=False)
    with torch.no_grad():
        weight = model.get_output_embeddings().weight
        weight[rows:] = weight[:extra] * 1.5
    model.config.vocab_size = rows + extra
    model.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(student).save_pretrained(out)
    return out


@pytest.fixture
def captured(tiny_build, tmp_path):
    """Priors of the tiny model over its SFT set, in tmp_path (training tests' settings)."""
    from pipeline.common.config import load_config
    from pipeline.entry.config import RunConfig

    overrides = tiny_args(tiny_build, tmp_path, "train.lr=0.002", "train.eval_every=0", "train.threads=1")
    stages.capture_priors(load_config(RunConfig, None, overrides), progress=False)
    return tmp_path
