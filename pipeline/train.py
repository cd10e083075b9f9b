"""Stage 2: train the student toward Q-targets built from cached priors and observed tokens.

One readable loop: setup (config, processes, run folder), build (data, priors, model, optimizer),
loop (micro-batches, accumulation, clipping, logging, eval, checkpoints), save (HF model).
The loss step lives in `TargetLossModel.forward` (the fused loss on hidden states: no full logits).

Multi-process: launch under `torchrun --nproc-per-node N -m pipeline.cli train CONFIG`; every
process reads only its share of each global batch, and gradients are averaged by DDP.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline import data
from pipeline.config import RunConfig, TrainConfig, load_config, to_dict
from pipeline.loss import TargetStats, fused_q_target_loss
from pipeline.prior_cache import CacheError, PriorStore
from pipeline.prior_engines import PriorRecord, aligned_prior
from pipeline.resolve import resolve_inputs
from pipeline.storage import atomic_write_text
from pipeline.targets import TargetSpec, from_config


class TrainError(ValueError):
    """The run cannot start as configured; the message says what to change."""


@dataclass
class Batch:
    """One micro-batch as tensors; labels and priors are already shifted (position t → t+1)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    prior_ids: torch.Tensor | None
    prior_logprobs: torch.Tensor | None
    prior_obs_logprob: torch.Tensor | None

    def to(self, device: str) -> Batch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(*(move(getattr(self, f)) for f in self.__dataclass_fields__))  # type: ignore[arg-type]


def collate(examples: list[data.Example], pad_id: int, priors: dict[int, PriorRecord] | None) -> Batch:
    """Right-padded tensors; prior tensors aligned with `labels[1:]` of every example."""
    longest = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full((len(examples), longest - 1), data.IGNORE, dtype=torch.long)
    prior = None
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        mask[row, :n] = 1
        labels[row, : n - 1] = torch.tensor(e.labels[1:])
        if priors is not None:
            p_ids, p_lp, p_obs = aligned_prior(priors[e.index], n)
            if prior is None:
                k = p_ids.shape[1]
                prior = (
                    torch.full((len(examples), longest - 1, k), -1, dtype=torch.long),
                    torch.full((len(examples), longest - 1, k), float("-inf")),
                    torch.zeros(len(examples), longest - 1),
                )
            prior[0][row, : n - 1], prior[1][row, : n - 1], prior[2][row, : n - 1] = p_ids, p_lp, p_obs
    return Batch(ids, mask, labels, *(prior or (None, None, None)))


class TargetLossModel(nn.Module):
    """The causal LM plus the fused Q-target loss, as one module (so DDP sees every parameter)."""

    def __init__(self, model: Any, spec: TargetSpec, tail: str, chunk_size: int) -> None:
        super().__init__()
        self.model, self.spec, self.tail, self.chunk_size = model, spec, tail, chunk_size

    def forward(self, batch: Batch, normaliser: float) -> tuple[torch.Tensor, TargetStats]:
        hidden = self.model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        hidden = hidden.last_hidden_state[:, :-1].flatten(0, 1)
        head = self.model.get_output_embeddings()
        flat = lambda t: None if t is None else t.flatten(0, 1)  # noqa: E731
        out = fused_q_target_loss(
            hidden,
            head.weight,
            batch.labels.flatten(),
            self.spec,
            prior_ids=flat(batch.prior_ids),
            prior_logprobs=flat(batch.prior_logprobs),
            prior_obs_logprob=flat(batch.prior_obs_logprob),
            bias=head.bias,
            tail=self.tail,  # type: ignore[arg-type]
            reduction="sum",
            chunk_size=self.chunk_size,
        )
        return out.loss / normaliser, out.stats


def step_batches(examples: list[data.Example], cfg: TrainConfig) -> list[list[data.Example]]:
    """Global batches for every step: seeded shuffle per epoch, each batch sorted by length.

    Sorting inside a global batch keeps its set of examples (so any micro-batch split gives the
    same update) while micro-batches of similar lengths need little padding. With
    `group_by_length`, batches are cut from length-sorted mega-batches and then shuffled.
    """
    generator = torch.Generator().manual_seed(cfg.seed)
    batches: list[list[data.Example]] = []
    while len(batches) < cfg.max_steps:
        order = torch.randperm(len(examples), generator=generator).tolist()
        if cfg.group_by_length:
            mega = 50 * cfg.batch_size
            order = [
                i
                for s in range(0, len(order), mega)
                for i in sorted(order[s : s + mega], key=lambda i: len(examples[i].input_ids))
            ]
        epoch = []
        for start in range(0, len(order) - cfg.batch_size + 1, cfg.batch_size):
            chunk = [examples[i] for i in order[start : start + cfg.batch_size]]
            epoch.append(sorted(chunk, key=lambda e: (len(e.input_ids), e.index)))
        if cfg.group_by_length:
            epoch = [epoch[i] for i in torch.randperm(len(epoch), generator=generator).tolist()]
        batches += epoch
    return batches[: cfg.max_steps]


def micro_batches(
    global_batch: list[data.Example], rank: int, world: int, cfg: TrainConfig
) -> list[list[data.Example]]:
    """This process's share of a step (every world-th example), split into micro-batches.

    By `micro_batch_size`, or by the padded-token budget `micro_batch_tokens`: then every process
    computes every share's split and all use the largest count, since FSDP needs the same number of
    forward passes on each process.
    """
    shares = [global_batch[r::world] for r in range(world)]
    if cfg.micro_batch_tokens is None:
        size = cfg.micro_batch_size
        return [shares[rank][i : i + size] for i in range(0, len(shares[rank]), size)]
    count = max(len(_split_by_tokens(share, cfg.micro_batch_tokens)) for share in shares)
    groups = _split_by_tokens(shares[rank], cfg.micro_batch_tokens)
    while len(groups) < count:  # halve the costliest group until the counts agree
        i = max(
            range(len(groups)),
            key=lambda j: len(groups[j]) * len(groups[j][-1].input_ids) if len(groups[j]) > 1 else -1,
        )
        half = len(groups[i]) // 2
        groups[i : i + 1] = [groups[i][:half], groups[i][half:]]
    return groups


def _split_by_tokens(share: list[data.Example], budget: int) -> list[list[data.Example]]:
    """Fewest contiguous groups of a length-sorted share with (size × longest) ≤ budget each."""
    groups: list[list[data.Example]] = []
    for e in share:
        if groups and (len(groups[-1]) + 1) * len(e.input_ids) <= budget:
            groups[-1].append(e)
        else:
            groups.append([e])
    return groups


def batch_shape_problem(tc: TrainConfig, world: int) -> str | None:
    """Why a step's batch cannot be split over `world` processes, or None when it can."""
    if tc.micro_batch_tokens is not None:
        if tc.micro_batch_tokens < 1 or tc.batch_size % world:
            return (
                f"train.micro_batch_tokens={tc.micro_batch_tokens} must be >= 1 and train.batch_size={tc.batch_size} "
                f"a multiple of the {world} processes"
            )
    elif tc.batch_size % (tc.micro_batch_size * world) != 0:
        return (
            f"train.batch_size={tc.batch_size} is not a multiple of micro_batch_size × processes = "
            f"{tc.micro_batch_size} × {world}; change one of them"
        )
    return None


def lr_lambda(cfg: TrainConfig) -> Any:
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return factor


def launch(config: str | Path | None, overrides: list[str], processes: int, resume: bool) -> Path:
    """Train under `torchrun --standalone` with `processes` local processes; returns the final model.

    Raises:
        TrainError: the processes failed; the message carries the end of their output.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    command += ["-m", "pipeline.cli", "train", str(config or os.devnull)]  # /dev/null: an empty YAML, the defaults
    command += [f"--set={item}" for item in overrides] + (["--resume"] if resume else [])
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate()
    except BaseException:  # interrupted or cancelled: take the launcher and every worker down with us
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    if proc.returncode != 0:
        raise TrainError(f"torchrun with {processes} processes failed (exit {proc.returncode}):\n{output[-3000:]}")
    cfg = load_config(RunConfig, config, overrides)
    return run_dir(cfg) / "final"


def train_or_launch(
    cfg: RunConfig, config: str | Path | None, overrides: list[str], resume: bool, progress: bool
) -> Path:
    """Train in this process, or under torchrun when `train.processes` > 1 and this is not already a
    torchrun worker; `config` and `overrides` are what built `cfg` (torchrun's workers rebuild it)."""
    if cfg.train.processes > 1 and "WORLD_SIZE" not in os.environ:
        return launch(config, [*overrides, f"train.processes={cfg.train.processes}"], cfg.train.processes, resume)
    return train(cfg, resume=resume, progress=progress)


def run_dir(cfg: RunConfig) -> Path:
    return Path(cfg.storage_root) / "runs" / cfg.train.name


def train(cfg: RunConfig, resume: bool = False, progress: bool = True) -> Path:
    """Train; returns the folder of the final Hugging Face model."""
    # --- setup: processes, seed, run folder ------------------------------------------------------
    tc = cfg.train
    rank, world = _init_distributed()
    torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    spec = from_config(tc.target)  # unknown presets and parameters fail here, before anything runs
    problem = batch_shape_problem(tc, world)
    if problem:
        raise TrainError(problem)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    use_bf16 = tc.precision == "bf16" or (tc.precision == "auto" and device == "cuda")
    out = run_dir(cfg)
    _check_resume(out, cfg, resume)

    # --- build: data, priors, model, optimizer -------------------------------------------------------
    inputs = resolve_inputs(cfg, progress=progress and rank == 0)
    tokenizer = AutoTokenizer.from_pretrained(inputs.model_path)
    prepared = data.prepare(cfg.data, inputs.data_path, tokenizer)
    if len(prepared.examples) < tc.batch_size:
        raise TrainError(f"{len(prepared.examples)} examples cannot fill one batch of train.batch_size={tc.batch_size}")
    if tc.epochs is not None:
        tc = dataclasses.replace(tc, max_steps=max(1, int(tc.epochs * len(prepared.examples)) // tc.batch_size))
    batches = step_batches(prepared.examples, tc)
    own = {e.index for b in batches for e in b[rank::world]}  # this process's share of every step
    priors, prior_key = _load_priors(cfg, prepared, spec, own) if spec.needs_prior else (None, None)
    heldout = _heldout_examples(cfg, inputs.heldout_path, tokenizer)
    model: Any = AutoModelForCausalLM.from_pretrained(inputs.model_path, dtype=torch.float32)
    model = model.to(device)
    if tc.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    loss_model: nn.Module = TargetLossModel(model, spec, tc.tail, tc.chunk_size)
    fsdp = world > 1 and tc.parallel == "fsdp"
    if fsdp:
        loss_model = _fully_shard(loss_model, model)
    elif world > 1:
        loss_model = nn.parallel.DistributedDataParallel(loss_model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc))
    start_step = _load_checkpoint(out, model, optimizer, scheduler, fsdp) if resume else 0
    if rank == 0:
        _write_run_info(out, cfg, prior_key, prepared.fingerprint, start_step)

    # --- loop ------------------------------------------------------------------------------------
    autocast = torch.autocast(device, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    bar = tqdm(
        range(start_step, tc.max_steps),
        desc=f"train {tc.name}",
        unit="step",
        disable=not progress or rank != 0,
        initial=start_step,
        total=tc.max_steps,
    )
    for step in bar:
        started = time.perf_counter()
        model.train()
        global_batch = batches[step]
        normaliser = float(sum(e.num_scored for e in global_batch)) / world  # DDP averages over ranks
        micro = micro_batches(global_batch, rank, world, tc)
        step_loss = torch.zeros((), dtype=torch.float64)
        stats = TargetStats(torch.zeros(5, dtype=torch.float64))
        for i, examples in enumerate(micro):
            batch = collate(examples, tokenizer.pad_token_id, priors).to(device)
            with _gradient_sync(loss_model, world, last=i == len(micro) - 1), autocast:
                loss, micro_stats = loss_model(batch, normaliser)
                loss.backward()
            step_loss += loss.detach().double().cpu() / world
            stats = stats + TargetStats(micro_stats.sums.cpu())
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:
            for t in (step_loss, stats.sums):
                dist.all_reduce(t)
        if not math.isfinite(float(step_loss)):  # the same value on every rank after the all-reduce
            raise TrainError(
                f"run {tc.name} diverged: the loss is {float(step_loss)} at step {step + 1}; lower train.lr "
                f"(now {tc.lr}) or train.max_grad_norm. The last good checkpoint is kept."
            )
        checkpoint_now = (step + 1) % tc.checkpoint_every == 0 or step + 1 == tc.max_steps
        full_state = _full_state(model, optimizer, fsdp) if checkpoint_now else None  # a collective under FSDP
        eval_now = bool(heldout) and tc.eval_every > 0 and ((step + 1) % tc.eval_every == 0 or step + 1 == tc.max_steps)
        eval_loss = None
        if eval_now and (fsdp or rank == 0):  # FSDP: every process runs the same forwards (all-gathers)
            eval_loss = evaluate_loss(loss_model, heldout, tokenizer.pad_token_id, device, tc.micro_batch_size, fsdp)
        if rank == 0:
            seconds = time.perf_counter() - started
            record = {
                "step": step + 1,
                "loss": float(step_loss),
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens_per_s": float(stats.sums[-1]) / seconds,
                **stats.means(),
            }
            if eval_loss is not None:
                record["eval_loss"] = eval_loss
            with (out / "metrics.jsonl").open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{record['loss']:.4f}", ce=f"{record['ce']:.3f}")
            if full_state is not None:
                save_checkpoint(out, step + 1, *full_state, scheduler)
        if world > 1:
            dist.barrier()

    # --- save ------------------------------------------------------------------------------------
    final = out / "final"
    model_state = _untied_for_saving(model, _full_state(model, optimizer, fsdp)[0]) if fsdp else None
    if rank == 0:
        tmp = out / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=model_state)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return final


@torch.no_grad()
def evaluate_loss(
    loss_model: nn.Module, examples: list[data.Example], pad_id: int, device: str, micro: int, fsdp: bool = False
) -> float:
    """Mean per-token held-out CE to the observed token, whatever the run's target: it compares across
    targets, and held-out examples have no cached priors anyway.

    Under FSDP every process must call this (the sharded forward all-gathers); otherwise only one
    process calls it, on the unwrapped model (a DDP forward would broadcast buffers).
    """
    module: Any = loss_model.module if isinstance(loss_model, nn.parallel.DistributedDataParallel) else loss_model
    scorer: Any = loss_model if fsdp else TargetLossModel(module.model, module.spec, module.tail, module.chunk_size)
    target, scorer.spec = scorer.spec, from_config("sft")
    module.eval()
    total = sum(e.num_scored for e in examples)
    loss = 0.0
    for i in range(0, len(examples), micro):
        value, _ = scorer(collate(examples[i : i + micro], pad_id, None).to(device), total)
        loss += float(value)
    scorer.spec = target
    module.train()
    return loss


def _init_distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def _load_priors(
    cfg: RunConfig, prepared: data.PreparedData, spec: TargetSpec, indices: set[int]
) -> tuple[dict[int, PriorRecord], str]:
    """The prior records of the examples `indices` (this process's share), after checking the set
    matches this run's inputs."""
    from pipeline import priors

    store = PriorStore(cfg.storage_root)
    key = cfg.train.prior_key or priors.plan(cfg, progress=False).key
    try:
        reader = store.open(key)
    except CacheError as e:
        raise CacheError(f"target {spec.name!r} needs priors: {e}") from None
    recorded = reader.manifest["key_inputs"]
    if recorded["tokenizer_sha256"] != prepared.tokenizer_hash:
        raise CacheError(
            f"prior set {key} was captured with a different tokenizer than the student's; "
            "the student must share the prior model's tokenizer"
        )
    expected = {
        "dataset_fingerprint": prepared.fingerprint,
        "max_length": cfg.data.max_length,
        "truncation": cfg.data.truncation,
        "k": cfg.priors.k,
    }
    mismatched = sorted(name for name, value in expected.items() if recorded.get(name) != value)
    if mismatched:
        raise CacheError(
            f"prior set {key} does not match this run ({', '.join(mismatched)} differ); "
            "capture priors for this configuration with `target-sft priors`"
        )
    return reader.load(indices), key


def _heldout_examples(cfg: RunConfig, embedded: Path | None, tokenizer: Any) -> list[data.Example]:
    """`data.eval_path` in the data's own format, else the embedded held-out problems (chat)."""
    if cfg.train.eval_every == 0 or (cfg.data.eval_path is None and embedded is None):
        return []
    path = Path(cfg.data.eval_path) if cfg.data.eval_path else embedded
    fmt = cfg.data.format if cfg.data.eval_path else "messages"
    heldout_cfg = data.DataConfig(
        **{**to_dict(cfg.data), "path": str(path), "limit": cfg.train.eval_examples, "format": fmt}
    )
    return data.prepare(heldout_cfg, cast(Path, path), tokenizer).examples


# --- checkpoints ---------------------------------------------------------------------------------


def _fully_shard(loss_model: nn.Module, model: Any) -> nn.Module:
    """FSDP2: shard every decoder layer, then the rest (embeddings, norm, head) at the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.layers:
        fully_shard(layer)
    fully_shard(loss_model)
    return loss_model


def _gradient_sync(loss_model: Any, world: int, last: bool) -> Any:
    """Synchronise gradients only on the last micro-batch of a step (DDP no_sync / FSDP2 flag)."""
    if world == 1 or last:
        if hasattr(loss_model, "set_requires_gradient_sync"):
            loss_model.set_requires_gradient_sync(True)
        return nullcontext()
    if hasattr(loss_model, "set_requires_gradient_sync"):  # FSDP2
        loss_model.set_requires_gradient_sync(False)
        return nullcontext()
    return loss_model.no_sync()


def _full_state(model: nn.Module, optimizer: Any, fsdp: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Unsharded model and optimizer state (gathered to rank 0 on CPU under FSDP)."""
    if not fsdp:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def _untied_for_saving(model: Any, state: dict[str, Any]) -> dict[str, Any]:
    """Gathered states hold tied weights twice; save_pretrained expects the output head left out."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return state
    head = model.get_output_embeddings()
    names = {f"{name}.weight" for name, module in model.named_modules() if module is head}
    return {k: v for k, v in state.items() if k not in names}


def save_checkpoint(
    out: Path, step: int, model_state: dict[str, Any], optimizer_state: dict[str, Any], scheduler: Any
) -> None:
    """Model (safetensors), optimizer/scheduler/RNG (torch.save of plain data), written atomically."""
    final = out / "checkpoints" / f"step-{step:06d}"
    tmp = out / "checkpoints" / f".step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model_state.items()}
        save_file(_untie(state), str(tmp / "model.safetensors"))
        torch.save(
            {
                "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "python_rng": random.getstate(),
                "step": step,
            },
            tmp / "trainer_state.pt",
        )
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    except (OSError, RuntimeError, SafetensorError) as e:  # e.g. no space left on device
        shutil.rmtree(tmp, ignore_errors=True)
        raise TrainError(
            f"could not write checkpoint step {step} to {out}: {e}; the previous checkpoint is intact"
        ) from e
    atomic_write_text(out / "checkpoints" / "latest", final.name)
    for old in sorted((out / "checkpoints").glob("step-*"))[:-2]:  # keep the last two
        shutil.rmtree(old, ignore_errors=True)


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage (tied embeddings): store each tensor on its own."""
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        ptr = tensor.data_ptr()
        out[name] = tensor.clone() if ptr in seen else tensor
        seen.add(ptr)
    return out


def _load_checkpoint(out: Path, model: nn.Module, optimizer: Any, scheduler: Any, fsdp: bool) -> int:
    latest = out / "checkpoints" / "latest"
    if not latest.exists():
        return 0
    folder = out / "checkpoints" / latest.read_text().strip()
    model_state = load_file(str(folder / "model.safetensors"))
    state = torch.load(folder / "trainer_state.pt", weights_only=True)  # never executes code
    if fsdp:  # every rank loads the full state and keeps its own shard
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, cast(dict[str, Any], model_state), options=options)
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)
    else:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    metrics = out / "metrics.jsonl"
    if metrics.exists():  # drop steps a killed run logged after its last checkpoint
        kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= state["step"]]
        atomic_write_text(metrics, "".join(line + "\n" for line in kept))
    return int(state["step"])


def _check_resume(out: Path, cfg: RunConfig, resume: bool) -> None:
    """A new run needs a fresh folder; a resumed one must be the same model, data and target."""
    info = out / "run.json"
    if not info.exists():
        return
    if not resume:
        raise TrainError(f"run folder {out} already exists; pass --resume to continue it or pick another train.name")
    previous = json.loads(info.read_text())["config"]
    for section, name in (
        ("model", "path"),
        ("train", "target"),
        ("train", "tail"),
        ("train", "parallel"),
        ("data", "path"),
    ):
        if previous[section][name] != to_dict(cfg)[section][name]:
            raise TrainError(
                f"cannot resume {out}: {section}.{name} was {previous[section][name]!r}, now "
                f"{to_dict(cfg)[section][name]!r}; start a new run (another train.name) instead"
            )


def _write_run_info(out: Path, cfg: RunConfig, prior_key: str | None, fingerprint: str, start: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    info = {"config": to_dict(cfg), "prior_key": prior_key, "dataset_fingerprint": fingerprint, "resumed_at": start}
    atomic_write_text(out / "run.json", json.dumps(info, indent=2, default=str))
