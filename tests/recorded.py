"""Recorded arithmetic: the checksums the suite re-derives on every CI machine, by the arithmetic that
made them (docs/design.md §7; docs/results.md "The same numbers across x86 CPUs").

- **Portable** values (`TARGET_SFT_CPU_KERNELS=portable`: MKL's COMPATIBLE branch and fused AdamW)
  hold on every x86 CPU measured, Intel and AMD, so every machine checks them.
- **Pinned** values (the default mode) hold on one CPU kind only: oneMKL honours `MKL_CBWR=AVX2` on
  Intel processors and runs its own branch elsewhere. One entry per CPU kind really measured
  (`cpu_kernels.cpu_kind()`); a kind with no entry checks the portable value instead, so no machine
  checks nothing.

The pieces: the TINY build (tests/conftest.py), an 8-step Target-SFT run on the model-weak world's
settings (priors, fused loss, AdamW) and 16 + 16 evaluation problems' samples at temperature 0.7.

Run as `python -m tests.recorded STORAGE` (with the variables of a mode exported) to print the last
two pieces' checksums on this CPU; STORAGE holds (or gets) the model-weak world's shipped base.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

from pipeline.common import cpu_kernels
from pipeline.entry import stages
from pipeline.world import builder

REPO = Path(__file__).resolve().parent.parent

PORTABLE = {
    # On this project's AMD EPYC machines and under QEMU's Intel Haswell and AMD EPYC-Rome (sessions
    # 6-8), and on a real Intel Xeon with AVX-512 (issue 30).
    "tiny_build": "ec59bfb880a0f87114da5f6256b20f644071b6613c346462f9cc0022d90e1fb4",
    # Measured on an AMD EPYC (Zen 3, AVX2), 2026-12-07, from the shipped (pinned-built) base.
    "short_run": "26ae90db874fdcedcf0182e4f1effcf4a466078d835a9d38bd5aecf90c80c2ff",
    "samples": "21b6cf9a5d6fbe86270b2d6632a9f992a08f48948d9bf2354ad5b585eb59789f",
}

_AMD = {
    "tiny_build": "f25984998809c4c206457bcf197e32528e61f2ccf269b892420ecfd97d8421dd",
    "short_run": "f34f1a929e226983a7aff14809f16590fa66ebb941c73b2710e4584efc911e7e",
    "samples": "21b6cf9a5d6fbe86270b2d6632a9f992a08f48948d9bf2354ad5b585eb59789f",
}
PINNED = {
    # AMD EPYC with AVX-512 and AVX512-BF16 (Zen 4): sessions 1-8.
    "AuthenticAMD/avx512": _AMD,
    # AMD EPYC family 25 model 1 (Zen 3, AVX2, no AVX-512): the same three values, 2026-12-07.
    "AuthenticAMD/avx2": _AMD,
    # Intel Xeon @ 2.80 GHz (AVX-512 F/BW/VL/VNNI, 2 cores): a fresh clone at 3fdcc32 (issue 30). The
    # samples are text, so the rounding that moves the weights did not change them.
    "GenuineIntel/avx512": {
        "tiny_build": "d383f72e20a2c7d7429dedae60fc4c30d3d2ed026c07088bf37376529e24e45c",
        "short_run": "9923a317ca430714b33f1274aba9a94fc125851e54d73dcefff56143369a30b7",
        "samples": "21b6cf9a5d6fbe86270b2d6632a9f992a08f48948d9bf2354ad5b585eb59789f",
    },
}


def expected(piece: str, kind: str | None = None) -> tuple[str, str]:
    """(mode, checksum) that this CPU kind checks for `piece` in the pinned test: its own pinned value
    where one was measured, else the portable one."""
    values = PINNED.get(kind or cpu_kernels.cpu_kind())
    return ("pinned", values[piece]) if values else ("portable", PORTABLE[piece])


def mode_env(mode: str) -> dict[str, str]:
    """The variables a fresh process needs to run in `mode` (MKL reads them when it loads)."""
    return {**cpu_kernels.PINNED} if mode == "pinned" else {**cpu_kernels.PORTABLE, cpu_kernels.MODE: "portable"}


def short_run(build: builder.WorldPaths, storage: Path) -> str:
    """Weights checksum of an 8-step Target-SFT run (η 0.5) on 64 SFT examples of the model-weak world."""
    from transformers import AutoModelForCausalLM

    cfg = _config(
        build, storage, "data.limit=64", "train.target={preset: target_sft, eta: 0.5}",
        "train.max_steps=8", "train.eval_every=0", "train.checkpoint_every=8", "train.name=short",
    )  # fmt: skip
    stages.capture_priors(cfg, progress=False)
    final = stages.train(cfg, progress=False)
    return builder.weights_checksum(AutoModelForCausalLM.from_pretrained(final))


def samples(build: builder.WorldPaths, storage: Path) -> str:
    """sha256 of the base's samples on the first 16 problems of each evaluation set (the file as it was
    recorded, before the collapse flags joined it)."""
    from pipeline.evaluation import evaluate

    cfg = _config(build, storage, "eval.limit=16")
    evaluate.evaluate(cfg.eval, build.model, storage / "eval", builder.embedded_sets(build), False)
    records = [json.loads(line) for line in (storage / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 32 and all(len(r.pop("collapsed")) == 2 for r in records)
    return hashlib.sha256("".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()).hexdigest()


def _config(build: builder.WorldPaths, storage: Path, *extra: str):
    from pipeline.common.config import load_config
    from pipeline.entry.config import RunConfig

    settings = [f"storage_root={storage}", f"model.path={build.model}", f"data.path={build.sft_train}"]
    world = REPO / "configs" / "worlds" / "model-weak.yaml"
    return load_config(RunConfig, world, [*settings, "eval.temperature=0.7", *extra])


if __name__ == "__main__":
    from pipeline.world.config import WorldConfig

    built = builder.build(WorldConfig(), sys.argv[1], progress=False)  # the model-weak world, shipped
    with tempfile.TemporaryDirectory() as tmp:
        pieces = {"short_run": short_run(built, Path(tmp)), "samples": samples(built, Path(tmp))}
    print(json.dumps({**pieces, "arithmetic": cpu_kernels.arithmetic()}))
