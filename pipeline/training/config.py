"""Stage 2's section: the target and the optimisation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from pipeline.common.config import (
    ModelConfig,
    Name,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Seed,
    coerce,
)
from pipeline.common.errors import ConfigError
from pipeline.data.config import DataConfig


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


def target_config(value: Any, key: str = "target") -> TargetConfig:
    """A typed target from its config value (a name or a mapping); ConfigError naming `key` if malformed."""
    errors: list[str] = []
    try:
        target = coerce(TargetConfig, value, key, errors)
    except ConfigError as e:
        errors.append(str(e))
    if errors:
        raise ConfigError("; ".join(errors))
    return cast(TargetConfig, target)


@dataclass
class TrainJob:
    """What stage 2 reads: its own section, the model and data sections, and what the entry layer
    resolved (`pipeline.entry.stages.train_job`; docs/design.md §5): concrete paths, the prior key,
    and the whole config as data for run.json, the trackers and the resume check."""

    train: TrainConfig
    model: ModelConfig
    data: DataConfig
    root: str
    """The storage root: the prior cache lives under it."""
    out: Path
    """The run folder, `<root>/runs/<train.name>/`."""
    model_path: Path
    data_path: Path
    tokens_dir: Path
    """The tokenisation cache (always local: it is memory-mapped)."""
    heldout_path: Path | None
    """The embedded world's held-out problems (the eval loss when `data.eval_path` is unset), or None."""
    prior_key: str | None
    """The prior set: `train.prior_key`, else the key stage 1 computes for this config when the target
    needs a prior; None when neither."""
    prior_k: int
    """`priors.k`: the prior set must have been captured with it."""
    config: dict[str, Any]
    """The whole run config as data (`to_dict`)."""
    defaults: dict[str, Any]
    """The whole run config's defaults as data: a field added after a run started, left at its default,
    is no change on resume."""
