"""Training across processes and process deaths: SIGKILL and resume, DDP and FSDP2 on gloo, two
"nodes" through c10d, and vLLM loading the result. Apart from tests/test_train.py so that the two
longest groups of the suite run on different workers (`--dist loadfile`)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from pipeline.entry import stages
from tests.conftest import REPO, free_port
from tests.test_train import (
    TRAIN_SCRIPT,
    args_for,
    assert_same_weights,
    cfg_for,
    eval_losses,
    losses,
    run_torchrun,
)


def test_resume_after_sigkill_gives_identical_losses(tiny_build, tmp_path):
    extra = (
        "train.target=dft",
        "train.batch_size=4",
        "train.micro_batch_size=2",
        "train.max_steps=10",
        "train.checkpoint_every=2",
        "train.name=r",
    )
    cli_args = [f"--set={a}" for a in args_for(tiny_build, tmp_path / "killed", *extra)]
    proc = subprocess.Popen(
        [sys.executable, "-c", TRAIN_SCRIPT, "train", str(REPO / "configs/worlds/model-strong.yaml"), *cli_args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    latest = tmp_path / "killed" / "runs" / "r" / "checkpoints" / "latest"
    while proc.poll() is None and not (latest.exists() and latest.read_text().strip() >= "step-000004"):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "killed" / "runs" / "r" / "final").exists()
    resumed = subprocess.run(
        [
            sys.executable,
            "-c",
            TRAIN_SCRIPT,
            "train",
            str(REPO / "configs/worlds/model-strong.yaml"),
            *cli_args,
            "--resume",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    straight = stages.train(cfg_for(tiny_build, tmp_path / "straight", *extra), progress=False)
    a, b = losses(tmp_path / "killed" / "runs" / "r"), losses(straight.parent)
    assert len(a) == len(b) == 10
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-6
    assert_same_weights(tmp_path / "killed" / "runs" / "r" / "final", straight, tol=1e-6)


def test_two_process_gloo_matches_single_process(tiny_build, captured):
    """`target-sft train --nproc 2` launches torchrun (gloo here); 0.4 epochs of 60 examples = 3 steps."""
    from pipeline.entry import cli

    extra = ("train.target={preset: target_sft, eta: 0.5}", "train.batch_size=8", "train.micro_batch_size=2")
    cli_args = [f"--set={a}" for a in args_for(tiny_build, captured, *extra, "train.epochs=0.4", "train.name=ddp")]
    assert cli.main(["train", str(REPO / "configs/worlds/model-strong.yaml"), *cli_args, "--nproc", "2"]) == 0
    single = stages.train(
        cfg_for(tiny_build, captured, *extra, "train.max_steps=3", "train.name=single"), progress=False
    )
    a, b = losses(captured / "runs" / "ddp"), losses(single.parent)
    assert len(a) == 3 and max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5
    assert_same_weights(captured / "runs" / "ddp" / "final", single, tol=1e-5)


def test_two_nodes_through_c10d_rendezvous_match_single_process(tiny_build, captured):
    """Two torchrun launchers ("nodes") meet at one c10d rendezvous endpoint, as `srun torchrun
    --nnodes 2 --rdzv-backend c10d --rdzv-endpoint HEAD:PORT` starts them (docs/bring-your-own.md "Several nodes"):
    2 nodes x 1 process on gloo train exactly as one process does."""
    extra = ("train.target={preset: target_sft, eta: 0.5}", "train.batch_size=8", "train.micro_batch_size=2")
    cli_args = [f"--set={a}" for a in args_for(tiny_build, captured, *extra, "train.max_steps=3", "train.name=nodes")]
    endpoint = f"127.0.0.1:{free_port()}"
    launchers = []
    for node in range(2):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1"]
        command += ["--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=test-job"]
        command += [f"--rdzv-conf=is_host={'true' if node == 0 else 'false'}"]  # node 0 hosts the store
        command += ["-m", "pipeline.entry.cli", "train", str(REPO / "configs/worlds/model-strong.yaml"), *cli_args]
        launchers.append(
            subprocess.Popen(
                command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
            )
        )
    try:
        outputs = [p.communicate(timeout=300)[0] for p in launchers]
    finally:
        for p in launchers:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert [p.returncode for p in launchers] == [0, 0], outputs
    single = stages.train(
        cfg_for(tiny_build, captured, *extra, "train.max_steps=3", "train.name=single"), progress=False
    )
    a, b = losses(captured / "runs" / "nodes"), losses(single.parent)
    assert len(a) == 3 and max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5
    assert_same_weights(captured / "runs" / "nodes" / "final", single, tol=1e-5)
    assert json.loads((captured / "runs" / "nodes" / "run.json").read_text())["world_size"] == 2


@pytest.mark.vllm
def test_final_model_loads_in_vllm(tiny_build, tmp_path):
    from pipeline.priors.engines import HFEngine, VLLMEngine

    final = stages.train(
        cfg_for(tiny_build, tmp_path, "train.batch_size=4", "train.micro_batch_size=4", "train.max_steps=2"),
        progress=False,
    )
    examples = stages.plan_priors(
        cfg_for(tiny_build, tmp_path, f"model.path={final}"), progress=False
    ).prepared.examples[:4]
    engine = VLLMEngine(final, k=5, max_model_len=128, dtype="float32")
    try:
        from_vllm = engine.score(examples)
    finally:
        engine.close()
    from_hf = HFEngine(final, k=5).score(examples)
    for a, b in zip(from_vllm, from_hf, strict=True):
        assert torch.allclose(torch.from_numpy(a.obs_logprob), torch.from_numpy(b.obs_logprob), atol=1e-3)


def test_two_process_fsdp2_matches_single_process_and_resumes(tiny_build, captured):
    extra = (
        "train.target={preset: target_sft, eta: 0.5}",
        "train.batch_size=8",
        "train.micro_batch_size=2",
        "train.max_steps=4",
        "train.checkpoint_every=2",
        f"data.eval_path={tiny_build.sft_heldout}",  # held-out CE under FSDP: every process runs the eval
        "train.eval_every=2",
        "train.eval_examples=6",
    )

    def torchrun(*more: str) -> None:
        cli_args = [
            f"--set={a}" for a in args_for(tiny_build, captured, *extra, "train.parallel=fsdp", "train.name=fsdp")
        ]
        launched = run_torchrun([*cli_args, *more])
        assert launched.returncode == 0, launched.stderr[-3000:]

    torchrun()
    single = stages.train(cfg_for(tiny_build, captured, *extra, "train.name=single-fsdp"), progress=False)
    a, b = losses(captured / "runs" / "fsdp"), losses(single.parent)
    assert len(a) == 4 and max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5
    assert_same_weights(captured / "runs" / "fsdp" / "final", single, tol=1e-5)
    evals = [eval_losses(captured / "runs" / "fsdp"), eval_losses(single.parent)]
    assert len(evals[0]) == 2 and max(abs(x - y) for x, y in zip(*evals, strict=True)) < 1e-5
    # resume from the step-2 checkpoint (gathered full state, re-sharded on load): same losses again
    run = captured / "runs" / "fsdp"
    (run / "checkpoints" / "latest").write_text("step-000002")
    shutil.rmtree(run / "final")
    torchrun("--resume")
    assert max(abs(x - y) for x, y in zip(losses(run), b, strict=True)) < 1e-5
    assert_same_weights(run / "final", single, tol=1e-5)
