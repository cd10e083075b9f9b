"""The model-weak world's numbers on this CPU (docs/design.md §7; the demo's world until issue 22,
configs/regimes/model-weak.yaml): its base model, a short Target-SFT run on its settings (priors,
fused loss, optimizer) and a few evaluation samples at the temperature its README table used (0.7),
each against a value recorded in the repo on an AMD EPYC. The demo's own base (the model-strong
world) ships with its checksum and is verified whenever it loads (pipeline/base_model.py). CI checks
them again on whatever x86 CPU it runs, so a CPU whose pinned kernels compute differently fails here
instead of silently changing the world's table
(an emulated Intel CPU does: MKL honours the pinned branch on Intel only; README "The same numbers across
x86 CPUs").

The values hold only with the pinned kernels (`make test` exports them; pipeline/cpu_kernels.py)."""

from __future__ import annotations

import hashlib
import json
import os
import platform

import pytest
from transformers import AutoModelForCausalLM

from pipeline import base_model, cpu_kernels, evaluate, priors, train
from pipeline.config import RunConfig, load_config
from tests.conftest import REPO

DEMO_BASE_WEIGHTS = "ae406570114d456fb43c284124654b06ad529484219774467e6c11145efff74b"
SHORT_RUN_WEIGHTS = "f34f1a929e226983a7aff14809f16590fa66ebb941c73b2710e4584efc911e7e"
SAMPLES = "21b6cf9a5d6fbe86270b2d6632a9f992a08f48948d9bf2354ad5b585eb59789f"


@pytest.fixture(autouse=True)
def pinned():
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the recorded values are x86 ones (the kernels are pinned to AVX2)")
    wrong = {k: os.environ.get(k) for k, v in cpu_kernels.PINNED.items() if os.environ.get(k) != v}
    assert not wrong, f"run the suite through `make test`, which pins the CPU kernels; here {wrong}"


def test_the_demo_base_model_has_the_recorded_weights(default_build):
    info = json.loads((default_build.model / base_model.SUCCESS).read_text())
    assert info["weights_sha256"] == DEMO_BASE_WEIGHTS


def _demo_config(default_build, storage, *extra: str) -> RunConfig:
    settings = [f"storage_root={storage}", f"model.path={default_build.model}", f"data.path={default_build.sft_train}"]
    world = REPO / "configs" / "regimes" / "model-weak.yaml"
    return load_config(RunConfig, world, [*settings, "eval.temperature=0.7", *extra])


def test_a_short_target_sft_run_on_the_demo_settings_gives_the_recorded_weights(default_build, tmp_path):
    cfg = _demo_config(
        default_build, tmp_path, "data.limit=64", "train.target={preset: target_sft, eta: 0.5}",
        "train.max_steps=8", "train.eval_every=0", "train.checkpoint_every=8", "train.name=short",
    )  # fmt: skip
    priors.capture(cfg, progress=False)
    final = train.train(cfg, progress=False)
    checksum = base_model.weights_checksum(AutoModelForCausalLM.from_pretrained(final))
    assert checksum == SHORT_RUN_WEIGHTS


def test_the_demo_evaluation_draws_the_recorded_samples(default_build, tmp_path):
    cfg = _demo_config(default_build, tmp_path, "eval.limit=16")
    evaluate.evaluate(cfg.eval, default_build.model, tmp_path / "eval", evaluate.embedded_sets(default_build), False)
    records = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 32 and all(len(r.pop("collapsed")) == 2 for r in records)  # 16 problems of each set
    # the file as it was recorded, before the collapse flags joined it: the same samples, drawn again
    samples = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()
    assert hashlib.sha256(samples).hexdigest() == SAMPLES
