"""Target-SFT through TRL's `SFTTrainer` (pipeline/training/trl_integration.py, the `trl` extra)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig

from pipeline.common.config import load_config
from pipeline.common.errors import PriorError
from pipeline.core.targets import preset
from pipeline.entry import stages
from pipeline.entry.config import RunConfig
from pipeline.training import batching
from pipeline.training.schedule import warmup_cosine
from pipeline.training.trl_integration import TargetSFTTrainer, as_prompt_completion
from tests.conftest import REPO, tiny_args

STEPS, BATCH, LR, WARMUP = 3, 4, 0.002, 1


def overrides(build, root: Path, *extra: str) -> list[str]:
    return tiny_args(
        build,
        root,
        "train.target={preset: target_sft, eta: 0.5}",
        f"train.batch_size={BATCH}",
        f"train.micro_batch_size={BATCH}",
        f"train.max_steps={STEPS}",
        f"train.lr={LR}",
        f"train.warmup_steps={WARMUP}",
        "train.eval_every=0",
        "train.threads=1",
        *extra,
    )


def rows(build) -> Dataset:
    lines = Path(build.sft_train).read_text().splitlines()
    return Dataset.from_list([as_prompt_completion(json.loads(line)) for line in lines])


class Recording(TargetSFTTrainer):
    """Takes rows in a given order (this pipeline's step batches) and records each step's loss."""

    def __init__(self, *args, order: list[int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.order, self.losses = order, []

    def _get_train_sampler(self, *args, **kwargs):
        return self.order

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.losses.append(float(loss))
        return loss


def sft_config(out: Path, **more) -> SFTConfig:
    settings = dict(
        output_dir=str(out),
        per_device_train_batch_size=BATCH,
        max_steps=STEPS,
        max_length=128,
        learning_rate=LR,
        weight_decay=0.0,
        max_grad_norm=1.0,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        dataloader_num_workers=0,
        logging_steps=1,
    )
    return SFTConfig(**{**settings, **more})


def test_target_sft_through_trl_equals_our_trainer_on_the_same_batches(tiny_build, tmp_path):
    cfg = load_config(RunConfig, None, overrides(tiny_build, tmp_path))
    stages.capture_priors(cfg, progress=False)
    final = stages.train(cfg, progress=False)
    ours = [json.loads(line)["loss"] for line in (final.parent / "metrics.jsonl").read_text().splitlines()]
    plan = stages.plan_priors(cfg, progress=False)
    order = [e.index for batch in batching.step_batches(plan.prepared.examples, cfg.train) for e in batch]

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_build.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, WARMUP, STEPS))
    trainer = Recording(
        model=model,
        processing_class=AutoTokenizer.from_pretrained(tiny_build.model),
        args=sft_config(tmp_path / "trl"),
        train_dataset=rows(tiny_build),
        target=preset("target_sft", eta=0.5),
        priors=stages.cached_priors(cfg),
        optimizers=(optimizer, schedule),
        order=order[: STEPS * BATCH],
    )
    trainer.train()
    assert len(trainer.losses) == STEPS == len(ours)
    # fp32: the same numbers up to summation order (the two pad and chunk differently)
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(trainer.losses, ours, strict=True)), (trainer.losses, ours)
    mine = AutoModelForCausalLM.from_pretrained(final).state_dict()
    for name, value in model.state_dict().items():
        assert torch.allclose(value, mine[name], atol=1e-5, rtol=0), name


@pytest.mark.parametrize(
    ("dataset", "more", "message"),
    [
        ("messages", {}, "TRL trains on"),  # language modelling on the whole chat: another loss mask
        ("prompt_completion", {"max_length": 40}, "TRL's tokenisation"),  # truncated where the capture was not
    ],
)
def test_a_batch_the_prior_set_was_not_captured_on_is_refused_naming_the_row(
    tiny_build, tmp_path, dataset, more, message
):
    cfg = load_config(RunConfig, None, overrides(tiny_build, tmp_path))
    stages.capture_priors(cfg, progress=False)
    lines = [json.loads(line) for line in Path(tiny_build.sft_train).read_text().splitlines()]
    data = (
        Dataset.from_list([{"messages": r["messages"]} for r in lines]) if dataset == "messages" else rows(tiny_build)
    )
    trainer = TargetSFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_build.model),
        processing_class=AutoTokenizer.from_pretrained(tiny_build.model),
        args=sft_config(tmp_path / "trl", **more),
        train_dataset=data,
        target=preset("target_sft", eta=0.5),
        priors=stages.cached_priors(cfg),
    )
    with pytest.raises(PriorError, match=r"^row \d+") as refused:
        trainer.train()
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_the_readme_block_runs_as_written(tiny_build, tmp_path, monkeypatch):
    """docs/training.md "Target-SFT inside TRL's SFTTrainer": its code block, with CONFIG and OVERRIDES set here."""
    readme = (REPO / "docs" / "training.md").read_text()
    section = readme.split("### Target-SFT inside TRL's `SFTTrainer`", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    first, body = block.split("\n", 1)
    assert first.startswith("CONFIG, OVERRIDES = ")
    cfg_overrides = overrides(tiny_build, tmp_path)
    stages.capture_priors(load_config(RunConfig, None, cfg_overrides), progress=False)
    monkeypatch.chdir(tmp_path)
    namespace = {"CONFIG": None, "OVERRIDES": cfg_overrides}
    exec(compile(body, "docs/training.md", "exec"), namespace)
    assert namespace["trainer"].state.global_step == 60 // 8 + 1  # one epoch of 60 rows, 8 per step
    assert (tmp_path / "trl-out").is_dir()


@pytest.mark.parametrize("kind", ["iterable", "string-rows"])
def test_a_dataset_the_priors_cannot_be_matched_to_is_one_line(tiny_build, tmp_path, kind):
    """An IterableDataset has no row index; a `row` column of text is not one: each is refused when
    the trainer is built, in one line, not with a traceback from the collator."""
    from pipeline.common.errors import ConfigError

    cfg = load_config(RunConfig, None, overrides(tiny_build, tmp_path))
    stages.capture_priors(cfg, progress=False)
    data = rows(tiny_build)
    data = data.to_iterable_dataset() if kind == "iterable" else data.add_column("row", ["x"] * len(data))
    with pytest.raises(ConfigError) as refused:
        TargetSFTTrainer(
            model=AutoModelForCausalLM.from_pretrained(tiny_build.model),
            processing_class=AutoTokenizer.from_pretrained(tiny_build.model),
            args=sft_config(tmp_path / "trl"),
            train_dataset=data,
            target=preset("target_sft", eta=0.5),
            priors=stages.cached_priors(cfg),
        )
    text = str(refused.value)
    assert "\n" not in text and ("IterableDataset" in text if kind == "iterable" else "'row' column of string" in text)
