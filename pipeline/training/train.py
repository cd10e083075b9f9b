"""Stage 2: train the student toward Q-targets built from cached priors and observed tokens.

One readable loop: setup (config, processes, run folder), build (data, priors, model, optimizer),
loop (micro-batches, accumulation, clipping, logging, eval, checkpoints), save (HF model).
The loss step lives in `TargetLossModel.forward` (the fused loss on hidden states: no full logits).

Multi-process: launch under `torchrun --nproc-per-node N -m pipeline.entry.cli train CONFIG` (or
`train.processes`, see `pipeline.entry.launch`); every process reads only its share of each global
batch, and gradients are averaged by DDP or FSDP2. Batching lives in `pipeline.training.batching`,
checkpoints and the resume contract in `pipeline.training.checkpoints`.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import logging
import math
import os
import random
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from pipeline.common import cpu_kernels
from pipeline.common.config import to_dict
from pipeline.common.devices import check_attention
from pipeline.common.errors import CacheError, DivergedError, TrackingError, TrainError
from pipeline.common.models import load_model, load_model_config, load_tokenizer, pad_id
from pipeline.common.prior_schema import PriorRecord
from pipeline.common.storage import atomic_write_text, write_sums
from pipeline.core.loss import TargetStats, fused_q_target_loss
from pipeline.core.targets import TargetSpec, from_config
from pipeline.data import sources
from pipeline.data.config import DataConfig
from pipeline.data.tokens import Example
from pipeline.priors.cache import PriorStore
from pipeline.priors.engines import drop_ids_beyond
from pipeline.training import diagnostics
from pipeline.training.batching import Batch, batch_shape_problem, collate, collate_for, micro_batches, step_batches
from pipeline.training.checkpoints import (
    check_resume,
    check_resumed_inputs,
    full_state,
    load_checkpoint,
    rng_states,
    run_lock,
    save_checkpoint,
    untied_for_saving,
    write_run_info,
)
from pipeline.training.config import TrainConfig, TrainJob
from pipeline.training.schedule import warmup_cosine
from pipeline.training.tracking import Trackers

log = logging.getLogger(__name__)


class TargetLossModel(nn.Module):
    """The causal LM plus the fused Q-target loss, as one module (so DDP sees every parameter)."""

    def __init__(
        self, model: Any, spec: TargetSpec, tail: str, chunk_size: int, compiled: bool = False, backend: str = "torch"
    ) -> None:
        super().__init__()
        self.model, self.spec, self.tail, self.chunk_size, self.compiled = model, spec, tail, chunk_size, compiled
        self.backend = backend

    def forward(self, batch: Batch, normaliser: float) -> tuple[torch.Tensor, TargetStats]:
        hidden = self.model.base_model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,  # a cache would also turn off transformers' packed-sequence masks
        )
        hidden = hidden.last_hidden_state[:, :-1].flatten(0, 1)
        head = self.model.get_output_embeddings()
        out = fused_q_target_loss(
            hidden,
            head.weight,
            batch.labels.flatten(),
            self.spec,
            prior=None if batch.prior is None else batch.prior.map(lambda t: t.flatten(0, 1)),
            bias=head.bias,
            tail=self.tail,  # type: ignore[arg-type]
            reduction="sum",
            chunk_size=self.chunk_size,
            compiled=self.compiled,
            backend=self.backend,  # type: ignore[arg-type]
        )
        return out.loss / normaliser, out.stats


def train(job: TrainJob, resume: bool = False, progress: bool = True) -> Path:
    """Train; returns the folder of the final Hugging Face model. From the whole run config:
    `pipeline.entry.stages.train`."""
    with run_lock(job.out, held=os.environ.get("RANK", "0") == "0"):
        final = _train_loop(job, resume, progress)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_initialized():  # the group _init_distributed joined
        # Only now, with the loop's frame gone: FSDP modules hold pending gloo work, and freed at
        # interpreter exit instead it can abort the process ("terminate called without an active
        # exception", pytorch#179291).
        gc.collect()
        dist.destroy_process_group()
    return final


def _setup_process(job: TrainJob) -> tuple[int, int, str, TargetSpec]:
    """Join the process group, seed, and check what can be checked before anything is loaded:
    (rank, world size, device, the target)."""
    tc = job.train
    rank, world, device = _init_distributed()
    torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    spec = from_config(tc.target)  # unknown presets and parameters fail here, before anything runs
    check_attention(job.model.attn_implementation)
    if tc.loss_backend == "triton" and device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise TrainError(f"train.loss_backend=triton needs a CUDA device (this run is on {device}); use torch or auto")
    if problem := batch_shape_problem(tc, world):
        raise TrainError(problem)
    return rank, world, device, spec


def _start_trackers(job: TrainJob, rank: int, new_run: bool) -> Trackers:
    """The experiment trackers (rank 0 only), started before run.json is written: a tracker that
    cannot start leaves no half-made new run behind."""
    try:
        return Trackers(job.train.report_to if rank == 0 else [], job.out, job.train.name, job.config)
    except TrackingError:
        if new_run and rank == 0:
            shutil.rmtree(job.out, ignore_errors=True)  # nothing in it predates this process (its lock is held)
        raise


def _train_loop(job: TrainJob, resume: bool, progress: bool) -> Path:
    """Setup, build, the loop and the save: everything one training process does."""
    # --- setup: processes, seed, run folder ------------------------------------------------------
    tc = job.train
    rank, world, device, spec = _setup_process(job)
    out, final = job.out, job.out / "final"
    previous = check_resume(job, resume)

    # --- build: data, priors, model, optimizer -------------------------------------------------------
    tokenizer = load_tokenizer(job.model_path, job.model.trust_remote_code)
    prepared, tc, batches = _plan_steps(job, tokenizer)
    own = {e.index for b in batches for e in b[rank::world]}  # this process's share of every step
    priors, prior_key, prior_info = _load_priors(job, prepared, spec, own) if spec.needs_prior else (None, None, None)
    if prior_info is not None and rank == 0:
        print(prior_provenance(prior_info))
    if previous is not None:
        check_resumed_inputs(out, previous, prepared.fingerprint, prior_key)
    to_batch = collate_for(tc, pad_id(tokenizer), priors)
    heldout = _heldout_examples(job, tokenizer)
    model, loss_model, fsdp = _build_model(job, spec, device, world)
    fused = cpu_kernels.adamw_fused(device)  # True only in the portable CPU mode
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, tc.warmup_steps, tc.max_steps))
    start_step = load_checkpoint(out, model, optimizer, scheduler, fsdp, rank) if resume else 0
    finished = start_step >= tc.max_steps and final.joinpath("config.json").exists()  # a rerun of a done run
    trackers = _start_trackers(job, rank, new_run=previous is None)  # before run.json
    if rank == 0 and not finished:
        write_run_info(out, job.config, prior_key, prepared, start_step, device, world, prior_info)

    # --- loop ------------------------------------------------------------------------------------
    use_bf16 = tc.precision == "bf16" or (tc.precision == "auto" and device == "cuda")
    autocast = torch.autocast(device, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    bar = tqdm(range(start_step, tc.max_steps), desc=f"train {tc.name}", unit="step", initial=start_step,
               total=tc.max_steps, disable=not progress or rank != 0, mininterval=5.0)  # fmt: skip
    for step in bar:
        started = time.perf_counter()
        model.train()
        micro = micro_batches(batches[step], rank, world, tc)
        normaliser = float(sum(e.num_scored for e in batches[step])) / world  # DDP averages over ranks
        with autocast:
            step_loss, stats = _forward_backward(loss_model, micro, to_batch, device, normaliser)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
        _sum_over_processes(world, step_loss, stats.sums)
        _check_finite(tc, step + 1, loss=float(step_loss), grad_norm=float(grad_norm))  # before the update
        lr = scheduler.get_last_lr()[0]
        _update(optimizer, scheduler, tc, step + 1)
        checkpoint_now = (step + 1) % tc.checkpoint_every == 0 or step + 1 == tc.max_steps
        state = full_state(model, optimizer, fsdp) if checkpoint_now else None  # a collective under FSDP
        if state is not None and not _weights_finite(state[0], world):  # finite gradients, a huge update
            _check_finite(tc, step + 1, weights=math.inf)
        rng = rng_states(world) if checkpoint_now else None  # a collective: every process's RNG state
        eval_now = bool(heldout) and tc.eval_every > 0 and ((step + 1) % tc.eval_every == 0 or step + 1 == tc.max_steps)
        record = {"step": step + 1, "loss": float(step_loss), "lr": lr, "grad_norm": float(grad_norm)}
        if eval_now and (fsdp or rank == 0):  # FSDP: every process runs the same forwards (all-gathers)
            record["eval_loss"] = evaluate_loss(
                loss_model, heldout, pad_id(tokenizer), device, tc.micro_batch_size, fsdp
            )
        if rank == 0:
            record |= {"tokens_per_s": float(stats.sums[-1]) / (time.perf_counter() - started), **stats.means()}
            _log_step(out, tc, record, trackers, bar)
            if state is not None:
                save_checkpoint(out, step + 1, model, tokenizer, *state, scheduler, rng)
        if world > 1:
            dist.barrier()

    # --- save ------------------------------------------------------------------------------------
    trackers.close()
    model_state = untied_for_saving(model, full_state(model, optimizer, fsdp)[0]) if fsdp else None
    if rank == 0 and not finished:
        _save_final(model, tokenizer, model_state, final)
        _record_diagnostics(job, prepared.examples, prior_key, device)
    if world > 1:
        dist.barrier()
    return final


def _build_model(job: TrainJob, spec: TargetSpec, device: str, world: int) -> tuple[Any, nn.Module, bool]:
    """The student in fp32 (master weights), wrapped with its loss, then in DDP or FSDP2."""
    mc, tc = job.model, job.train
    kwargs = {"attn_implementation": mc.attn_implementation} if mc.attn_implementation else {}
    model: Any = load_model(job.model_path, mc.trust_remote_code, dtype=torch.float32, **kwargs).to(device)
    if tc.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    loss_model: nn.Module = TargetLossModel(model, spec, tc.tail, tc.chunk_size, tc.compile_loss, tc.loss_backend)
    fsdp = world > 1 and tc.parallel == "fsdp"
    if fsdp:
        loss_model = _fully_shard(loss_model, model)
    elif world > 1:
        loss_model = nn.parallel.DistributedDataParallel(loss_model)
    return model, loss_model, fsdp


def _forward_backward(
    loss_model: nn.Module,
    micro: list[list[Example]],
    to_batch: Callable[[list[Example]], Batch],
    device: str,
    normaliser: float,
) -> tuple[torch.Tensor, TargetStats]:
    """One step's micro-batches, gradients accumulated (synchronised across processes on the last)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    step_loss = torch.zeros((), dtype=torch.float64)
    stats = TargetStats(torch.zeros(5, dtype=torch.float64))
    for i, examples in enumerate(micro):
        batch = to_batch(examples).to(device)
        with _gradient_sync(loss_model, world, last=i == len(micro) - 1):
            loss, micro_stats = loss_model(batch, normaliser)
            loss.backward()
        step_loss += loss.detach().double().cpu() / world
        stats = stats + TargetStats(micro_stats.sums.cpu())
    return step_loss, stats


def _plan_steps(job: TrainJob, tokenizer: Any) -> tuple[sources.PreparedData, TrainConfig, list[Any]]:
    """Tokenise the data, fix the step count (`train.epochs`) and draw every step's global batch."""
    tc = job.train
    prepared = sources.prepare(job.data, job.data_path, tokenizer, job.tokens_dir)
    if len(prepared.examples) < tc.batch_size:
        raise TrainError(f"{len(prepared.examples)} examples cannot fill one batch of train.batch_size={tc.batch_size}")
    if tc.epochs is not None:
        tc = dataclasses.replace(tc, max_steps=max(1, int(tc.epochs * len(prepared.examples)) // tc.batch_size))
    return prepared, tc, step_batches(prepared.examples, tc)


def _log_step(out: Path, tc: TrainConfig, record: dict[str, Any], trackers: Trackers, bar: Any) -> None:
    """One step's record: metrics.jsonl (standard JSON), the trackers, the bar, and every ~5% the log
    (step, loss, tokens/s, ETA; Prefect shows it in the flow logs)."""
    with (out / "metrics.jsonl").open("a") as fh:
        fh.write(json.dumps(record, allow_nan=False) + "\n")
    trackers.log(record, record["step"])
    bar.set_postfix(loss=f"{record['loss']:.4f}", ce=f"{record['ce']:.3f}", refresh=False)  # not every step in a log
    every = max(1, tc.max_steps // 20)
    if record["step"] % every and record["step"] != tc.max_steps:
        return
    rate = bar.format_dict.get("rate") or 0.0
    eta = (tc.max_steps - record["step"]) / rate if rate else float("nan")
    log.info(
        "train %s: step %d/%d, loss %.4f, %.0f tokens/s, ETA %s",
        tc.name, record["step"], tc.max_steps, record["loss"], record["tokens_per_s"],
        "?" if math.isnan(eta) else time.strftime("%H:%M:%S", time.gmtime(eta)),
    )  # fmt: skip


def _record_diagnostics(job: TrainJob, examples: list[Any], prior_key: str | None, device: str) -> None:
    """pipeline/training/diagnostics.py on the final model, into run.json's `diagnostics` (the KL term when the
    run's prior set, or the experiment's, is at hand)."""
    key, out = prior_key or job.prior_key, job.out
    records = None
    if key is not None:
        try:
            records = PriorStore(job.root).open(key).load({e.index for e in examples[: diagnostics.SLICE]})
        except CacheError as e:
            log.info("diagnostics without the KL term: %s", e)
    found = diagnostics.run_diagnostics(out / "final", examples, records, device)
    info = json.loads((out / "run.json").read_text())
    atomic_write_text(out / "run.json", json.dumps({**info, "diagnostics": found}, indent=2, default=str))
    log.info("run %s diagnostics: %s", out, found)


def _save_final(model: Any, tokenizer: Any, state: dict[str, Any] | None, final: Path) -> None:
    """The final Hugging Face folder, written beside and renamed into place."""
    tmp = final.parent / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
        write_sums(tmp)  # checked before evaluation (evaluate.evaluate, before loading)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@torch.no_grad()
def evaluate_loss(
    loss_model: nn.Module, examples: list[Example], pad_id: int, device: str, micro: int, fsdp: bool = False
) -> float:
    """Mean per-token held-out CE to the observed token, whatever the run's target: it compares across
    targets, and held-out examples have no cached priors anyway.

    Under FSDP every process must call this (the sharded forward all-gathers); otherwise only one
    process calls it, on the unwrapped model (a DDP forward would broadcast buffers). The target and
    the train mode are restored even when a forward fails: under FSDP the scorer is the live module.
    """
    module: Any = loss_model.module if isinstance(loss_model, nn.parallel.DistributedDataParallel) else loss_model
    scorer: Any = (
        loss_model
        if fsdp
        else TargetLossModel(module.model, module.spec, module.tail, module.chunk_size, backend=module.backend)
    )
    target, scorer.spec = scorer.spec, from_config("sft")
    module.eval()
    try:
        total = sum(e.num_scored for e in examples)
        loss = 0.0
        for i in range(0, len(examples), micro):
            value, _ = scorer(collate(examples[i : i + micro], pad_id, None).to(device), total)
            loss += float(value)
        return loss
    finally:
        scorer.spec = target
        module.train()


RENDEZVOUS_TIMEOUT_S = 600.0
"""How long a process waits for the others (and for collectives) before it fails with a line,
instead of torch's silent 30 minutes; `TARGET_SFT_RENDEZVOUS_TIMEOUT` (seconds) overrides it."""


def rendezvous_timeout(env: Mapping[str, str]) -> float:
    """`TARGET_SFT_RENDEZVOUS_TIMEOUT` in seconds, or RENDEZVOUS_TIMEOUT_S; NaN when it is not a
    positive number (rendezvous_problem names it)."""
    text = env.get("TARGET_SFT_RENDEZVOUS_TIMEOUT", "")
    try:
        value = float(text) if text else RENDEZVOUS_TIMEOUT_S
    except ValueError:
        return math.nan
    return value if 0 < value < math.inf else math.nan


@contextmanager
def _native_stderr_held() -> Iterator[None]:
    """c10d's C++ store logs each failed connection try with a native stack trace on file
    descriptor 2. Hold it in a file while the group forms: replayed on success, dropped on failure
    (the TrainError's one line says what went wrong)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        held.seek(0)
        os.write(2, held.read())


def rendezvous_problem(env: Mapping[str, str]) -> str | None:
    """Why torchrun's variables (`WORLD_SIZE`, `RANK`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`) cannot
    make a process group, in one line, or None; checked before `init_process_group`, which would
    otherwise wait or fail with a traceback."""
    values: dict[str, int] = {}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT"):
        if name in env:
            try:
                values[name] = int(env[name])
            except ValueError:
                return f"{name}={env[name][:40]!r} is not a whole number; launch with torchrun, which sets it"
    if math.isnan(rendezvous_timeout(env)):
        text = env["TARGET_SFT_RENDEZVOUS_TIMEOUT"][:40]
        return f"TARGET_SFT_RENDEZVOUS_TIMEOUT={text!r} is not a positive number of seconds"
    world = values.get("WORLD_SIZE", 1)
    if world < 1:
        return f"WORLD_SIZE={world}: it must be 1 or more"
    if world == 1:
        return None
    missing = [n for n in ("RANK", "MASTER_ADDR", "MASTER_PORT") if n not in env]
    if missing:
        return (
            f"WORLD_SIZE={world} is set but {', '.join(missing)} not: launch with torchrun "
            "(or train.processes), or unset WORLD_SIZE"
        )
    if not 0 <= values["RANK"] < world:
        return f"RANK={values['RANK']} is outside 0..{world - 1} (WORLD_SIZE={world})"
    if not 0 < values["MASTER_PORT"] < 65536:
        return f"MASTER_PORT={values['MASTER_PORT']} is not a TCP port"
    try:
        socket.getaddrinfo(env["MASTER_ADDR"], values["MASTER_PORT"])
    except (OSError, UnicodeError) as e:
        return f"MASTER_ADDR={env['MASTER_ADDR'][:80]!r} does not resolve ({e}); give rank 0's host name or address"
    return None


def _init_distributed() -> tuple[int, int, str]:
    """(rank, world size, device): joins torchrun's process group, one GPU per process.

    Raises:
        TrainError: torchrun's variables do not describe a group, or the group did not form within
            its timeout (`rendezvous_timeout`).
    """
    if (problem := rendezvous_problem(os.environ)) is not None:
        raise TrainError(problem)
    timeout = rendezvous_timeout(os.environ)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = 0
    if world > 1:
        if not dist.is_initialized():
            where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
            log.info("joining the process group at %s (up to %.0f s)", where, timeout)
            try:
                with _native_stderr_held():
                    dist.init_process_group(
                        "nccl" if torch.cuda.is_available() else "gloo", timeout=datetime.timedelta(seconds=timeout)
                    )
            except (RuntimeError, ValueError, OSError) as e:  # DistStoreError is a RuntimeError
                raise TrainError(
                    f"rank {os.environ['RANK']} could not join the process group at {where} within "
                    f"{timeout:g} s ({' '.join(str(e).split())[:200]}); check that every node "
                    "runs torchrun with the same --rdzv-endpoint and can reach it"
                ) from None
        rank = dist.get_rank()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":  # LOCAL_RANK: this node's n-th process (global ranks run on across nodes)
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    return rank, world, device


def _load_priors(
    job: TrainJob, prepared: sources.PreparedData, spec: TargetSpec, indices: set[int]
) -> tuple[dict[int, PriorRecord], str, dict[str, Any]]:
    """The prior records of the examples `indices` (this process's share), after checking the set
    matches this run's inputs, with ids beyond the student's rows removed; and who made the set."""
    store, key = PriorStore(job.root), job.prior_key
    if key is None:
        raise CacheError(f"target {spec.name!r} needs priors: set train.prior_key, or train through `target-sft train`")
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
        "max_length": job.data.max_length,
        "truncation": job.data.truncation,
        "k": job.prior_k,
    }
    mismatched = sorted(name for name, value in expected.items() if recorded.get(name) != value)
    if mismatched:
        raise CacheError(
            f"prior set {key} does not match this run ({', '.join(mismatched)} differ); "
            "capture priors for this configuration with `target-sft priors`"
        )
    records = reader.load(indices)
    rows = load_model_config(job.model_path, job.model.trust_remote_code).vocab_size
    info = {
        "key": key,
        "prior_model": recorded.get("prior_model"),
        "prior_role": reader.manifest.get("capture", {}).get("prior_role"),
        "engine": recorded.get("engine"),
        "k": recorded.get("k"),
        "beyond_student_rows": drop_ids_beyond(records, rows),
    }
    return records, key, info


def prior_provenance(info: dict[str, Any]) -> str:
    """One line: which model made the prior this run reads, and what of it the student cannot take."""
    model = info.get("prior_model") or {}
    engine = info.get("engine") or {}
    beyond = info["beyond_student_rows"]
    line = (
        f"prior: set {info['key']} by {model.get('name')} (sha256 {str(model.get('content_sha256'))[:12]}…, "
        f"{info.get('prior_role') or 'model'}), {engine.get('name')} {engine.get('dtype')}, top-{info.get('k')}"
    )
    if beyond["entries_dropped"]:
        line += (
            f"; {beyond['entries_dropped']} top-k entries at ids ≥ the student's {beyond['student_rows']} rows "
            f"dropped ({beyond['mass_per_position']:.2e} prior mass per position)"
        )
    return line


def _heldout_examples(job: TrainJob, tokenizer: Any) -> list[Example]:
    """`data.eval_path` in the data's own format, else the embedded held-out problems (chat)."""
    dc, embedded = job.data, job.heldout_path
    if job.train.eval_every == 0 or (dc.eval_path is None and embedded is None):
        return []
    path = Path(dc.eval_path) if dc.eval_path else embedded
    fmt = dc.format if dc.eval_path else "messages"
    heldout_cfg = DataConfig(**{**to_dict(dc), "path": str(path), "limit": job.train.eval_examples, "format": fmt})
    return sources.prepare(heldout_cfg, cast(Path, path), tokenizer, job.tokens_dir).examples


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


def _check_finite(tc: TrainConfig, step: int, **values: float) -> None:
    """Stop at the first non-finite loss, gradient norm or weight, before it reaches a checkpoint."""
    bad = {name: value for name, value in values.items() if not math.isfinite(value)}
    if bad:
        what = ", ".join(f"{name} {value}" for name, value in bad.items())
        raise DivergedError(
            f"run {tc.name} diverged: {what} at step {step}; lower train.lr (now {tc.lr}) or "
            "train.max_grad_norm. The last good checkpoint is kept."
        )


def _sum_over_processes(world: int, *tensors: torch.Tensor) -> None:
    if world > 1:
        for t in tensors:
            dist.all_reduce(t)


def _update(optimizer: Any, scheduler: Any, tc: TrainConfig, step: int) -> None:
    """The optimizer and scheduler step; an lr so large that the update overflows is a divergence."""
    try:
        optimizer.step()
    except RuntimeError as e:
        if "overflow" not in str(e):
            raise
        raise DivergedError(
            f"run {tc.name} diverged: the update overflowed at step {step} ({e}); lower train.lr (now {tc.lr})"
        ) from None
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def _weights_finite(state: dict[str, torch.Tensor], world: int) -> bool:
    """All floating weights finite (under FSDP only rank 0 holds them; the verdict is shared)."""
    ok = all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())
    flag = torch.tensor([int(ok)])
    if world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
