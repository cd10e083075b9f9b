"""Typed configuration: dataclasses per stage, YAML as the file format, `--set` overrides.

Every config is a plain dataclass whose fields carry a docstring. `load_config` turns a YAML
mapping (plus `key.sub=value` overrides) into such an object and refuses unknown keys and wrong
types with an error that names the offending key. Objects are built from configs; nothing below
the CLI reads YAML.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
DEFAULT_STORAGE = os.environ.get("TARGET_SFT_STORAGE", "storage")


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key."""


@dataclass
class ModelConfig:
    """Which causal LM and tokenizer a stage uses."""

    path: str | None = None
    """Local `from_pretrained` folder. None means the embedded base model (built on demand)."""


@dataclass
class DataConfig:
    """Where the SFT examples come from and how they become token ids and label masks."""

    path: str | None = None
    """A .jsonl/.json/.parquet file or a `datasets.save_to_disk` folder. None means the embedded
    synthetic SFT set (train split) of the embedded base model."""
    format: Literal["auto", "messages", "prompt_completion", "question_answer"] = "auto"
    """Row layout; `auto` detects it from the columns of the first row."""
    columns: dict[str, str] = field(default_factory=dict)
    """Maps canonical names (messages, prompt, completion, question, answer) to the dataset's own
    column names, e.g. {prompt: instruction, completion: output}."""
    max_length: int = 512
    """Longest tokenised example, prompt plus completion."""
    truncation: Literal["truncate", "drop"] = "truncate"
    """What to do with longer examples: cut the tail off, or leave the example out (counted)."""
    skip_invalid: bool = False
    """Leave malformed rows out and report them, instead of stopping at the first one."""
    limit: int | None = None
    """Use only the first `limit` rows (for smoke runs)."""
    eval_path: str | None = None
    """Held-out SFT examples (same format and columns as `path`) for the training-time eval loss;
    None: the embedded held-out problems when the data is the embedded set, else no eval loss."""


@dataclass
class BaseModelConfig:
    """The embedded base model: synthetic data, tokenizer, architecture and pretraining budget."""

    name: str = "tiny-arith"
    """Folder name under `<storage>/models/` and `<storage>/datasets/`."""
    seed: int = 0
    """Seeds data generation, initialisation and batch order."""
    threads: int = 2
    """torch CPU threads; fixed because float reductions depend on the thread count."""
    max_number: int = 20
    """Operands are drawn from 1..max_number."""
    max_steps_per_problem: int = 3
    """Each problem has 1..max_steps_per_problem +/- operations."""
    pretrain_problems: int = 50000
    """Plain-text problems in the pretraining corpus."""
    sft_train_problems: int = 4000
    """Chat-format SFT demonstrations."""
    heldout_problems: int = 200
    """Held-out evaluation problems; never seen in pretraining or SFT."""
    sft_noise_fraction: float = 0.3
    """Share of SFT demonstrations with a systematic error (one step off by one, carried on)."""
    vocab_size: int = 512
    """Target BPE vocabulary size (byte-level, digits split)."""
    hidden_size: int = 128
    """Model width."""
    num_layers: int = 4
    """Transformer blocks."""
    num_heads: int = 4
    """Attention heads; head_dim = hidden_size / num_heads must be >= 32 for vLLM's CPU build."""
    intermediate_size: int = 512
    """MLP width."""
    seq_len: int = 256
    """Packed pretraining sequence length."""
    batch_size: int = 16
    """Sequences per pretraining step."""
    steps: int = 700
    """Pretraining steps (fixed, not time-based, so the build is deterministic)."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """Pretraining matmul precision: bf16 autocast (fp32 master weights) is about 1.3x faster on
    CPUs with AVX512-BF16/AMX; `auto` picks it where the CPU has it, fp32 elsewhere."""
    lr: float = 3e-3
    """Peak AdamW learning rate (linear warmup, cosine decay to 10%)."""
    warmup_steps: int = 30
    """Linear warmup steps."""


@dataclass
class PriorsConfig:
    """Stage 1: how sparse priors are captured (DESIGN §3-§4)."""

    engine: Literal["auto", "vllm", "hf"] = "auto"
    """`vllm` (offline LLM, prompt logprobs), `hf` (transformers reference), or `auto`: vllm
    wherever it imports, hf otherwise."""
    model_path: str | None = None
    """The prior (teacher) model; None means the run's own model. It must share the tokenizer."""
    k: int = 20
    """Top-k entries stored per scored position."""
    shard_size: int = 256
    """Examples per Parquet shard (the unit of resumption and of fan-out)."""
    batch_tokens: int = 8192
    """hf engine: padded tokens per forward batch."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Prior model precision; auto is float32 on CPU (vLLM matches transformers to 4e-6 there),
    bfloat16 on GPU."""
    device: str = "auto"
    """hf engine device: auto (cuda if available), cpu, cuda, cuda:1, ..."""
    tensor_parallel_size: int = 1
    """vllm engine: GPUs per model replica."""
    gpu_memory_utilization: float = 0.9
    """vllm engine: share of GPU memory vLLM may take."""
    trust_remote_code: bool = False
    """Allow model repositories to run their own Python code (off unless you turn it on)."""
    num_workers: int = 1
    """Workers sharing this capture; worker i computes shards i, i+n, i+2n, ..."""
    worker_index: int = 0
    """This worker's index in [0, num_workers)."""


@dataclass
class TrainConfig:
    """Stage 2: training the student toward Q-targets."""

    name: str = "run"
    """Run folder: `<storage>/runs/<name>/` (checkpoints, metrics.jsonl, final model)."""
    target: str | dict[str, Any] = "sft"
    """A preset name (`sft`, `dft`, `target_sft`, ...), `{preset: target_sft, eta: 0.5}`, or a free
    composition `{gamma: ..., residual: ..., weight: ...}` (pipeline.targets)."""
    tail: Literal["student_tail", "renormalize"] = "student_tail"
    """How the prior mass outside the stored top-k is treated (DESIGN §3)."""
    prior_key: str | None = None
    """Prior set to read; None: the key this config's priors section produces."""
    batch_size: int = 16
    """Examples per optimizer step, over all processes."""
    micro_batch_size: int = 4
    """Examples per forward/backward on one process; accumulation = batch / (micro × processes)."""
    micro_batch_tokens: int | None = None
    """Padded-token budget per micro-batch. Set, it replaces micro_batch_size: each process splits its
    share of a step into the fewest length-sorted micro-batches of at most this many padded tokens
    (every process runs the same number). The update is the same; only memory and padding change."""
    group_by_length: bool = False
    """Length-grouped sampling: global batches come from mega-batches of 50 × batch_size examples
    sorted by length (similar lengths per step, little padding); the order of the steps stays random."""
    max_steps: int = 100
    """Optimizer steps (ignored when `epochs` is set)."""
    epochs: float | None = None
    """Passes over the data; sets max_steps = floor(epochs × examples / batch_size) once the data is
    tokenised (the paper's recipes train 1 epoch)."""
    lr: float = 1e-3
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 5
    """Linear warmup, then cosine decay to 10% of the peak."""
    max_grad_norm: float = 1.0
    """Gradient clipping (global L2 norm)."""
    seed: int = 0
    """Seeds the data order and everything random."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """bf16 autocast on GPU, fp32 on CPU (auto)."""
    processes: int = 1
    """Training processes on this node (one per GPU). Above 1, `target-sft train`/`run` and the flows
    launch `torchrun --standalone --nproc-per-node <processes>`; under torchrun itself it is ignored."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun: DDP (replicated model), or FSDP2 `fully_shard` per decoder layer for
    models that do not fit on one device."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    chunk_size: int = 1024
    """Scored tokens per chunk of the fused loss."""
    checkpoint_every: int = 50
    """Write a resumable checkpoint every N steps (and at the end)."""
    eval_every: int = 50
    """Held-out loss every N steps (0: never)."""
    eval_examples: int = 64
    """Held-out examples for the eval loss."""
    threads: int = 2
    """torch CPU threads per process."""


@dataclass
class EvalSetConfig:
    """One held-out set of reasoning problems for `target-sft eval`."""

    name: str
    """Label in reports (e.g. `math500`)."""
    path: str
    """A .jsonl/.json/.parquet file or a `datasets.save_to_disk` folder, one problem per row."""
    question_column: str = "question"
    """Column holding the problem text."""
    answer_column: str = "answer"
    """Column holding the reference answer (a number, a LaTeX expression, or an option letter)."""
    answer_type: Literal["numeric", "math", "choice"] = "math"
    """How answers are checked: `numeric` (exact number after `####`, or the last `\\boxed{}`),
    `math` (math-verify: `\\boxed{}`, `#### x`, LaTeX forms), `choice` (the option letter)."""
    prompt_template: str = "{question}"
    """The user turn; `{question}` is replaced by the problem text (other braces stay as they are)."""
    limit: int | None = None
    """Use only the first `limit` problems."""


@dataclass
class EvalConfig:
    """Evaluation: sample answers to held-out problems, verify them, report Average@n and pass@n."""

    sets: list[EvalSetConfig] = field(default_factory=list)
    """Held-out sets; empty means the embedded base model's held-out problems (numeric answers)."""
    model_path: str | None = None
    """Model to evaluate; None means this config's trained run (`<storage>/runs/<train.name>/final`)."""
    engine: Literal["auto", "vllm", "hf"] = "auto"
    """`vllm` (offline LLM), `hf` (transformers `generate`), or `auto`: vllm wherever it imports."""
    n: int = 4
    """Sampled completions per problem (Average@n, pass@n)."""
    temperature: float = 0.7
    """Sampling temperature of the n samples."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    max_new_tokens: int = 128
    """Longest completion."""
    seed: int = 0
    """Seeds the sampling."""
    greedy: bool = True
    """Also decode greedily once per problem and report greedy accuracy."""
    system_prompt: str | None = None
    """Optional system turn before each problem."""
    limit: int | None = None
    """Use only the first `limit` problems of every set (smoke runs)."""
    batch_size: int = 64
    """hf engine: prompts per `generate` call."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Generation precision; auto is float32 on CPU, bfloat16 on GPU."""
    max_model_len: int = 4096
    """vllm engine: longest prompt plus completion."""
    tensor_parallel_size: int = 1
    """vllm engine: GPUs per model replica."""
    gpu_memory_utilization: float = 0.85
    """vllm engine: share of GPU memory vLLM may take."""


@dataclass
class ExperimentConfig:
    """An experiment: capture priors once, train a grid of targets over seeds, evaluate, compare."""

    name: str = "experiment"
    """Folder `<storage>/experiments/<name>/` (table, plot, summary); runs are `<name>-<target>-s<seed>`."""
    targets: list[Any] = field(default_factory=lambda: ["sft", "dft", {"preset": "target_sft", "eta": 0.5}])
    """The grid: presets or `{preset: ..., param: ...}` mappings; a list of values expands to one run
    per value (`{preset: target_sft, eta: [0.25, 0.5, 0.75]}`). A `train:` mapping inside an entry
    sets that run's own train settings (e.g. `{preset: sft, train: {lr: 1.0e-4}}`)."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Every target runs once per seed (train.seed and eval.seed)."""
    evaluate_base: bool = True
    """Also evaluate the untrained base model, as the reference row."""
    schedule: str | None = None
    """Cron string for the served deployment (`target-sft serve`), e.g. `0 3 * * *`."""


@dataclass
class RunConfig:
    """A run file: storage root plus one section per stage."""

    storage_root: str = DEFAULT_STORAGE
    """Root folder (local or shared filesystem) for models, datasets, priors and runs; relative
    paths are relative to the working directory. Default: $TARGET_SFT_STORAGE or `storage`."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model (and its tokenizer) every stage uses."""
    data: DataConfig = field(default_factory=DataConfig)
    """The SFT dataset."""
    base_model: BaseModelConfig = field(default_factory=BaseModelConfig)
    """How the embedded base model is built when `model.path` is None."""
    priors: PriorsConfig = field(default_factory=PriorsConfig)
    """Stage 1: prior capture."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Stage 2: training."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation on held-out problems."""
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    """The grid `target-sft run` trains and compares."""


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:  # type: ignore[assignment]
    """Build a `cls` instance from a YAML file and `key.sub=value` overrides.

    Args:
        cls: The dataclass to build.
        path: YAML file; None starts from the defaults.
        overrides: `dotted.key=value` strings; values are parsed as YAML scalars.

    Raises:
        ConfigError: Unknown key, wrong type or unreadable file, naming the key.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError as e:
            raise ConfigError(f"config file not found: {path}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        target = raw
        *parents, leaf = key.split(".")
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        target[leaf] = yaml.safe_load(value)
    return _build(cls, raw, prefix="")


def _build(cls: type[T], raw: Any, prefix: str) -> T:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - names)
    if unknown:
        where = f" in section {prefix.rstrip('.')!r}" if prefix else ""
        raise ConfigError(f"unknown config key {unknown[0]!r}{where}; valid keys: {sorted(names)}")
    required = [
        f.name
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in raw]
    if missing:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: missing required key {missing[0]!r}")
    kwargs = {name: _coerce(hints[name], value, f"{prefix}{name}") for name, value in raw.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check (and minimally convert) `value` against the annotation `tp`."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, prefix=f"{key}.")  # type: ignore[arg-type]
    if origin in (Union, types.UnionType):
        if value is None and type(None) in get_args(tp):
            return None
        errors = []
        for arg in get_args(tp):
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches no type")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = get_args(tp)
        return {_coerce(kt, k, key): _coerce(vt, v, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (it,) = get_args(tp)
        return [_coerce(it, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads `5e-5` (no dot) as a string
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{key}: expected {tp.__name__}, got bool {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain data (for saving next to a run)."""
    return dataclasses.asdict(config)
