"""The embedded base model: deterministic, idempotent, loads offline, and actually knows things."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline import base_model, synthetic

from .conftest import TINY

# The floor the default build must clear on greedy held-out accuracy in the pretraining format
# (README: "Embedded base model"). The trivial baseline, always answering the most common
# held-out answer, scores about 5%.
ACCURACY_FLOOR = 0.40


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_build_is_deterministic_under_a_seed(tmp_path, tiny_build):
    again = base_model.build(TINY, tmp_path, progress=False)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert digest(again.model / name) == digest(tiny_build.model / name), name
    assert digest(again.sft_train) == digest(tiny_build.sft_train)
    other_seed = base_model.build(dataclasses.replace(TINY, seed=1, name="seed1"), tmp_path, progress=False)
    assert digest(other_seed.model / "model.safetensors") != digest(tiny_build.model / "model.safetensors")


def test_build_is_idempotent_and_a_changed_config_builds_anew(tmp_path):
    first = base_model.build(TINY, tmp_path, progress=False)
    stamp = (first.model / "model.safetensors").stat().st_mtime_ns
    assert base_model.build(TINY, tmp_path, progress=False) == first
    assert (first.model / "model.safetensors").stat().st_mtime_ns == stamp
    changed = base_model.build(dataclasses.replace(TINY, steps=5), tmp_path, progress=False)
    assert changed.model != first.model and (changed.model / base_model.SUCCESS).exists()
    assert (first.model / "model.safetensors").stat().st_mtime_ns == stamp
    # no temporary folders are left behind
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".")]


def test_reloads_offline_with_transformers(tiny_build, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(tiny_build.model, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_build.model, local_files_only=True)
    assert model.config.architectures == ["LlamaForCausalLM"]
    assert model.config.head_dim >= 32  # vLLM's CPU build rejects 16
    ids = tokenizer("Question: Ana has 3 pens.", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = model(ids).logits, model(ids).logits
    assert torch.equal(a, b) and a.shape[-1] == len(tokenizer)
    assert tokenizer.chat_template and "<|end|>" in tokenizer.all_special_tokens


def test_splits_do_not_overlap_and_noise_is_controlled():
    splits = synthetic.make_splits(3, 20, 3, 2000, 1000, 100, 0.3)
    heldout_questions = {row["question"] for row in splits.heldout}
    assert len(heldout_questions) == 100
    noisy = [row for row in splits.sft_train if row["noisy"]]
    assert 0.25 < len(noisy) / len(splits.sft_train) < 0.35
    for row in noisy[:50]:
        assert synthetic.extract_answer(row["messages"][1]["content"]) != row["answer"]
    for row in splits.sft_train:
        assert row["messages"][0]["content"] not in heldout_questions
    clean = [row for row in splits.sft_train if not row["noisy"]]
    assert all(synthetic.extract_answer(r["messages"][1]["content"]) == r["answer"] for r in clean)


def test_default_base_model_has_real_knowledge(default_build):
    heldout = [json.loads(line) for line in default_build.sft_heldout.read_text().splitlines()]
    result = base_model.evaluate(default_build.model, heldout, "plain")
    print(json.dumps({k: v for k, v in result.items() if k != "example"}))
    assert result["majority_baseline"] < 0.1
    assert result["accuracy"] >= ACCURACY_FLOOR
    info = json.loads((default_build.model / base_model.SUCCESS).read_text())
    assert 0.5e6 < info["parameters"] < 5e6
