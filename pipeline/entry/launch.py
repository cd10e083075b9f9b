"""Launching the stages on a node's GPUs: one process per GPU, output streamed line by line.

Training runs in this process, or under `torchrun --standalone` with one process per GPU. Prior
capture runs in this process, or as one `target-sft priors` worker per GPU, each seeing only its
own GPU (CUDA_VISIBLE_DEVICES) and computing every n-th shard; this process then writes the
manifest. Output goes to the terminal, or to the Prefect logs when a flow runs it, as it comes.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Any

from pipeline.common.config import load_config
from pipeline.common.errors import PriorError, TrainError
from pipeline.entry import stages
from pipeline.entry.config import RunConfig
from pipeline.entry.resolve import run_dir
from pipeline.priors import capture
from pipeline.priors.cache import PriorStore


def launch(config: str | Path | None, overrides: list[str], processes: int, resume: bool) -> Path:
    """Train under `torchrun --standalone` with `processes` local processes; returns the final model.

    Raises:
        TrainError: the processes failed; the message carries the end of their output.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    command += [
        "-m",
        "pipeline.entry.cli",
        "train",
        str(config or os.devnull),
    ]  # /dev/null: an empty YAML, the defaults
    command += [f"--set={item}" for item in overrides] + (["--resume"] if resume else [])
    proc = _start(command, os.environ)
    code, output = _stream([proc], [""])[0]
    if code != 0:
        raise TrainError(f"torchrun with {processes} processes failed (exit {code}):\n{output[-3000:]}")
    cfg = load_config(RunConfig, config, overrides)
    return run_dir(cfg) / "final"


def train_or_launch(
    cfg: RunConfig, config: str | Path | None, overrides: list[str], resume: bool, progress: bool
) -> Path:
    """Train in this process, or under torchrun when `train.processes` > 1 and this is not already a
    torchrun worker; `config` and `overrides` are what built `cfg` (torchrun's workers rebuild it)."""
    if cfg.train.processes > 1 and "WORLD_SIZE" not in os.environ:
        return launch(config, [*overrides, f"train.processes={cfg.train.processes}"], cfg.train.processes, resume)
    return stages.train(cfg, resume=resume, progress=progress)


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries."""
    import torch

    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g for g in listed.split(",") if g.strip()][: torch.cuda.device_count()]
    return [str(i) for i in range(torch.cuda.device_count())]


def capture_priors(
    cfg: RunConfig, config: str | Path | None, overrides: list[str], progress: bool
) -> capture.CaptureResult:
    """Capture (or reuse) the priors, fanned out to one worker process per GPU when there are several.

    `config` and `overrides` are what built `cfg`: each worker rebuilds it with its own
    `priors.worker_index`, and this process writes the manifest once every shard exists.
    """
    gpus = visible_gpus()
    workers = len(gpus) if cfg.priors.workers == "auto" else int(cfg.priors.workers)
    if workers <= 1 or cfg.priors.num_workers > 1:  # one process, or already one worker of a fan-out
        return stages.capture_priors(cfg, progress=progress)
    if len(gpus) < workers:
        raise PriorError(f"priors.workers={workers} but {len(gpus)} GPUs are visible; lower priors.workers")
    planned = stages.plan_priors(cfg)
    if PriorStore(cfg.storage_root).complete(planned.key):  # reuse without starting a worker per GPU
        return stages.capture_priors(cfg, progress=False, planned=planned)
    procs = []
    for i in range(workers):
        command = [sys.executable, "-m", "pipeline.entry.cli", "priors", str(config or os.devnull)]
        command += [f"--set={item}" for item in overrides]
        command += [f"--set=priors.worker_index={i}", f"--set=priors.num_workers={workers}"]
        procs.append(_start(command, {**os.environ, "CUDA_VISIBLE_DEVICES": gpus[i]}))
    results = _stream(procs, [f"[gpu {g}] " for g in gpus[:workers]])
    failed = [(i, code, out) for i, (code, out) in enumerate(results) if code != 0]
    if failed:
        i, code, out = failed[0]
        raise PriorError(f"prior worker {i} (GPU {gpus[i]}) failed (exit {code}):\n{out[-3000:]}")
    passes = sum(int(m.group(1)) for _, out in results for m in [FORWARD_PASSES.search(out)] if m)
    final = stages.capture_priors(cfg, progress=False)  # every shard exists: writes the manifest, no forward pass
    return capture.CaptureResult(final.key, final.manifest_path, passes + final.forward_passes, final.complete)


FORWARD_PASSES = re.compile(r"^forward passes: (\d+)$", re.M)


def _start(command: list[str], env: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True
    )


def _stream(procs: list[subprocess.Popen[str]], prefixes: list[str]) -> list[tuple[int, str]]:
    """Print every process's output line by line as it comes (prefixed), and wait for all of them.

    Interrupted or cancelled, it takes every process and its children down with it.
    """
    tails: list[deque[str]] = [deque(maxlen=200) for _ in procs]
    lines: queue.Queue[tuple[int, str | None]] = queue.Queue()

    def pump(i: int, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put((i, line))
        lines.put((i, None))

    threads = [threading.Thread(target=pump, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for t in threads:
        t.start()
    try:
        open_streams = len(procs)
        while open_streams:
            i, line = lines.get()
            if line is None:
                open_streams -= 1
                continue
            print(prefixes[i] + line, end="", flush=True)
            tails[i].append(line)
        return [(p.wait(), "".join(tail)) for p, tail in zip(procs, tails, strict=True)]
    except BaseException:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        raise
