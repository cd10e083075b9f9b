"""Stage 2: accumulation invariance, exact resume after SIGKILL, 2-process gloo, reload, presets,
bad input. All on CPU with locally built tiny models."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.common.config import load_config
from pipeline.common.errors import ConfigError
from pipeline.data import tokens
from pipeline.entry import stages
from pipeline.entry.config import RunConfig
from pipeline.priors.cache import CacheError
from pipeline.training import batching, train
from pipeline.training.checkpoints import read_checkpoint
from tests.conftest import REPO, free_port, tiny_args


def args_for(tiny_build, storage: Path, *extra: str) -> list[str]:
    return tiny_args(tiny_build, storage, "train.lr=0.002", "train.eval_every=0", "train.threads=1", *extra)


def cfg_for(tiny_build, storage: Path, *extra: str) -> RunConfig:
    return load_config(RunConfig, None, args_for(tiny_build, storage, *extra))


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def eval_losses(run: Path) -> list[float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [m["eval_loss"] for m in lines if "eval_loss" in m]


def weights(final: Path) -> dict[str, torch.Tensor]:
    return load_file(str(final / "model.safetensors"))


def assert_same_weights(a: Path, b: Path, tol: float) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.allclose(wa[name], wb[name], atol=tol, rtol=0), name


def test_accumulation_invariance_1x8_equals_8x1(tiny_build, captured):
    common = ("train.target={preset: target_sft, eta: 0.5}", "train.batch_size=8", "train.max_steps=3")
    one = stages.train(
        cfg_for(tiny_build, captured, *common, "train.micro_batch_size=1", "train.name=a"), progress=False
    )
    eight = stages.train(
        cfg_for(tiny_build, captured, *common, "train.micro_batch_size=8", "train.name=b"), progress=False
    )
    la, lb = losses(one.parent), losses(eight.parent)
    assert len(la) == 3
    assert max(abs(x - y) for x, y in zip(la, lb, strict=True)) < 1e-5
    assert_same_weights(one, eight, tol=1e-5)


def test_a_short_run_at_eta_0_ends_on_dfts_weights(tiny_build, captured):
    """docs/design.md §2: Target-SFT at η = 0 is DFT, so three steps of each end on the same model."""
    common = ("train.batch_size=8", "train.max_steps=3")
    eta0 = stages.train(
        cfg_for(tiny_build, captured, *common, "train.target={preset: target_sft, eta: 0}", "train.name=eta0"),
        progress=False,
    )
    dft = stages.train(cfg_for(tiny_build, captured, *common, "train.target=dft", "train.name=dft"), progress=False)
    assert max(abs(x - y) for x, y in zip(losses(eta0.parent), losses(dft.parent), strict=True)) < 1e-6
    assert_same_weights(eta0, dft, tol=1e-6)
    half = stages.train(
        cfg_for(tiny_build, captured, *common, "train.target={preset: target_sft, eta: 0.5}", "train.name=half"),
        progress=False,
    )
    assert losses(half.parent) != losses(dft.parent)  # the prior does reach the loss away from η = 0


def test_token_budget_micro_batches_give_the_same_update(tiny_build, captured):
    """A padded-token budget only changes how a step is split, not the update."""
    common = ("train.target={preset: target_sft, eta: 0.5}", "train.batch_size=8", "train.max_steps=3")
    by_count = stages.train(
        cfg_for(tiny_build, captured, *common, "train.micro_batch_size=8", "train.name=a"), progress=False
    )
    budget = cfg_for(tiny_build, captured, *common, "train.micro_batch_tokens=300", "train.name=b")
    by_tokens = stages.train(budget, progress=False)
    la, lb = losses(by_count.parent), losses(by_tokens.parent)
    assert max(abs(x - y) for x, y in zip(la, lb, strict=True)) < 1e-5
    assert_same_weights(by_count, by_tokens, tol=1e-5)


def _examples(lengths: list[int]):
    from pipeline.data.sources import Example

    return [Example.from_labels(i, [1] * n, [1] * n) for i, n in enumerate(lengths)]


def test_micro_batch_split_by_token_budget_is_balanced_across_processes():
    from pipeline.training.config import TrainConfig

    rng = random.Random(0)
    batch = sorted(_examples([rng.randint(10, 200) for _ in range(32)]), key=lambda e: len(e.input_ids))
    cfg = TrainConfig(batch_size=32, micro_batch_tokens=600)
    splits = [batching.micro_batches(batch, rank, 4, cfg) for rank in range(4)]
    assert len({len(s) for s in splits}) == 1, "every process must run the same number of forward passes"
    for s in splits:
        for group in s:
            assert len(group) == 1 or len(group) * max(len(e.input_ids) for e in group) <= 600
    seen = sorted(e.index for s in splits for group in s for e in group)
    assert seen == sorted(e.index for e in batch)


def test_length_grouped_sampling_cuts_padding_and_keeps_every_example(tiny_build):
    from pipeline.training.config import TrainConfig

    rng = random.Random(1)
    examples = _examples([rng.randint(5, 300) for _ in range(400)])
    plain = TrainConfig(batch_size=8, max_steps=50, seed=3)
    grouped = TrainConfig(batch_size=8, max_steps=50, seed=3, group_by_length=True)

    def padding(batches):
        return sum(len(b) * max(len(e.input_ids) for e in b) - sum(len(e.input_ids) for e in b) for b in batches)

    a, b = batching.step_batches(examples, plain), batching.step_batches(examples, grouped)
    assert padding(b) < 0.5 * padding(a)
    assert len({e.index for batch in b for e in batch}) == 400  # one epoch: every example exactly once
    assert batching.step_batches(examples, grouped) == b  # seeded


def test_each_process_decodes_only_its_share_of_the_priors(tiny_build, captured):
    from pipeline.priors.cache import PriorStore

    cfg = cfg_for(tiny_build, captured)
    key = stages.plan_priors(cfg, progress=False).key
    reader = PriorStore(str(captured)).open(key)
    everything = reader.load_all()
    share = set(sorted(everything)[::2])
    mine = reader.load(share)
    assert set(mine) == share
    for index in share:
        assert (mine[index].topk_ids == everything[index].topk_ids).all()
    with pytest.raises(CacheError, match="no records for examples"):
        reader.load({10**6})


TRAIN_SCRIPT = "from pipeline.entry.cli import main; raise SystemExit(main())"


def run_torchrun(cli_args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node 2 -m pipeline.entry.cli train ...`; on timeout the whole process group dies."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "-m",
        "pipeline.entry.cli",
        "train",
        str(REPO / "configs/worlds/model-strong.yaml"),
        *cli_args,
    ]
    proc = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the agent and both workers, so nothing is left behind
        proc.communicate()
        raise
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def test_trained_model_reloads_with_transformers_and_same_logits(tiny_build, tmp_path):
    final = stages.train(
        cfg_for(
            tiny_build,
            tmp_path,
            "train.target=sft",
            "train.batch_size=4",
            "train.micro_batch_size=4",
            "train.max_steps=2",
        ),
        progress=False,
    )
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    tokenizer = AutoTokenizer.from_pretrained(final)
    # a mid-run checkpoint is a Hugging Face folder too, in the training dtype
    checkpoint = AutoModelForCausalLM.from_pretrained(final.parent / "checkpoints" / "step-000002").eval()
    assert checkpoint.dtype == torch.float32
    assert AutoTokenizer.from_pretrained(final.parent / "checkpoints" / "step-000002").chat_template
    ids = tokenizer("Question: Ana has 3 pens.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, checkpoint(ids).logits)
        original = AutoModelForCausalLM.from_pretrained(tiny_build.model).eval()
        assert not torch.equal(model(ids).logits, original(ids).logits)  # it did train
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(tiny_build.model).chat_template


@pytest.mark.parametrize("target", ["sft", "dft", "{preset: target_sft, eta: 0.5}"])
def test_presets_lower_their_own_training_loss(tiny_build, captured, target):
    name = target.split()[-1].strip("}") if "eta" not in target else "target_sft"
    final = stages.train(
        cfg_for(
            tiny_build,
            captured,
            f"train.target={target}",
            "train.batch_size=8",
            "train.micro_batch_size=8",
            "train.max_steps=24",
            f"train.name={name}",
        ),
        progress=False,
    )
    values = losses(final.parent)
    assert sum(values[-4:]) / 4 < 0.95 * sum(values[:4]) / 4, values  # Q-entropy terms fall slowly


def test_bad_inputs_fail_before_any_step(tiny_build, tmp_path, captured):
    # a bad target is refused when the config loads, before anything runs
    with pytest.raises(ConfigError, match=r"train\.target: unknown target preset 'sftt'"):
        cfg_for(tiny_build, tmp_path, "train.target=sftt")
    with pytest.raises(ConfigError, match=r"train.target: eta must be in \[0, 1\]"):
        cfg_for(tiny_build, tmp_path, "train.target={preset: target_sft, eta: 3}")
    with pytest.raises(train.TrainError, match="not a multiple of micro_batch_size"):
        stages.train(cfg_for(tiny_build, tmp_path, "train.batch_size=6", "train.micro_batch_size=4"), progress=False)
    fresh = tmp_path / "no-priors"
    with pytest.raises(CacheError, match="needs priors"):
        stages.train(cfg_for(tiny_build, fresh, "train.target=kd"), progress=False)
    # a prior set captured for other inputs is refused
    other = stages.capture_priors(cfg_for(tiny_build, captured, "data.max_length=100"), progress=False)
    with pytest.raises(CacheError, match="does not match this run"):
        stages.train(
            cfg_for(tiny_build, captured, "train.target=kd", f"train.prior_key={other.key}", "train.name=mismatch"),
            progress=False,
        )
    # a student whose tokenizer differs from the prior model's
    student = tmp_path / "student"
    shutil.copytree(tiny_build.model, student)
    tok = AutoTokenizer.from_pretrained(student)
    tok.add_tokens(["<|tool|>"])
    tok.save_pretrained(student)
    key = stages.plan_priors(cfg_for(tiny_build, captured), progress=False).key
    with pytest.raises(CacheError, match="different tokenizer than the student"):
        stages.train(
            cfg_for(
                tiny_build,
                captured,
                f"model.path={student}",
                "train.target=kd",
                f"train.prior_key={key}",
                "train.name=tok",
            ),
            progress=False,
        )
    # resuming into an incompatible run
    stages.train(
        cfg_for(
            tiny_build, tmp_path, "train.max_steps=1", "train.batch_size=4", "train.micro_batch_size=4", "train.name=x"
        ),
        progress=False,
    )
    with pytest.raises(train.TrainError, match=r"cannot resume .*train.target.preset was 'sft', now 'dft'"):
        stages.train(cfg_for(tiny_build, tmp_path, "train.target=dft", "train.name=x"), resume=True, progress=False)
    with pytest.raises(train.TrainError, match="already exists; pass --resume"):
        stages.train(cfg_for(tiny_build, tmp_path, "train.name=x"), progress=False)
    assert not (tmp_path / "runs" / "mismatch").exists() and not (tmp_path / "runs" / "tok").exists()


def test_full_disk_fails_cleanly_and_keeps_the_last_good_checkpoint(tiny_build, tmp_path):
    """A real full filesystem: a small tmpfs as the storage root (needs root, as CI runs)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small-disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], check=True)
    try:
        cfg = cfg_for(
            tiny_build,
            mount,
            "train.batch_size=4",
            "train.micro_batch_size=4",
            "train.max_steps=40",
            "train.checkpoint_every=1",
            "train.name=full",
        )
        with pytest.raises(train.TrainError, match=r"could not write checkpoint .* the previous checkpoint is intact"):
            stages.train(cfg, progress=False)
        checkpoints = mount / "runs" / "full" / "checkpoints"
        latest = checkpoints / (checkpoints / "latest").read_text().strip()
        load_file(str(latest / "model.safetensors"))  # loads: not corrupted
        assert read_checkpoint(latest)[1]["step"] >= 1
        assert not list(checkpoints.glob(".step-*"))  # no half-written checkpoint left behind
    finally:
        tokens.release(mount)  # this process's hold on the tokenisation entries there
        subprocess.run(["umount", str(mount)], check=True)


SHORT = ("train.batch_size=4", "train.micro_batch_size=2", "train.checkpoint_every=1", "train.name=strict")


@pytest.mark.parametrize(
    "change,message",
    [
        ("train.lr=0.01", r"train.lr was 0.002, now 0.01"),
        ("data.max_length=100", r"data.max_length was 128, now 100"),
        ("train.seed=3", r"train.seed was 0, now 3"),
        ("train.target=dft", r"train.target.preset was 'sft', now 'dft'"),
        ("train.batch_size=8", r"train.batch_size was 4, now 8"),
    ],
)
def test_resume_refuses_any_change_that_shapes_training(tiny_build, tmp_path, change, message):
    stages.train(cfg_for(tiny_build, tmp_path, *SHORT, "train.max_steps=2"), progress=False)
    before = (tmp_path / "runs" / "strict" / "run.json").read_text()
    with pytest.raises(train.TrainError, match=rf"cannot resume .*{message}.* start a new run"):
        stages.train(cfg_for(tiny_build, tmp_path, *SHORT, "train.max_steps=4", change), resume=True, progress=False)
    assert (tmp_path / "runs" / "strict" / "run.json").read_text() == before  # nothing recorded as true


def test_resume_may_extend_a_run_but_not_change_its_data_or_start_from_nothing(tiny_build, tmp_path):
    data = tmp_path / "sft.jsonl"
    shutil.copy(tiny_build.sft_train, data)
    extra = (*SHORT, f"data.path={data}")
    with pytest.raises(train.TrainError, match="--resume: there is no run 'strict'"):
        stages.train(cfg_for(tiny_build, tmp_path, *extra, "train.max_steps=2"), resume=True, progress=False)
    stages.train(cfg_for(tiny_build, tmp_path, *extra, "train.max_steps=2"), progress=False)
    longer = stages.train(cfg_for(tiny_build, tmp_path, *extra, "train.max_steps=3"), resume=True, progress=False)
    steps = [json.loads(line)["step"] for line in (longer.parent / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    rows = data.read_text().splitlines()
    data.write_text("\n".join(rows[1:] + rows[:1]) + "\n")  # same path, different data
    with pytest.raises(train.TrainError, match=r"its dataset_fingerprint was .*the data or priors under the same"):
        stages.train(cfg_for(tiny_build, tmp_path, *extra, "train.max_steps=4"), resume=True, progress=False)


def test_resume_accepts_a_run_recorded_before_a_field_existed_when_the_field_is_at_its_default(tiny_build, tmp_path):
    """Runs trained before `world.own_style_share` existed (the demo's, before the rare-phrasing
    world), and before the `world` section had that name (`base_model`), resume and are reused; a
    non-default value is still a change."""
    stages.train(cfg_for(tiny_build, tmp_path, *SHORT, "train.max_steps=2"), progress=False)
    info_path = tmp_path / "runs" / "strict" / "run.json"
    info = json.loads(info_path.read_text())
    del info["config"]["world"]["own_style_share"]
    info["config"]["base_model"] = info["config"].pop("world")
    info_path.write_text(json.dumps(info))
    with pytest.raises(train.TrainError, match=r"world.own_style_share was None, now 0.02"):
        changed = (*SHORT, "train.max_steps=3", "world.own_style_share=0.02")
        stages.train(cfg_for(tiny_build, tmp_path, *changed), resume=True, progress=False)
    longer = stages.train(cfg_for(tiny_build, tmp_path, *SHORT, "train.max_steps=3"), resume=True, progress=False)
    steps = [json.loads(line)["step"] for line in (longer.parent / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_rerun_of_a_finished_run_rewrites_nothing(tiny_build, tmp_path):
    cfg = cfg_for(tiny_build, tmp_path, *SHORT, "train.max_steps=2")
    final = stages.train(cfg, progress=False)
    info = json.loads((final.parent / "run.json").read_text())
    assert info["device"] == "cpu" and info["data_counts"]["examples"] == info["data_counts"]["rows"] == 60
    stamp = (final / "model.safetensors").stat().st_mtime_ns
    assert stages.train(cfg, resume=True, progress=False) == final
    assert (final / "model.safetensors").stat().st_mtime_ns == stamp


def test_divergence_never_reaches_a_checkpoint_or_the_metrics(tiny_build, tmp_path, monkeypatch):
    """Finite loss and gradients at step 1, but an update that leaves a weight inf (what an overflowing
    low-precision update does): the run stops before that step's checkpoint and metrics line."""
    real_step = torch.optim.AdamW.step

    def overflowing_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing_step)
    with pytest.raises(train.DivergedError, match="diverged: weights inf at step 1"):
        stages.train(cfg_for(tiny_build, tmp_path, *SHORT, "train.max_steps=3"), progress=False)
    run = tmp_path / "runs" / "strict"
    assert not list(run.glob("checkpoints/step-*"))
    assert not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text()


def test_an_lr_whose_update_overflows_is_a_divergence(tiny_build, tmp_path):
    with pytest.raises(train.DivergedError, match="the update overflowed at step 1"):
        stages.train(cfg_for(tiny_build, tmp_path, *SHORT, "train.max_steps=3", "train.lr=1e39"), progress=False)
    assert not list((tmp_path / "runs" / "strict").glob("checkpoints/step-*"))


def test_resume_falls_back_past_a_truncated_checkpoint(tiny_build, tmp_path, caplog):
    cfg = cfg_for(tiny_build, tmp_path, *SHORT, "train.max_steps=4", "train.target=dft")
    straight = stages.train(cfg_for(tiny_build, tmp_path / "straight", *SHORT, "train.max_steps=4", "train.target=dft"))
    final = stages.train(cfg, progress=False)
    shutil.rmtree(final)
    newest = final.parent / "checkpoints" / "step-000004" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a half-written file
    with caplog.at_level("WARNING"):
        stages.train(cfg, resume=True, progress=False)
    assert "step-000004 is unusable (model.safetensors has" in caplog.text
    assert max(abs(x - y) for x, y in zip(losses(final.parent), losses(straight.parent), strict=True)) < 1e-6
    assert_same_weights(final, straight, tol=1e-6)
