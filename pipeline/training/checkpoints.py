"""Checkpoints and the run folder's resume contract (docs/design.md §5).

A checkpoint `<run>/checkpoints/step-N/` is a Hugging Face model folder (vLLM and transformers load
it directly, in the training dtype) plus the trainer state (optimizer, scheduler, every process's
RNG state) as safetensors and a JSON skeleton, so loading it never executes code, and
`checkpoint.json` (sha256 and size of every file). Digests are computed while writing and while
reading (`tensorfiles`), so a save reads nothing back and a resume reads each byte once. It is
written under a temporary name and renamed into place; the last two are kept, and resume takes the
newest one that reads back as written.

Resume is strict: the resolved training config, the dataset fingerprint and the prior key must be
the recorded ones, except `RESUME_MAY_CHANGE`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn

from pipeline.common import cpu_kernels
from pipeline.common.config import flatten, rename_sections
from pipeline.common.errors import ConfigError, TrainError
from pipeline.common.storage import atomic_write_text, lock_file, sha256_file
from pipeline.common.tensorfiles import Damaged, join_tree, load_tensors, save_tensors, split_tree
from pipeline.training.config import TrainJob

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
STATE_TENSORS = "trainer_state.safetensors"  # optimizer moments, RNG states: tensors of the trainer state
STATE_SKELETON = "trainer_state.json"  # the rest of it (steps, lrs, scheduler), naming those tensors


def full_state(model: nn.Module, optimizer: Any, fsdp: bool) -> tuple[dict[str, Any], dict[str, Any]]:
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


def untied_for_saving(model: Any, state: dict[str, Any]) -> dict[str, Any]:
    """Gathered states hold tied weights twice; save_pretrained expects the output head left out."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return state
    head = model.get_output_embeddings()
    names = {f"{name}.weight" for name, module in model.named_modules() if module is head}
    return {k: v for k, v in state.items() if k not in names}


def rng_states(world: int) -> list[dict[str, Any]]:
    """Every process's RNG states, gathered (a collective), so a resumed run draws what it would have."""
    mine = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        mine["cuda"] = torch.cuda.get_rng_state()
    if world == 1:
        return [mine]
    states: list[Any] = [None] * world
    dist.all_gather_object(states, mine)
    return states


def save_checkpoint(
    out: Path,
    step: int,
    model: Any,
    tokenizer: Any,
    model_state: dict[str, Any],
    optimizer_state: dict[str, Any],
    scheduler: Any,
    rng: list[dict[str, Any]] | None,
) -> None:
    """A Hugging Face model folder (vLLM and transformers load it directly, in the training dtype) plus
    the trainer state (optimizer, scheduler, every rank's RNG) and `checkpoint.json` (sha256 and size
    of every file), written under a temporary name and renamed into place. The weights and the
    trainer state are hashed as they are written, so nothing is read back (`tensorfiles`)."""
    final = out / "checkpoints" / f"step-{step:06d}"
    tmp = out / "checkpoints" / f".step-{step:06d}.tmp"
    try:  # created inside the try: a Ctrl-C right after mkdir still reaches the cleanup below
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        weights = untied_for_saving(model, model_state)
        files = {WEIGHTS: save_tensors(weights, tmp / WEIGHTS)}
        trainer_state = {"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": rng, "step": step}
        skeleton, tensors = split_tree(trainer_state)
        files[STATE_TENSORS] = save_tensors(tensors, tmp / STATE_TENSORS)
        blob = json.dumps(skeleton).encode()
        (tmp / STATE_SKELETON).write_bytes(blob)
        files[STATE_SKELETON] = {"sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob)}
        _save_config(model, weights, tmp)
        tokenizer.save_pretrained(tmp)
        for small in sorted(tmp.iterdir()):  # config and tokenizer files: kilobytes, hashed after writing
            if small.is_file() and small.name not in files:
                files[small.name] = {"sha256": sha256_file(small), "size": small.stat().st_size}
        manifest = {"step": step, "files": dict(sorted(files.items()))}
        atomic_write_text(tmp / "checkpoint.json", json.dumps(manifest, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    except (OSError, RuntimeError, TypeError) as e:  # e.g. no space left on device
        raise TrainError(
            f"could not write checkpoint step {step} to {out}: {e}; the previous checkpoint is intact"
        ) from e
    finally:  # also on Ctrl-C: a half-written checkpoint never stays behind
        shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_text(out / "checkpoints" / "latest", final.name)
    for old in sorted((out / "checkpoints").glob("step-*"))[:-2]:  # keep the last two
        shutil.rmtree(old, ignore_errors=True)


def _save_config(model: Any, weights: dict[str, Any], folder: Path) -> None:
    """The config files `save_pretrained` writes beside the weights (the weights we write ourselves)."""
    config = model.config
    config.architectures = [type(model).__name__.removeprefix("FSDP")]
    floating = [t.dtype for t in weights.values() if t.is_floating_point()]
    if floating:
        config.dtype = str(floating[0]).split(".")[1]
    config.save_pretrained(folder)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)


def read_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights and trainer state of one checkpoint, each byte read once: sizes are checked
    first, and the digests of the files a resume loads are computed while they are read.

    Raises:
        Damaged: a file is missing, unlisted, of another size or changed; or the checkpoint was
            written by an older version (a pickled `trainer_state.pt`).
    """
    try:
        manifest = json.loads((folder / "checkpoint.json").read_text())
        if "files" not in manifest and "trainer_state.pt" in manifest.get("sha256", {}):
            raise Damaged("written by an older target-sft (trainer_state.pt); resume it with that version")
        files = manifest["files"]
        present = {p.name for p in folder.iterdir() if p.is_file() and p.name != "checkpoint.json"}
        missing = sorted({WEIGHTS, STATE_TENSORS, STATE_SKELETON} - set(files))
        unlisted = sorted(present - set(files))
        if missing or unlisted:
            raise Damaged(f"checkpoint.json does not cover {unlisted or missing}")
        for name, entry in files.items():
            size = (folder / name).stat().st_size
            if size != entry["size"]:
                raise Damaged(f"{name} has {size} bytes, checkpoint.json says {entry['size']}")
        blob = (folder / STATE_SKELETON).read_bytes()
        if hashlib.sha256(blob).hexdigest() != files[STATE_SKELETON]["sha256"]:
            raise Damaged(f"{STATE_SKELETON} does not match its checksum")
        state = join_tree(json.loads(blob), load_tensors(folder / STATE_TENSORS, files[STATE_TENSORS]))
        return load_tensors(folder / WEIGHTS, files[WEIGHTS]), state
    except Damaged:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise Damaged(f"unreadable ({type(e).__name__}: {e})") from None


def verify_checkpoint(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be trusted (missing, unlisted or changed file), or None."""
    try:
        read_checkpoint(folder)
    except Damaged as e:
        return str(e)
    return None


def good_checkpoints(out: Path) -> Iterator[tuple[Path, dict[str, torch.Tensor], dict[str, Any]]]:
    """The checkpoints that read back as written, newest first, with their weights and trainer
    state; a truncated, changed or older-format one is skipped, with a warning."""
    for folder in sorted((out / "checkpoints").glob("step-*"), reverse=True):
        try:
            yield folder, *read_checkpoint(folder)
        except Damaged as e:
            log.warning("checkpoint %s is unusable (%s); trying the one before it", folder, e)


def newest_good_checkpoint(out: Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]] | None:
    """The newest checkpoint that reads back as written (`good_checkpoints`), or None."""
    return next(good_checkpoints(out), None)


def misfit(folder: Path, model: nn.Module, optimizer: Any, model_state: dict[str, Any], state: dict[str, Any],
           world: int, fsdp: bool) -> str | None:  # fmt: skip
    """Why a checkpoint whose files verify still cannot be loaded into this run (a trainer state
    written for another model, optimizer or world size; a step that is not its folder's), or None.
    Checked before anything is loaded, so a misfit leaves the model and optimizer untouched."""
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or folder.name != f"step-{step:06d}":
        return f"its trainer state says step {str(step)[:20]}, its folder {folder.name}"
    rng = state.get("rng")
    if not isinstance(rng, list) or len(rng) != world or not all(isinstance(r, dict) for r in rng):
        return f"it holds RNG states for {len(rng) if isinstance(rng, list) else 'no'} processes, this run has {world}"
    for r in rng:
        torch_rng = r.get("torch")
        if not isinstance(torch_rng, torch.Tensor) or torch_rng.shape != torch.get_rng_state().shape:
            return "its torch RNG state is not one this torch can restore"
        try:
            random.Random().setstate(_as_tuple(r.get("python")))
        except (TypeError, ValueError) as e:
            return f"its Python RNG state cannot be restored ({e})"
    if not isinstance(state.get("scheduler"), dict) or not isinstance(state.get("optimizer"), dict):
        return "it has no scheduler or optimizer state"
    count = state["scheduler"].get("last_epoch")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        return f"its scheduler's step count is {str(count)[:20]}"
    if fsdp:  # sharded state: set_*_state_dict check it as they load
        return None
    own = model.state_dict()
    theirs = _retied(model, dict(model_state))
    if set(own) != set(theirs):
        return f"its weights name {len(set(theirs) ^ set(own))} tensors this model does not have, or lack them"
    for name, tensor in own.items():
        if not isinstance(theirs[name], torch.Tensor) or theirs[name].shape != tensor.shape:
            return (
                f"its {name} has shape {tuple(getattr(theirs[name], 'shape', ()))}, the model's {tuple(tensor.shape)}"
            )
    saved, fresh = state["optimizer"], optimizer.state_dict()
    groups = saved.get("param_groups")
    if not isinstance(groups, list) or [len(g.get("params", [])) for g in groups if isinstance(g, dict)] != [
        len(g["params"]) for g in fresh["param_groups"]
    ]:
        return "its optimizer state is for other parameter groups"
    shapes = [p.shape for group in optimizer.param_groups for p in group["params"]]
    for index, entry in (saved.get("state") or {}).items():
        if not isinstance(entry, dict) or not str(index).isdigit() or int(index) >= len(shapes):
            return "its optimizer state names parameters this model does not have"
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != shapes[int(index)]:
                return f"its optimizer {key} for parameter {index} has shape {tuple(value.shape)}"
    return None


def _as_tuple(value: Any) -> Any:
    """Python's RNG state as JSON gives it back (lists) → the tuples random.setstate takes."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list) else value


def load_checkpoint(out: Path, model: nn.Module, optimizer: Any, scheduler: Any, fsdp: bool, rank: int) -> int:
    """Load the newest checkpoint that verifies and fits this run (`misfit`), falling back to the one
    before it with a warning; returns its step (0: none to resume).

    Raises:
        TrainError: checkpoints exist and none of them verifies and fits.
    """
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    found = None
    for folder, model_state, state in good_checkpoints(out):
        problem = misfit(folder, model, optimizer, model_state, state, world, fsdp)
        if problem is None:
            found = folder, model_state, state
            break
        log.warning("checkpoint %s does not fit this run (%s); trying the one before it", folder, problem)
    if found is None:
        if list((out / "checkpoints").glob("step-*")):
            raise TrainError(f"no checkpoint of {out} verifies and fits this run; start a new run (another train.name)")
        return 0
    folder, model_state, state = found
    log.info("resuming %s from %s", out, folder.name)
    model_state = _retied(model, model_state)
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
    rng = state["rng"][rank]
    torch.set_rng_state(rng["torch"])
    random.setstate(_as_tuple(rng["python"]))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    metrics = out / "metrics.jsonl"
    if metrics.exists() and rank == 0:  # drop steps a killed run logged after its last checkpoint
        kept = [line for line in metrics.read_text().splitlines() if _logged_step(line) <= state["step"]]
        atomic_write_text(metrics, "".join(line + "\n" for line in kept))
    return int(state["step"])


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; a damaged line (a crash mid-write, an edit) counts as after
    every checkpoint, so resume drops it."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        log.warning("metrics.jsonl: dropping a damaged line %r", line[:80])
        return math.inf


def _retied(model: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """save_pretrained leaves a tied output head out of the file; point it back at the embeddings."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return state
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    names = {module: f"{name}.weight" for name, module in model.named_modules() if module in (head, embeddings)}
    state.setdefault(names[head], state[names[embeddings]])
    return state


# Settings a resumed run may change: when to stop, log, evaluate and checkpoint, and where to report.
# Everything else that shapes the updates (lr, data, target, seed, batch shape, ...) must stay.
RESUME_MAY_CHANGE = {
    "train.max_steps",
    "train.epochs",
    "train.eval_every",
    "train.checkpoint_every",
    "train.eval_examples",
    "train.threads",
    "train.report_to",
    "train.prior_key",  # compared as the resolved key instead (_check_resumed_inputs)
}


# Sections that do not shape training: evaluation, the experiment grid, and how priors are computed
# (the prior set itself is compared by key).
RESUME_IGNORES = ("storage_root", "eval", "experiment", "priors")


@contextlib.contextmanager
def run_lock(out: Path, held: bool = True) -> Iterator[None]:
    """Hold `<runs>/.<name>.lock` for a run's whole life, so two `train` (or `--resume`) of one run
    cannot interleave their steps in one folder. Only rank 0 holds it (`held`); the lock goes with
    the process, however it ends. `storage gc` never removes a run whose lock is held.

    Raises:
        TrainError: another process holds it.
    """
    if not held:
        yield
        return
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        handle = lock_file(out.parent / f".{out.name}.lock", wait=False)
    except OSError as e:
        raise TrainError(f"cannot create the run folder {out}: {e.strerror}; check storage_root") from None
    if handle is None:
        raise TrainError(
            f"run {out.name!r} is being trained by another process right now ({out}); wait for it to finish, "
            "or pick another train.name"
        )
    with handle:
        yield


def check_resume(job: TrainJob, resume: bool) -> dict[str, Any] | None:
    """A new run needs a fresh folder; a resumed one must have the same resolved training config.

    Returns the previous run.json when resuming, None for a new run.
    """
    out = job.out
    info = out / "run.json"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainError(f"cannot create the run folder {out}: {e.strerror}; check storage_root") from None
    if not info.exists():
        if resume:
            raise TrainError(f"--resume: there is no run {job.train.name!r} at {out}; drop --resume to start it")
        if out.exists() and any(out.iterdir()):
            raise TrainError(f"{out} exists and is not a run of this project (no run.json); pick another train.name")
        return None
    if not resume:
        raise TrainError(f"run folder {out} already exists; pass --resume to continue it or pick another train.name")
    try:
        previous = json.loads(info.read_text())
        rename_sections(previous["config"], str(info))  # a run started before a section's rename
        before, now = flatten(previous["config"]), flatten(job.config)
    except (ValueError, KeyError, TypeError, AttributeError, ConfigError):
        raise TrainError(
            f"{info} is damaged (not the JSON a run writes), so what the run was cannot be checked; "
            "start a new run (another train.name)"
        ) from None
    # A field added after the run started is not recorded in its run.json; at its default it
    # means what the run did (world.own_style_share=0.0 builds the same world), so it is no change.
    defaults = flatten(job.defaults)
    added_at_default = {k for k in now.keys() - before.keys() if k in defaults and now[k] == defaults[k]}
    differ = sorted(
        key
        for key in (before.keys() | now.keys()) - added_at_default
        if key not in RESUME_MAY_CHANGE and not key.startswith(RESUME_IGNORES) and before.get(key) != now.get(key)
    )
    if differ:
        changes = "; ".join(f"{k} was {before.get(k)!r}, now {now.get(k)!r}" for k in differ)
        raise TrainError(
            f"cannot resume {out}: {changes}. Only {sorted(RESUME_MAY_CHANGE - {'train.prior_key'})} may change "
            "on resume; start a new run (another train.name) instead"
        )
    return previous


def check_resumed_inputs(out: Path, previous: dict[str, Any], fingerprint: str, prior_key: str | None) -> None:
    """The data and the prior set a resumed run reads must be the ones it started with."""
    for name, now in (("dataset_fingerprint", fingerprint), ("prior_key", prior_key)):
        if previous.get(name) != now:
            raise TrainError(
                f"cannot resume {out}: its {name} was {previous.get(name)!r}, now {now!r} (the data or priors "
                "under the same paths changed); start a new run (another train.name) instead"
            )


def write_run_info(
    out: Path,
    config: dict[str, Any],
    prior_key: str | None,
    prepared: Any,
    start: int,
    device: str,
    world: int,
    prior: dict[str, Any] | None = None,
) -> None:
    """run.json: the resolved config, what the data came to, the prior set and who made it, and where
    it ran (device, processes over all nodes, arithmetic)."""
    info = {
        "config": config,
        "prior_key": prior_key,
        "prior": prior,
        "dataset_fingerprint": prepared.fingerprint,
        "data_counts": prepared.counts(),
        "device": device,
        "world_size": world,
        "resumed_at": start,
        "arithmetic": cpu_kernels.arithmetic(),  # which numbers are comparable (docs/design.md §7)
    }
    atomic_write_text(out / "run.json", json.dumps(info, indent=2, default=str))
    log.info("run %s: %s, data %s", out, f"resumed at step {start}" if start else "new", prepared.counts())
