"""Typed configuration: dataclasses per stage, YAML as the file format, `--set` overrides.

Every config is a plain dataclass whose fields carry a docstring. `load_config` turns a YAML
mapping (plus `key.sub=value` overrides) into such an object and refuses unknown keys and wrong
types with an error that names the offending key. Objects are built from configs; nothing below
the CLI reads YAML.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, cast, get_args, get_origin

import yaml

from pipeline.errors import ConfigError, TargetError
from pipeline.storage import resolve_root

T = TypeVar("T")

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
DEFAULT_STORAGE = os.environ.get("TARGET_SFT_STORAGE", "storage")


@dataclass(frozen=True)
class Range:
    """A bound on a number: low ≤ x (or low < x when `low_open`) and x ≤ high."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False

    def problem(self, value: float) -> str | None:
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        if not below and (self.high is None or value <= self.high):
            return None
        if self.high is None:
            return f"must be {'>' if self.low_open else '>='} {self.low}"
        return f"must be in {'(' if self.low_open else '['}{self.low}, {self.high}]"


SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")


@dataclass(frozen=True)
class SafeName:
    """One safe path component: letters, digits, `.`, `_`, `-`; not `.` or `..`."""

    def problem(self, value: str) -> str | None:
        if not SAFE_NAME.fullmatch(value) or value in (".", ".."):
            return "a name must be one folder name of letters, digits, '.', '_' and '-' (not '.' or '..')"
        if len(value) > MAX_NAME:
            return f"a name is at most {MAX_NAME} characters (a run's names add suffixes; filesystems stop at 255)"
        return None


MAX_NAME = 120


@dataclass(frozen=True)
class Device:
    """A torch device string that can exist: `auto`, `cpu`, `cuda`, `cuda:N`, `mps`."""

    def problem(self, value: str) -> str | None:
        if value in ("auto", "cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", value):
            return None
        return "not a device; use auto, cpu, cuda or cuda:N"


PositiveInt = Annotated[int, Range(1)]
NonNegativeInt = Annotated[int, Range(0)]
PositiveFloat = Annotated[float, Range(0, low_open=True)]
NonNegativeFloat = Annotated[float, Range(0)]
Fraction = Annotated[float, Range(0, 1)]
OpenFraction = Annotated[float, Range(0, 1, low_open=True)]
"""A share in (0, 1]."""
Name = Annotated[str, SafeName()]
Seed = Annotated[int, Range(0, 2**32 - 1)]
"""A random seed numpy, torch and vLLM all accept."""
DeviceName = Annotated[str, Device()]


@dataclass
class ModelConfig:
    """Which causal LM and tokenizer a stage uses."""

    path: str | None = None
    """Local `from_pretrained` folder. None means the embedded base model (built on demand)."""
    attn_implementation: Literal["sdpa", "eager", "flex_attention", "flash_attention_2"] | None = None
    """Attention kernel for training (transformers' `attn_implementation`); None: the model's default
    (sdpa). flash_attention_2 needs the flash-attn package and a GPU, and suits `train.packing`."""
    trust_remote_code: bool = False
    """Let model folders (this model, the prior model, evaluated models) run their own Python code
    (`auto_map`). Off: such a folder is refused before anything in it is read as code."""


@dataclass
class DataConfig:
    """Where the SFT examples come from and how they become token ids and label masks."""

    path: str | None = None
    """Where the rows are, read through `datasets`: a local Hub snapshot folder (its README
    `configs:`, as `huggingface-cli download --repo-type dataset` leaves it), a folder of data
    files, one file (.jsonl/.json/.parquet/.csv/.arrow), a glob (`/data/train-*.parquet`), a
    `save_to_disk` folder, or a Hub name (only when the Hub is reachable). None: the embedded
    synthetic SFT set of the embedded base model."""
    split: str = "train"
    """Split to read from a folder or Hub dataset with several splits."""
    subset: str | None = None
    """Config name of a dataset with several (`name=` of `datasets.load_dataset`)."""
    data_files: list[str] | None = None
    """Files (or globs) inside `path` to read instead of its default configuration."""
    format: Literal["auto", "messages", "prompt_completion", "question_answer", "conversations"] = "auto"
    """Row layout; `auto` detects it from the column names: `messages` (role/content chats),
    `prompt`+`completion` (strings, or message lists as in TRL's conversational form),
    `question`+`answer`, or ShareGPT-style `conversations` (from/value turns)."""
    columns: dict[str, str] = field(default_factory=dict)
    """Maps canonical names (messages, prompt, completion, question, answer, conversations) to the
    dataset's own column names, e.g. {prompt: instruction, completion: output}."""
    message_keys: dict[str, str] = field(default_factory=dict)
    """Keys of a turn in `conversations`: {role: from, content: value} by default."""
    roles: dict[str, str] = field(default_factory=dict)
    """Extra role names mapped to user/assistant/system (ShareGPT's human/gpt are built in),
    e.g. {patient: user, doctor: assistant}."""
    chat_template: str | None = None
    """A chat template (Jinja) to use instead of the tokenizer's own, inline or as a `.jinja` file
    path; it is saved with the trained model."""
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra variables for the template, e.g. {enable_thinking: false} for Qwen3; evaluation renders
    its prompts with them too."""
    mask_template_text: bool = True
    """Keep text that the template inserts into an assistant turn before the message (Qwen3's empty
    `<think>\n\n</think>\n\n`) out of the loss: the mask covers the content and the end-of-turn."""
    max_length: PositiveInt = 512
    """Longest tokenised example, prompt plus completion."""
    truncation: Literal["truncate", "drop"] = "truncate"
    """What to do with longer examples: cut the tail off, or leave the example out (counted)."""
    skip_invalid: bool = False
    """Leave malformed rows out and report them, instead of stopping at the first one."""
    limit: PositiveInt | None = None
    """Use only the first `limit` rows (for smoke runs)."""
    eval_path: str | None = None
    """Held-out SFT examples (same format and columns as `path`) for the training-time eval loss;
    None: the embedded held-out problems when the data is the embedded set, else no eval loss."""


@dataclass
class BaseModelConfig:
    """The embedded base model: synthetic data, tokenizer, architecture and pretraining budget."""

    name: Name = "tiny-arith"
    """Folder name under `<storage>/models/` and `<storage>/datasets/`."""
    seed: Seed = 0
    """Seeds data generation, initialisation and batch order."""
    threads: PositiveInt = 2
    """torch CPU threads; fixed because float reductions depend on the thread count."""
    max_number: PositiveInt = 20
    """Operands are drawn from 1..max_number."""
    max_steps_per_problem: PositiveInt = 3
    """Each problem has 1..max_steps_per_problem +/- operations (plus the doubling step, where it has one)."""
    pretrain_problems: PositiveInt = 50000
    """Problems in the pretraining corpus."""
    chat_share: Fraction = 0.5
    """Share of pretraining problems written as chats (the rest as `Question: ... Answer: ...` text):
    real base models have seen chat data, so the base is fluent in the format the SFT set uses."""
    new_op_share: Fraction = 0.02
    """Share of pretraining problems with a doubling step, the new skill: rare, so the base is weak at it."""
    sft_new_op: bool = True
    """Every SFT, validation and held-out problem has one doubling step: the SFT set teaches the new
    skill and the held-out set measures it. False: they are +/- problems, the skill the base has."""
    sft_style: Literal["base", "own"] = "own"
    """Phrasing of the SFT demonstrations: `own` (`Step 1: 3 + 4 gives 7.`, off-policy for a base that
    learned `So 3 + 4 = 7.`), or `base`, the pretraining phrasing."""
    own_style_share: Fraction = 0.0
    """Share of pretraining solutions written in the `own` phrasing: 0 leaves it unseen by the base (the
    demo), a small share makes it rare but seen, as other models' writing is for a real base model
    (configs/regimes/rare-phrasing.yaml)."""
    sft_train_problems: PositiveInt = 4000
    """Chat-format SFT demonstrations."""
    sft_noise_fraction: Fraction = 0.3
    """Share of SFT demonstrations with a systematic error (one step off by one, carried on): the
    uncertain labels that γ = p(observed) exists for."""
    heldout_problems: PositiveInt = 500
    """Held-out problems of the SFT skill (Average@n is reported on these); never seen in pretraining or SFT."""
    forgetting_problems: NonNegativeInt = 300
    """Held-out +/- problems (the old skill), to measure forgetting; 0: none."""
    validation_problems: NonNegativeInt = 200
    """Problems drawn like the held-out ones, disjoint from them: `target-sft select` chooses the
    learning rate and steps here, so the held-out set is never used to tune anything."""
    vocab_size: PositiveInt = 512
    """Target BPE vocabulary size (byte-level, digits split)."""
    hidden_size: PositiveInt = 128
    """Model width."""
    num_layers: PositiveInt = 4
    """Transformer blocks."""
    num_heads: PositiveInt = 4
    """Attention heads; head_dim = hidden_size / num_heads must be >= 32 for vLLM's CPU build."""
    intermediate_size: PositiveInt = 512
    """MLP width."""
    seq_len: PositiveInt = 256
    """Packed pretraining sequence length."""
    batch_size: PositiveInt = 16
    """Sequences per pretraining step."""
    steps: PositiveInt = 700
    """Pretraining steps (fixed, not time-based, so the build is deterministic)."""
    precision: Literal["auto", "bf16", "fp32"] = "fp32"
    """Pretraining matmul precision. fp32 gives the same model run after run on one CPU kind (with the
    pinned CPU kernels; across vendors only up to rounding, docs/design.md §7); bf16 autocast is faster
    on CPUs with AVX512-BF16/AMX but its results depend on the vendor; `auto` picks bf16 where the CPU
    has it."""
    lr: PositiveFloat = 3e-3
    """Peak AdamW learning rate (linear warmup, cosine decay to 10%)."""
    warmup_steps: NonNegativeInt = 30
    """Linear warmup steps."""
    teacher_hidden_size: PositiveInt = 192
    """The embedded teacher (`priors.embedded_teacher`): same data and tokenizer, this width..."""
    teacher_num_layers: PositiveInt = 4
    """...this many blocks..."""
    teacher_steps: PositiveInt = 1000
    """...and this many pretraining steps: a stronger model over the same token ids (`teacher_from:
    base`: this many steps of continued training)."""
    teacher_from: Literal["scratch", "base"] = "scratch"
    """How the embedded teacher is made: `scratch`, the larger model above pretrained on the base's
    corpus; `base`, this world's base continued on `teacher_problems` correct demonstrations of the
    SFT skill (a teacher fitted to the task; never an evaluation problem; docs/design.md §7)."""
    teacher_problems: PositiveInt = 4000
    """`teacher_from: base`: how many clean demonstrations the teacher is continued on."""
    teacher_lr: PositiveFloat = 1e-3
    """`teacher_from: base`: peak learning rate of the continued training (warmup, cosine decay)."""


@dataclass
class PriorsConfig:
    """Stage 1: how sparse priors are captured (docs/design.md §3-§4)."""

    engine: Literal["auto", "vllm", "hf", "vllm_server"] = "auto"
    """`vllm` (offline LLM, prompt logprobs), `hf` (transformers reference), `vllm_server` (a running
    `vllm serve` at `server_url`), or `auto`: vllm wherever it imports, hf otherwise."""
    server_url: str | None = None
    """vllm_server engine: the OpenAI-compatible server, e.g. `http://gpu-node:8000` (`/v1` optional).
    It must serve this config's prior model; the capture checks its vocabulary and tokenisation."""
    server_model: str | None = None
    """vllm_server engine: the served model name (`vllm serve --served-model-name`); None: the one
    model the server lists, whose name must end in the prior model's folder name."""
    server_concurrency: PositiveInt = 8
    """vllm_server engine: requests in flight (one example each; the server batches them)."""
    server_timeout: PositiveFloat = 600.0
    """vllm_server engine: seconds one request may take before it counts as failed."""
    server_retries: NonNegativeInt = 3
    """vllm_server engine: retries of a failed request (connection error, timeout, HTTP 5xx), with
    exponential backoff from 1 s. A 4xx answer is not retried."""
    model_path: str | None = None
    """The prior (teacher) model; None means the run's own model. It must share the tokenizer."""
    embedded_teacher: bool = False
    """Use the embedded teacher as the prior model: a larger model built (on first use) from the
    embedded base model's data and tokenizer (`base_model.teacher_*`). Only with the embedded model."""
    k: PositiveInt = 20
    """Top-k entries stored per scored position."""
    shard_size: PositiveInt = 256
    """Examples per Parquet shard (the unit of resumption and of fan-out)."""
    batch_tokens: PositiveInt = 8192
    """hf engine: padded tokens per forward batch."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Prior model precision; auto is float32 on CPU (vLLM matches transformers to 4e-6 there),
    bfloat16 on GPU."""
    device: DeviceName = "auto"
    """hf engine device: auto (cuda if available), cpu, cuda, cuda:1, ..."""
    tensor_parallel_size: PositiveInt = 1
    """vllm engine: GPUs per model replica."""
    gpu_memory_utilization: OpenFraction = 0.9
    """vllm engine: share of GPU memory vLLM may take."""
    workers: PositiveInt | Literal["auto"] = "auto"
    """Capture processes on this node, each pinned to its own GPU (CUDA_VISIBLE_DEVICES=i); `auto`:
    one per visible GPU, a single in-process capture on CPU. `target-sft priors`, `target-sft run`
    and the flows all fan out this way."""
    num_workers: PositiveInt = 1
    """Workers sharing this capture; worker i computes shards i, i+n, i+2n, ... (set by the fan-out,
    or by hand for workers on several nodes)."""
    worker_index: NonNegativeInt = 0
    """This worker's index in [0, num_workers)."""


@dataclass
class TargetConfig:
    """The Q-target a run trains toward (docs/design.md §2): a preset with its parameter, or a free
    composition of γ, π̃ and w. In YAML a bare name is a preset: `target: dft` is `{preset: dft}`."""

    SHORTHAND = "preset"  # a plain string in YAML fills this field

    preset: str | None = None
    """sft, label_smoothing, dft, beyond_log, profit, eaft, sft_kl, asft, kd, hybrid_kd or target_sft;
    None for a free composition."""
    eta: float | None = None
    """target_sft: the prior's weight in the residual p^(1−η)·π_T^η (0 is DFT, 1 distillation)."""
    lam: float | None = None
    """label_smoothing, sft_kl, asft, hybrid_kd: the smoothing or prior weight λ."""
    alpha: float | None = None
    """beyond_log: the exponent α of γ = p^α."""
    tau: float | None = None
    """profit: the threshold τ of γ = 1{p > τ}."""
    topk: int | None = None
    """eaft: the k of the top-k entropy."""
    gamma: Any = None
    """Composition: the label trust, a name (`p`), a number (constant) or a one-key mapping ({pow: 0.5})."""
    residual: Any = None
    """Composition: `uniform`, `self`, `prior` or {guided: η}."""
    weight: Any = None
    """Composition: the per-position weight, a number or {p_plus: λ} (default 1)."""
    name: str | None = None
    """Composition: the label in reports."""

    def compact(self) -> str | dict[str, Any]:
        """The shortest config form: `dft`, `{preset: target_sft, eta: 0.5}`, or the composition."""
        given = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        return self.preset if given == {"preset": self.preset} and self.preset else given


@dataclass
class TrainConfig:
    """Stage 2: training the student toward Q-targets."""

    name: Name = "run"
    """Run folder: `<storage>/runs/<name>/` (checkpoints, metrics.jsonl, final model)."""
    target: TargetConfig = field(default_factory=lambda: TargetConfig(preset="sft"))
    """The Q-target: a preset name (`sft`, `dft`, `target_sft`, ...), `{preset: target_sft, eta: 0.5}`, or
    a free composition `{gamma: ..., residual: ..., weight: ...}`; checked when the config loads."""
    tail: Literal["student_tail", "renormalize"] = "student_tail"
    """How the prior mass outside the stored top-k is treated (docs/design.md §3)."""
    prior_key: str | None = None
    """Prior set to read; None: the key this config's priors section produces."""
    batch_size: PositiveInt = 16
    """Examples per optimizer step, over all processes."""
    micro_batch_size: PositiveInt = 4
    """Examples per forward/backward on one process; accumulation = batch / (micro × processes)."""
    micro_batch_tokens: PositiveInt | None = None
    """Padded-token budget per micro-batch. Set, it replaces micro_batch_size: each process splits its
    share of a step into the fewest length-sorted micro-batches of at most this many padded tokens
    (every process runs the same number). The update is the same; only memory and padding change."""
    packing: bool = False
    """Padding-free micro-batches: each micro-batch's examples go end to end in one row, position ids
    restarting per document, so no compute is spent on padding and attention stays inside each
    document (sdpa/eager/flex masks, or flash_attention_2's varlen kernels via model.attn_implementation).
    With micro_batch_tokens, the budget then counts real tokens. The update is the same as padded."""
    group_by_length: bool = False
    """Length-grouped sampling: global batches come from mega-batches of 50 × batch_size examples
    sorted by length (similar lengths per step, little padding); the order of the steps stays random."""
    max_steps: PositiveInt = 100
    """Optimizer steps (ignored when `epochs` is set)."""
    epochs: PositiveFloat | None = None
    """Passes over the data; sets max_steps = floor(epochs × examples / batch_size) once the data is
    tokenised (the paper's recipes train 1 epoch)."""
    lr: PositiveFloat = 1e-3
    """Peak AdamW learning rate."""
    weight_decay: NonNegativeFloat = 0.0
    """AdamW weight decay."""
    warmup_steps: NonNegativeInt = 5
    """Linear warmup, then cosine decay to 10% of the peak."""
    max_grad_norm: PositiveFloat = 1.0
    """Gradient clipping (global L2 norm)."""
    seed: Seed = 0
    """Seeds the data order and everything random."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """bf16 autocast on GPU, fp32 on CPU (auto)."""
    processes: PositiveInt = 1
    """Training processes on this node (one per GPU). Above 1, `target-sft train`/`run` and the flows
    launch `torchrun --standalone --nproc-per-node <processes>`; under torchrun itself it is ignored."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun: DDP (replicated model), or FSDP2 `fully_shard` per decoder layer for
    models that do not fit on one device."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    chunk_size: PositiveInt = 1024
    """Scored tokens per chunk of the fused loss."""
    compile_loss: bool = False
    """torch.compile the fused loss's chunk step (its passes over the chunk × vocab buffer fuse into a
    few kernels; meant for GPUs). The same numbers up to float summation order; the first step
    compiles, tens of seconds."""
    loss_backend: Literal["auto", "torch", "triton"] = "torch"
    """The fused loss's implementation: `torch` (chunked; the reference and the CPU path), `triton`
    (`pipeline/triton_loss.py`, CUDA), `auto` (Triton on CUDA, torch elsewhere). Targets the kernels
    do not take run on torch. The default stays `torch` until the kernels are measured on a GPU
    (issue 23)."""
    checkpoint_every: PositiveInt = 50
    """Write a resumable checkpoint every N steps (and at the end): a Hugging Face model folder plus
    the trainer state, under `<run>/checkpoints/step-N/`; the last two are kept."""
    eval_every: NonNegativeInt = 50
    """Held-out loss every N steps (0: never)."""
    eval_examples: PositiveInt = 64
    """Held-out examples for the eval loss."""
    threads: PositiveInt = 2
    """torch CPU threads per process."""
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = field(default_factory=list)
    """Experiment trackers that get every step's metrics, the run config and the final eval report:
    `tensorboard` (built in, `<run>/tensorboard/`), `mlflow`, `wandb` (optional extras, configured by
    their own environment variables such as MLFLOW_TRACKING_URI or WANDB_PROJECT)."""


@dataclass
class EvalSetConfig:
    """One held-out set of reasoning problems for `target-sft eval`."""

    name: str
    """Label in reports (e.g. `math500`)."""
    path: str
    """Where the problems are, one per row: any form `data.path` accepts."""
    question_column: str = "question"
    """Column holding the problem text."""
    answer_column: str = "answer"
    """Column holding the reference answer (a number, a LaTeX expression, or an option letter)."""
    answer_type: Literal["numeric", "math", "choice"] = "math"
    """How answers are checked: `numeric` (exact number after `####`, or the last `\\boxed{}`),
    `math` (math-verify: `\\boxed{}`, `#### x`, LaTeX forms), `choice` (the option letter)."""
    prompt_template: str = "{question}"
    """The user turn: `{question}` is the question column, `{name}` any other column of the set (a
    dict or list column, such as options, renders as `A. ...` lines); other braces stay as written."""
    split: str | None = None
    """Split of a folder or Hub dataset; None: its only split, or `train`."""
    subset: str | None = None
    """Config name of a dataset with several."""
    limit: PositiveInt | None = None
    """Use only the first `limit` problems."""


@dataclass
class EvalConfig:
    """Evaluation: sample answers to held-out problems, verify them, report Average@n and pass@n."""

    sets: list[EvalSetConfig] = field(default_factory=list)
    """Held-out sets; empty means the embedded base model's held-out problems (numeric answers)."""
    forgetting: bool = True
    """With the embedded sets (`sets` empty): also the old skill's held-out problems, which measure
    forgetting (300 more problems per model; `make demo` leaves them to the full comparison)."""
    model_path: str | None = None
    """Model to evaluate; None means this config's trained run (`<storage>/runs/<train.name>/final`)."""
    engine: Literal["auto", "vllm", "hf"] = "auto"
    """`vllm` (offline LLM), `hf` (transformers `generate`), or `auto`: vllm wherever it imports."""
    n: PositiveInt = 4
    """Sampled completions per problem (Average@n, pass@n)."""
    temperature: NonNegativeFloat = 0.7
    """Sampling temperature of the n samples."""
    top_p: OpenFraction = 1.0
    """Nucleus sampling threshold."""
    max_new_tokens: PositiveInt = 128
    """Longest completion."""
    seed: Seed = 0
    """Seeds the sampling."""
    greedy: bool = True
    """Also decode greedily once per problem and report greedy accuracy."""
    system_prompt: str | None = None
    """Optional system turn before each problem."""
    limit: PositiveInt | None = None
    """Use only the first `limit` problems of every set (smoke runs)."""
    batch_size: PositiveInt = 64
    """hf engine: prompts per `generate` call."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Generation precision; auto is float32 on CPU, bfloat16 on GPU."""
    max_model_len: PositiveInt = 4096
    """vllm engine: longest prompt plus completion."""
    tensor_parallel_size: PositiveInt = 1
    """vllm engine: GPUs per model replica."""
    gpu_memory_utilization: OpenFraction = 0.85
    """vllm engine: share of GPU memory vLLM may take."""


@dataclass
class ExperimentConfig:
    """An experiment: capture priors once, train a grid of targets over seeds, evaluate, compare."""

    name: Name = "experiment"
    """Folder `<storage>/experiments/<name>/` (table, plot, summary); runs are `<name>-<target>-s<seed>`."""
    targets: list[Any] = field(default_factory=lambda: ["sft", "dft", {"preset": "target_sft", "eta": 0.5}])
    """The grid: presets or `{preset: ..., param: ...}` mappings; a list of values expands to one run
    per value (`{preset: target_sft, eta: [0.25, 0.5, 0.75]}`). A `train:` mapping inside an entry
    sets that run's own train settings (e.g. `{preset: sft, train: {lr: 1.0e-4}}`)."""
    seeds: list[Seed] = field(default_factory=lambda: [0])
    """Every target runs once per seed (train.seed and eval.seed)."""
    compare_to: str | None = None
    """A target label of the grid (e.g. `sft`) that every other target is compared with, paired on
    the same problems and seeds: the difference with its 95% bootstrap interval and the share of
    seeds won. None: no paired column."""
    evaluate_base: bool = True
    """Also evaluate the untrained base model, as the reference row."""
    student_profile: bool = False
    """Where the priors come from a teacher: also capture the student's own prior set (one more pass
    over the data, cached like any set) so the table shows the SFT set's γ profile under the student,
    the model whose γ = p(observed) training uses, beside the teacher's (docs/design.md §10)."""
    schedule: str | None = None
    """Cron string for the served deployment (`target-sft serve`), e.g. `0 3 * * *`."""


@dataclass
class SelectConfig:
    """`target-sft select`: the learning rate and steps, chosen once by plain SFT on a validation split
    (never the held-out problems), then used by every target of the experiment."""

    lrs: list[PositiveFloat] = field(default_factory=lambda: [3e-4, 1e-3, 3e-3])
    """Learning rates tried."""
    max_steps: list[PositiveInt] = field(default_factory=lambda: [80, 160])
    """Step counts tried (each with each learning rate)."""
    seeds: list[Seed] = field(default_factory=lambda: [0])
    """Seeds per candidate; the choice maximises the mean validation Average@n."""
    validation: EvalSetConfig | None = None
    """The validation problems; None: the embedded build's validation split. It also replaces the
    held-out examples of the training-time eval loss."""
    target: Any = "sft"
    """The target the candidates train: plain SFT (the shared settings every target uses), or another
    target (a preset or mapping, as in `experiment.targets`) to choose that objective's own lr
    (DFT's loss is 10-20x smaller than SFT's, so a shared lr can starve it)."""


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
    select: SelectConfig = field(default_factory=SelectConfig)
    """`target-sft select`: where train.lr and train.max_steps come from."""


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:  # type: ignore[assignment]
    """Build a `cls` instance from a YAML file and `key.sub=value` overrides.

    Args:
        cls: The dataclass to build.
        path: YAML file; None starts from the defaults.
        overrides: `dotted.key=value` strings; values are parsed as YAML. `section={...}` merges
            into the section instead of replacing it.

    Raises:
        ConfigError: Unreadable file, or every unknown key, wrong type and out-of-range value at
            once, each named.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml_file(Path(path))
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
        parsed = parse_yaml(value, f"override {item!r}")
        if not parents and isinstance(parsed, dict) and isinstance(target.get(leaf), dict):
            parsed = {**target[leaf], **parsed}  # `--set train={lr: 1}` changes lr, not the whole section
        target[leaf] = parsed
    errors: list[str] = []
    built = _build(cls, raw, "", errors)
    if isinstance(built, RunConfig) and not errors:  # cross-field checks need every field well-formed
        try:
            built.storage_root = resolve_root(built.storage_root)
        except ConfigError as e:
            errors.append(str(e))
        errors += cross_field_problems(built)
    if errors:
        raise ConfigError("; ".join(errors))
    return built


MAX_CONFIG_BYTES = 1 << 20


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases (a 700-byte alias bomb expands to gigabytes) and duplicate keys
    (a second `train:` section would silently replace the first)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(f"YAML aliases (*{event.anchor}) are not allowed in configs{event.start_mark}")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        duplicated = sorted({str(k) for k in keys if keys.count(k) > 1})
        if duplicated:
            raise yaml.YAMLError(f"key {duplicated[0]!r} appears twice in one mapping{node.start_mark}")
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, what: str) -> Any:
    """YAML through the strict loader; any YAML problem is a ConfigError naming `what`."""
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} is not valid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise ConfigError(f"{what} nests lists or mappings too deeply to be a config") from None


def _read_yaml_file(path: Path) -> dict[str, Any]:
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {path} is over {MAX_CONFIG_BYTES >> 20} MiB; is it really a config?")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config path {path} is a folder; give a YAML file (see configs/)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text; give a YAML file (see configs/)") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    raw = parse_yaml(text, f"config file {path}") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return raw


def target_config(value: Any, key: str = "target") -> TargetConfig:
    """A typed target from its config value (a name or a mapping); ConfigError naming `key` if malformed."""
    errors: list[str] = []
    try:
        target = _coerce(TargetConfig, value, key, errors)
    except ConfigError as e:
        errors.append(str(e))
    if errors:
        raise ConfigError("; ".join(errors))
    return cast(TargetConfig, target)


def section_problems(cls: type, raw: dict[str, Any], prefix: str) -> list[str]:
    """What `load_config` would refuse in `raw` as a `cls` section (unknown keys, types, ranges)."""
    errors: list[str] = []
    try:
        _build(cls, raw, prefix, errors)
    except ConfigError as e:
        errors.append(str(e))
    return errors


RESERVED_TEMPLATE_KWARGS = (
    "conversation", "add_generation_prompt", "continue_final_message", "tokenize", "chat_template", "padding",
    "truncation", "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
)  # fmt: skip
"""Arguments of `apply_chat_template` the pipeline sets itself on every render (data.py)."""


def template_kwargs_problems(kwargs: dict[str, Any]) -> list[str]:
    """`data.chat_template_kwargs` reach `apply_chat_template`: no reserved names, and the two it
    interprets itself (`tools`, `documents`) must be lists of mappings."""
    problems = []
    for name in sorted(set(kwargs) & set(RESERVED_TEMPLATE_KWARGS)):
        problems.append(
            f"data.chat_template_kwargs.{name}: the pipeline sets {name!r} itself on every render; remove it"
        )
    for name in ("tools", "documents"):
        value = kwargs.get(name)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, dict) for v in value)):
            problems.append(f"data.chat_template_kwargs.{name} must be a list of mappings, got {value!r:.60}")
    return problems


def cross_field_problems(cfg: RunConfig) -> list[str]:
    """Constraints between fields that no single field's type can express."""
    from pipeline.targets import from_config

    problems = []
    try:
        from_config(cfg.train.target)
    except TargetError as e:
        problems.append(f"train.target: {e}")
    bm = cfg.base_model
    if bm.hidden_size % bm.num_heads:
        problems.append(f"base_model.num_heads={bm.num_heads} must divide base_model.hidden_size={bm.hidden_size}")
    if cfg.priors.embedded_teacher and (cfg.model.path is not None or cfg.priors.model_path is not None):
        problems.append(
            "priors.embedded_teacher shares the embedded model's tokenizer: it needs model.path and "
            "priors.model_path unset; for your own model, set priors.model_path to its teacher instead"
        )
    try:
        from_config(target_config(cfg.select.target, "select.target"))
    except (ConfigError, TargetError) as e:
        problems.append(f"select.target: {e}")
    if not cfg.select.lrs or not cfg.select.max_steps or not cfg.select.seeds:
        problems.append("select.lrs, select.max_steps and select.seeds each need at least one value")
    for key in ("lrs", "max_steps", "seeds"):
        values = getattr(cfg.select, key)
        for value in sorted({v for v in values if values.count(v) > 1}):
            problems.append(f"select.{key} lists {value:g} twice; each candidate is trained once: drop one")
    if cfg.priors.engine == "vllm_server" and not cfg.priors.server_url:
        problems.append("priors.engine=vllm_server needs priors.server_url (e.g. http://localhost:8000)")
    if cfg.priors.server_url and not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", cfg.priors.server_url):
        shown = re.sub(r"//[^/@\s]*@", "//***@", cfg.priors.server_url)  # never echo a password
        problems.append(f"priors.server_url={shown!r} must be an http:// or https:// URL")
    if cfg.priors.worker_index >= cfg.priors.num_workers:
        problems.append(
            f"priors.worker_index={cfg.priors.worker_index} must be below priors.num_workers={cfg.priors.num_workers}"
        )
    if "::" in cfg.storage_root:
        problems.append(f"storage_root={cfg.storage_root!r}: '::' would chain two filesystems; rename the folder")
    problems += template_kwargs_problems(cfg.data.chat_template_kwargs)
    names = [s.name for s in cfg.eval.sets]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"eval.sets names {name!r} twice; one report would replace the other: rename one")
    for i, s in enumerate(cfg.eval.sets):
        if not re.search(r"\{[A-Za-z_][A-Za-z0-9_]*\}", s.prompt_template):
            problems.append(
                f"eval.sets[{i}].prompt_template names no column (e.g. {{question}}); every problem would get "
                "the same prompt"
            )
    return problems


def _build(cls: type[T], raw: Any, prefix: str, errors: list[str]) -> T:
    where = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    names = {f.name for f in fields}
    for key in sorted(set(raw) - names, key=str):
        section = f" in section {where!r}" if prefix else ""
        errors.append(f"unknown config key {key!r}{section}; valid keys: {sorted(names)}")
    for f in fields:
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in raw:
            errors.append(f"{where}: missing required key {f.name!r}")
    kwargs = {}
    for name, value in raw.items():
        if name not in names:
            continue
        try:
            kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}", errors)
        except ConfigError as e:
            errors.append(str(e))
    try:
        return cls(**kwargs)
    except TypeError:  # a required key is missing: already reported
        if not errors:
            raise
        return cast(T, None)


def _coerce(tp: Any, value: Any, key: str, errors: list[str]) -> Any:
    """Check (and minimally convert) `value` against the annotation `tp`; sections add to `errors`."""
    origin = get_origin(tp)
    if origin is Annotated:
        base, *checks = get_args(tp)
        value = _coerce(base, value, key, errors)
        for check in checks:
            problem = check.problem(value)
            if problem:
                raise ConfigError(f"{key}={value!r}: {problem}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str) and hasattr(tp, "SHORTHAND"):
            value = {tp.SHORTHAND: value}
        return _build(tp, value, f"{key}.", errors)  # type: ignore[arg-type]
    if origin in (Union, types.UnionType):
        if value is None and type(None) in get_args(tp):
            return None
        failures = []
        for arg in get_args(tp):
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key, errors)
            except ConfigError as e:
                failures.append(str(e))
        raise ConfigError(failures[0] if len(failures) == 1 else f"{key}: {value!r} matches no type")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = get_args(tp)
        return {_coerce(kt, k, key, errors): _coerce(vt, v, f"{key}.{k}", errors) for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (it,) = get_args(tp)
        return [_coerce(it, v, f"{key}[{i}]", errors) for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads `5e-5` (no dot) as a string
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{key}: expected {tp.__name__}, got bool {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    if tp is float and not math.isfinite(value):
        raise ConfigError(f"{key}: {value} is not a finite number")
    return value


def flatten(data: dict[str, Any], sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of `section.key` names (`data.columns.prompt`, ...)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, sep, f"{prefix}{key}{sep}"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain data (for saving next to a run)."""
    return dataclasses.asdict(config)
