"""The evaluation section: held-out sets and how answers are sampled."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.common.config import NonNegativeFloat, OpenFraction, PositiveInt, Seed


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
