"""Stage 1's section: how priors are captured (engine, top-k, shards, workers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.common.config import DeviceName, NonNegativeInt, OpenFraction, PositiveFloat, PositiveInt


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
    embedded base model's data and tokenizer (`world.teacher_*`). Only with the embedded model."""
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
