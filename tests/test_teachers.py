"""Teachers on the real path (issue 31 §5; docs/design.md §3-§4): a teacher with more embedding rows
than its student, provenance in the manifest, run.json and train's output, --resume against another
prior set, and the prior's alignment at the edges of completions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.common import prior_schema
from pipeline.common.config import load_config
from pipeline.common.errors import TrainError
from pipeline.entry import stages
from pipeline.entry.config import RunConfig
from pipeline.priors.cache import PriorStore
from pipeline.priors.engines import drop_ids_beyond
from tests.conftest import tiny_args, wide_teacher, write_jsonl


def cfg_for(build, storage: Path, *extra: str) -> RunConfig:
    settings = ("train.batch_size=4", "train.max_steps=2", "train.eval_every=0", "train.threads=1")
    return load_config(RunConfig, None, tiny_args(build, storage, *settings, *extra))


def test_a_teacher_with_more_rows_is_accepted_and_its_extra_ids_never_reach_the_loss(tiny_build, tmp_path, capsys):
    teacher = wide_teacher(tiny_build.model, tmp_path / "teacher")
    rows = AutoModelForCausalLM.from_pretrained(tiny_build.model).config.vocab_size
    cfg = cfg_for(tiny_build, tmp_path, f"priors.model_path={teacher}", "train.target={preset: target_sft, eta: 0.5}")
    result = stages.capture_priors(cfg, progress=False)
    records = PriorStore(str(tmp_path)).open(result.key).load_all()
    assert max(int(r.topk_ids.max()) for r in records.values()) >= rows  # the teacher did rank them
    final = stages.train(cfg, progress=False)
    info = json.loads((final.parent / "run.json").read_text())["prior"]
    beyond = info["beyond_student_rows"]
    assert beyond["student_rows"] == rows and beyond["entries_dropped"] > 0 and beyond["mass_per_position"] > 0
    out = capsys.readouterr().out
    assert f"prior: set {result.key} by teacher (sha256 " in out and "teacher)" in out
    assert f"at ids ≥ the student's {rows} rows dropped" in out
    loaded = dict(records)
    drop_ids_beyond(loaded, rows)
    assert all(int(r.topk_ids.max()) < rows for r in loaded.values())
    assert all(np.isneginf(r.topk_logprobs[r.topk_ids < 0]).all() for r in loaded.values())


def test_the_manifest_and_run_json_say_which_model_made_the_prior(tiny_build, tmp_path):
    teacher = wide_teacher(tiny_build.model, tmp_path / "teacher", extra=8)
    cfg = cfg_for(tiny_build, tmp_path, f"priors.model_path={teacher}", "train.target=kd")
    result = stages.capture_priors(cfg, progress=False)
    made = PriorStore(str(tmp_path)).manifest(result.key)["capture"]
    assert made["prior_role"] == "teacher" and made["logprobs_mode"] == "raw_logprobs"
    model = made["prior_model"]
    assert model["path"] == str(teacher) and model["name"] == "teacher" and len(model["content_sha256"]) == 64
    assert model["config"]["vocab_size"] > AutoModelForCausalLM.from_pretrained(tiny_build.model).config.vocab_size
    assert (made["engine"], made["dtype"]) == ("hf", "float32")
    final = stages.train(cfg, progress=False)
    info = json.loads((final.parent / "run.json").read_text())["prior"]
    assert info["key"] == result.key and info["prior_model"]["content_sha256"] == model["content_sha256"]
    assert info["k"] == 8 and info["engine"]["name"] == "hf"


def test_resume_with_another_prior_set_is_refused(tiny_build, tmp_path):
    own = cfg_for(tiny_build, tmp_path, "train.target={preset: target_sft, eta: 0.5}", "train.max_steps=4")
    first = stages.capture_priors(own, progress=False).key
    teacher = wide_teacher(tiny_build.model, tmp_path / "teacher", extra=8)
    other = stages.capture_priors(cfg_for(tiny_build, tmp_path, f"priors.model_path={teacher}"), progress=False).key
    assert other != first
    killed = cfg_for(tiny_build, tmp_path, "train.target={preset: target_sft, eta: 0.5}", "train.max_steps=4",
                     "train.checkpoint_every=2", f"train.prior_key={first}")  # fmt: skip
    stages.train(killed, progress=False)
    swapped = load_config(RunConfig, None, [*tiny_args(tiny_build, tmp_path), *_train_args(killed, other)])
    with pytest.raises(TrainError, match=rf"its prior_key was '{first}', now '{other}'"):
        stages.train(swapped, resume=True, progress=False)


def _train_args(cfg: RunConfig, prior_key: str) -> list[str]:
    t = cfg.train
    return [
        f"train.batch_size={t.batch_size}", f"train.max_steps={t.max_steps}", "train.eval_every=0", "train.threads=1",
        "train.target={preset: target_sft, eta: 0.5}", f"train.checkpoint_every={t.checkpoint_every}",
        f"train.prior_key={prior_key}",
    ]  # fmt: skip


def test_the_prior_at_j_scores_token_j_plus_1_at_the_edges_of_completions(tiny_build, tmp_path):
    """A one-token reply, the last token of every completion, and a chat with two assistant turns:
    each scored position's stored observed log-prob is a fresh forward's at that position for the next
    token, and every completion token (the first of each turn and the last) is scored."""
    user = lambda text: {"role": "user", "content": text}  # noqa: E731
    reply = lambda text: {"role": "assistant", "content": text}  # noqa: E731
    rows = [
        {"messages": [user("Ana has 3 pens. How many pens?"), reply("3")]},
        {"messages": [user("Ben has 4 cards. He gets 5 more."), reply("4 + 5 = 9.\n#### 9")]},
        {"messages": [user("Kim has 2 coins."), reply("2"), user("She doubles them."), reply("2 * 2 = 4.\n#### 4")]},
    ]  # fmt: skip
    data = write_jsonl(tmp_path / "edges.jsonl", rows)
    cfg = load_config(RunConfig, None, [*tiny_args(tiny_build, tmp_path, f"data.path={data}")])
    result = stages.capture_priors(cfg, progress=False)
    plan = stages.plan_priors(cfg, progress=False)
    records = PriorStore(str(tmp_path)).open(result.key).load_all()
    tokenizer = AutoTokenizer.from_pretrained(tiny_build.model)
    model = AutoModelForCausalLM.from_pretrained(tiny_build.model, dtype=torch.float32).eval()
    turns_seen = []
    for example in plan.prepared.examples:
        record, ids = records[example.index], example.input_ids
        completion = np.flatnonzero(example.completion)
        assert record.positions.tolist() == [int(t) - 1 for t in completion]  # every completion token, each once
        starts = [int(t) for t in completion if not example.completion[t - 1]]  # the first token of each turn
        turns_seen.append(len(starts))
        assert int(completion[-1]) - 1 in record.positions.tolist()  # the completion's last token
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids.tolist()])).logits[0].double(), -1)
        for row, j in enumerate(record.positions):
            fresh = float(logp[j, ids[j + 1]])
            assert abs(record.obs_logprob[row] - fresh) <= prior_schema.MAX_ABS_ERROR + 1e-5
        texts = [tokenizer.decode(ids[s : s + 1]) for s in starts]
        assert texts[0].strip() in ("3", "4", "2")  # the reply's first token is scored: one-token replies too
    assert turns_seen == [1, 1, 2]
