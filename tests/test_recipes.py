"""configs/paper/: every paper setting resolves and passes the dry run, with no model or data needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import experiment
from pipeline.config import ConfigError, RunConfig, load_config
from pipeline.errors import TargetError

PAPER = Path(__file__).resolve().parent.parent / "configs" / "paper"
MATH_MODELS = ["qwen3-1.7b", "qwen2.5-math-1.5b", "qwen2.5-math-7b"]
SETTINGS = [f"{d}-{m}" for d in ("numina", "openr1") for m in MATH_MODELS] + [
    f"m23k-{m}" for m in ("llama-3.2-3b", "llama-3.1-8b", "qwen2.5-1.5b", "qwen2.5-7b")
]


def test_one_recipe_per_paper_setting():
    assert sorted(p.stem for p in PAPER.glob("*.yaml")) == sorted(SETTINGS)


@pytest.mark.parametrize("setting", SETTINGS)
def test_recipe_dry_run(setting):
    cfg = load_config(RunConfig, PAPER / f"{setting}.yaml")
    plan = experiment.dry_run(cfg)
    tc = cfg.train
    assert (tc.lr, tc.batch_size, tc.epochs, tc.precision) == (5e-5, 256, 1, "bf16")
    assert cfg.data.max_length == (800 if setting.startswith("m23k") else 3072)
    assert cfg.priors.engine == "vllm" and cfg.eval.engine == "vllm" and cfg.eval.n == 16
    assert all(s.answer_type == ("choice" if setting.startswith("m23k") else "math") for s in cfg.eval.sets)
    big = setting.endswith(("-7b", "-8b"))
    assert (tc.parallel, tc.processes) == (("fsdp", 8) if big else ("ddp", 1))
    assert plan["accumulation_steps"] * tc.micro_batch_size * tc.processes == 256
    assert plan["priors"]["needed"] and {r["target"] for r in plan["runs"]} >= {"sft", "dft", "target_sft(eta=0.5)"}
    assert cfg.eval.max_new_tokens < cfg.eval.max_model_len


@pytest.mark.parametrize(
    "overrides,error,message",
    [
        (["train.micro_batch_size=7"], ConfigError, "not a multiple of micro_batch_size × processes"),
        (["eval.sets=[]"], ConfigError, "list eval.sets"),
        (["eval.max_new_tokens=5000"], ConfigError, "leaves no room for the prompt"),
        (["experiment.targets=[{preset: target_sft, eta: 1.5}]"], TargetError, "eta"),
    ],
)
def test_dry_run_rejects_impossible_recipes(overrides, error, message):
    cfg = load_config(RunConfig, PAPER / "numina-qwen3-1.7b.yaml", overrides)
    with pytest.raises(error, match=message):
        experiment.dry_run(cfg)
