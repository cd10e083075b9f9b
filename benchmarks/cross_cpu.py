"""Checksums of the demo's pieces on this CPU, to compare across CPUs (docs/results.md "The same numbers across
x86 CPUs"): the demo base model's weights, a short Target-SFT run on the demo's settings (priors,
fused loss, AdamW) and the demo evaluation's first 16 + 16 problems' samples; the same pieces
`tests/test_demo_reproducible.py` records for the pinned mode.

Build the base once (`target-sft world build`), then run this natively and under emulation
with the same environment, e.g. for the portable mode:

    export TARGET_SFT_CPU_KERNELS=portable MKL_CBWR=COMPATIBLE ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
    python benchmarks/cross_cpu.py STORAGE
    qemu-x86_64 -cpu Haswell .venv/bin/python benchmarks/cross_cpu.py STORAGE   # apt install qemu-user

Each run works in a fresh temporary folder; the base model is only read. Natively it takes seconds;
emulated, 3-5 minutes (the matmuls run about 100x slower).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from pipeline.common.config import load_config
from pipeline.entry import stages
from pipeline.entry.config import RunConfig
from pipeline.evaluation import evaluate
from pipeline.world import builder
from pipeline.world.config import WorldConfig

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("storage", type=Path, help="storage root holding the demo's built base model")
    parser.add_argument("--steps", type=int, default=8, help="training steps (the recorded test's: 8)")
    parser.add_argument("--problems", type=int, default=16, help="problems per eval set (the recorded test's: 16)")
    args = parser.parse_args()
    started = time.time()
    build = builder.build(WorldConfig(), args.storage, progress=False)  # reused, never rebuilt
    info = json.loads((build.model / builder.SUCCESS).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        settings = [f"storage_root={tmp}", f"model.path={build.model}", f"data.path={build.sft_train}"]
        short = [
            f"data.limit={8 * args.steps}", "train.target={preset: target_sft, eta: 0.5}",
            f"train.max_steps={args.steps}", "train.eval_every=0", f"train.checkpoint_every={args.steps}",
            "train.name=short",
        ]  # fmt: skip
        cfg = load_config(RunConfig, REPO / "configs" / "worlds" / "model-strong.yaml", [*settings, *short])
        stages.capture_priors(cfg, progress=False)
        final = stages.train(cfg, progress=False)
        run = builder.weights_checksum(AutoModelForCausalLM.from_pretrained(final))
        cfg = load_config(
            RunConfig, REPO / "configs" / "worlds" / "model-strong.yaml", [*settings, f"eval.limit={args.problems}"]
        )
        out = Path(tmp) / "eval"
        evaluate.evaluate(cfg.eval, build.model, out, builder.embedded_sets(build), False)
        samples = hashlib.sha256((out / "samples.jsonl").read_bytes()).hexdigest()
    result = {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "kernels": {k: os.environ.get(k) for k in ("TARGET_SFT_CPU_KERNELS", "MKL_CBWR", "ATEN_CPU_CAPABILITY")},
        "base_weights": info["weights_sha256"],
        "short_run_weights": run,
        "samples": samples,
        "seconds": round(time.time() - started),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
