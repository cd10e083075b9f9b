"""The embedded base model: deterministic, idempotent, loads offline, and actually knows things."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.common import cpu_kernels
from pipeline.common.config import load_config, to_dict
from pipeline.common.errors import ConfigError, ModelError
from pipeline.entry.config import RunConfig
from pipeline.entry.resolve import resolve_inputs
from pipeline.world import builder, problems
from pipeline.world.config import WorldConfig

from . import recorded
from .conftest import REPO, TINY

# The floor the default build must clear on greedy held-out accuracy in the pretraining format
# (docs/benchmarks.md: "Embedded base model"). The trivial baseline, always answering the most common
# held-out answer, scores about 5%.
ACCURACY_FLOOR = 0.40


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_build_is_deterministic_under_a_seed(tmp_path, tiny_build):
    again = builder.build(TINY, tmp_path, progress=False)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert digest(again.model / name) == digest(tiny_build.model / name), name
    assert digest(again.sft_train) == digest(tiny_build.sft_train)
    other_seed = builder.build(dataclasses.replace(TINY, seed=1, name="seed1"), tmp_path, progress=False)
    assert digest(other_seed.model / "model.safetensors") != digest(tiny_build.model / "model.safetensors")


def test_build_is_idempotent_and_a_changed_config_builds_anew(tmp_path):
    first = builder.build(TINY, tmp_path, progress=False)
    stamp = (first.model / "model.safetensors").stat().st_mtime_ns
    assert builder.build(TINY, tmp_path, progress=False) == first
    assert (first.model / "model.safetensors").stat().st_mtime_ns == stamp
    changed = builder.build(dataclasses.replace(TINY, steps=5), tmp_path, progress=False)
    assert changed.model != first.model and (changed.model / builder.SUCCESS).exists()
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
    world = builder.rules(WorldConfig(seed=3, pretrain_problems=2000, sft_train_problems=1000))
    splits = problems.make_splits(world)
    evaluation = {"heldout": splits.heldout, "forgetting": splits.forgetting, "validation": splits.validation}
    questions = {name: {row["question"] for row in rows} for name, rows in evaluation.items()}
    assert [len(q) for q in questions.values()] == [500, 300, 200]
    assert not questions["heldout"] & questions["validation"] and not questions["heldout"] & questions["forgetting"]
    noisy = [row for row in splits.sft_train if row["noisy"]]
    assert 0.25 < len(noisy) / len(splits.sft_train) < 0.35
    for row in noisy[:50]:
        assert problems.extract_answer(row["messages"][1]["content"]) != row["answer"]
    for row in splits.sft_train:
        assert not any(row["messages"][0]["content"] in q for q in questions.values())
    clean = [row for row in splits.sft_train if not row["noisy"]]
    assert all(problems.extract_answer(r["messages"][1]["content"]) == r["answer"] for r in clean)


def test_the_world_is_the_papers_regime():
    """docs/design.md §7: a chat-fluent base, a new skill rare in pretraining and present in every SFT
    and held-out problem, the old skill alone in the forgetting set, off-policy SFT phrasing."""
    splits = problems.make_splits(builder.rules(WorldConfig(seed=1, pretrain_problems=4000)))
    doubles = lambda text: any(word in text for word in ("doubles", "twice"))  # noqa: E731
    assert 0.45 < sum(d.chat for d in splits.pretrain) / 4000 < 0.55
    assert 0.01 < sum(doubles(d.question) for d in splits.pretrain) / 4000 < 0.03
    assert all(doubles(r["messages"][0]["content"]) for r in splits.sft_train)
    assert all(doubles(r["question"]) for r in splits.heldout + splits.validation)
    assert not any(doubles(r["question"]) for r in splits.forgetting)
    assert all(r["messages"][1]["content"].startswith("Step 1: ") for r in splits.sft_train)
    assert not any("Step 1: " in d.solution for d in splits.pretrain)
    for row in splits.heldout[:50]:
        assert problems.extract_answer(row["messages"][1]["content"]) == row["answer"]


def test_a_rare_phrasing_world_rewrites_two_percent_of_the_pretraining_solutions():
    """configs/worlds/rare-phrasing.yaml: 2% of pretraining solutions in the SFT set's phrasing. The
    evaluation splits, drawn first, are the demo world's exactly; the rest is drawn the same way."""
    demo = problems.make_splits(builder.rules(WorldConfig(seed=1, pretrain_problems=4000)))
    rare = problems.make_splits(builder.rules(WorldConfig(seed=1, pretrain_problems=4000, own_style_share=0.02)))
    own = [d for d in rare.pretrain if d.solution.startswith("Step 1: ")]
    assert 0.01 < len(own) / 4000 < 0.03 and all("The answer is" in d.solution for d in own)
    assert (rare.heldout, rare.forgetting, rare.validation) == (demo.heldout, demo.forgetting, demo.validation)
    assert len(rare.sft_train) == len(demo.sft_train)
    assert all(r["messages"][1]["content"].startswith("Step 1: ") for r in rare.sft_train)
    assert builder.build_hash(WorldConfig()) != builder.build_hash(WorldConfig(own_style_share=0.02))


def test_chat_documents_match_the_chat_template(tiny_build):
    tokenizer = AutoTokenizer.from_pretrained(tiny_build.model, local_files_only=True)
    doc = problems.Document("Ana has 3 pens. How many pens does Ana have now?", "So 3 + 0 = 3.\n#### 3", chat=True)
    messages = [{"role": "user", "content": doc.question}, {"role": "assistant", "content": doc.solution}]
    assert builder.document_text(doc) == tokenizer.apply_chat_template(messages, tokenize=False)


def test_default_base_model_knows_the_old_skill_and_is_weak_at_the_new(default_build):
    """The paper's regime (docs/design.md §7): fluent in chat on +/- problems, weak at doubling."""
    rows = lambda path: [json.loads(line) for line in path.read_text().splitlines()][:200]  # noqa: E731
    old = builder.evaluate(default_build.model, rows(default_build.forgetting), "chat")
    new = builder.evaluate(default_build.model, rows(default_build.sft_heldout), "chat")
    print(json.dumps({"old": old["accuracy"], "new": new["accuracy"], "majority": old["majority_baseline"]}))
    assert old["majority_baseline"] < 0.1
    assert old["accuracy"] >= ACCURACY_FLOOR
    assert new["accuracy"] < old["accuracy"] / 2
    info = json.loads((default_build.model / builder.SUCCESS).read_text())
    assert 0.5e6 < info["parameters"] < 5e6


def test_the_embedded_teacher_is_larger_and_shares_the_tokenizer(tmp_path):
    world = dataclasses.replace(TINY, name="tiny-t", teacher_hidden_size=96, teacher_num_layers=3, teacher_steps=4)
    settings = [f"storage_root={tmp_path}", f"world={json.dumps(to_dict(world))}", "priors.embedded_teacher=true"]
    inputs = resolve_inputs(load_config(RunConfig, None, settings), progress=False)
    teacher, student = inputs.prior_model_path, inputs.model_path
    assert teacher.name.startswith("tiny-t-teacher-") and student.name.startswith("tiny-t-")
    assert (teacher / "tokenizer.json").read_bytes() == (student / "tokenizer.json").read_bytes()
    size = lambda path: json.loads((path / builder.SUCCESS).read_text())["parameters"]  # noqa: E731
    assert size(teacher) > 2 * size(student)


def _tiny_build_weights(out: Path, env: dict[str, str], bf16: bool = True, emulate: tuple[str, ...] = ()) -> str:
    """The TINY build's weight checksum from a fresh process (MKL reads its settings at load time),
    optionally under an emulator command such as `qemu-x86_64 -cpu Haswell`."""
    script = (
        "import json, sys, torch\n"
        f"torch.cpu._is_avx512_bf16_supported = lambda: {bf16}\n"
        "from pipeline.world import builder\n"
        "from tests.conftest import TINY\n"
        "out = builder.build(TINY, sys.argv[1], progress=False)\n"
        "print(json.loads((out.model / builder.SUCCESS).read_text())['weights_sha256'])\n"
    )
    command = [*emulate, sys.executable, "-c", script, str(out)]
    result = subprocess.run(command, env={**os.environ, **env}, cwd=REPO, capture_output=True, text=True, check=True)
    return result.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "cpu",
    [
        {"bf16": True, "env": {}},  # the CPU reports native bf16 (AVX512-BF16/AMX)
        {"bf16": False, "env": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"}},  # an AVX2-only CPU without bf16
    ],
    ids=["bf16-cpu", "avx2-cpu"],
)
def test_the_build_gives_this_cpu_kinds_recorded_weights_whatever_bf16_and_mkl_isa_it_reports(tmp_path, cpu):
    """Same bits whatever the CPU reports: fp32 pretraining and pinned kernels, checked against this
    CPU kind's pinned value (tests/recorded.py), or the portable one where its kind has none."""
    mode, checksum = recorded.expected("tiny_build")
    assert _tiny_build_weights(tmp_path, {**recorded.mode_env(mode), **cpu["env"]}, cpu["bf16"]) == checksum


def test_the_portable_mode_gives_the_weights_recorded_on_every_cpu(tmp_path):
    """MKL's COMPATIBLE branch and fused AdamW: a different model from the pinned one, and the one
    every x86 CPU measured builds, Intel and AMD, so every CI machine checks it."""
    assert _tiny_build_weights(tmp_path, recorded.mode_env("portable")) == recorded.PORTABLE["tiny_build"]


def test_a_cpu_kind_without_pinned_values_checks_the_portable_ones():
    intel = recorded.PINNED["GenuineIntel/avx512"]["short_run"]
    assert recorded.expected("short_run", "GenuineIntel/avx512") == ("pinned", intel)
    assert recorded.expected("tiny_build", "GenuineIntel/avx2") == ("portable", recorded.PORTABLE["tiny_build"])
    assert recorded.expected("samples", "HygonGenuine/avx2") == ("portable", recorded.PORTABLE["samples"])
    assert cpu_kernels.cpu_kind().split("/")[1] in ("avx512", "avx2", "sse")


@pytest.mark.slow
@pytest.mark.parametrize("cpu", ["Haswell", "EPYC-Rome"])
def test_the_portable_mode_builds_the_same_weights_on_an_emulated_intel_and_amd_cpu(tmp_path, cpu):
    """The cross-vendor check itself, under QEMU user-mode emulation (about a minute each)."""
    if shutil.which("qemu-x86_64") is None:
        pytest.skip("needs QEMU user-mode emulation: apt install qemu-user")
    weights = _tiny_build_weights(tmp_path, recorded.mode_env("portable"), emulate=("qemu-x86_64", "-cpu", cpu))
    assert weights == recorded.PORTABLE["tiny_build"]


@pytest.mark.parametrize(
    ("mode", "mkl", "fused"), [(None, "AVX2", None), ("pinned", "AVX2", None), ("portable", "COMPATIBLE", True)]
)
def test_each_cpu_kernel_mode_sets_its_variables_and_adamw_kernel(monkeypatch, mode, mkl, fused):
    monkeypatch.setattr(cpu_kernels.platform, "machine", lambda: "x86_64")
    for name in (*cpu_kernels.PINNED, cpu_kernels.MODE):
        monkeypatch.delenv(name, raising=False)
    if mode:
        monkeypatch.setenv(cpu_kernels.MODE, mode)
    assert cpu_kernels.missing() == {"MKL_CBWR": mkl, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    monkeypatch.setenv("MKL_CBWR", mkl)
    assert cpu_kernels.adamw_fused("cpu") is fused
    assert cpu_kernels.adamw_fused("cuda") is None  # GPUs keep PyTorch's own choice


def test_native_mode_pins_nothing_and_an_unknown_mode_is_one_clear_line(monkeypatch):
    monkeypatch.setenv(cpu_kernels.MODE, "native")
    assert cpu_kernels.missing() == {}
    monkeypatch.setenv(cpu_kernels.MODE, "fast")
    with pytest.raises(ConfigError, match="TARGET_SFT_CPU_KERNELS='fast' is not one of pinned, portable, native"):
        cpu_kernels.missing()


def test_pretrain_calls_on_step_after_every_step_and_a_callback_that_reads_does_not_change_the_run():
    splits = problems.make_splits(builder.rules(TINY))
    tokenizer = builder.train_tokenizer(splits, TINY.vocab_size)
    documents = [builder.document_text(d) for d in splits.pretrain]
    checksums, seen = [], []
    for on_step in (None, seen.append):
        torch.manual_seed(TINY.seed)
        model = builder.new_model(TINY, tokenizer)
        builder.pretrain(model, tokenizer, documents, TINY, False, on_step)
        checksums.append(builder.weights_checksum(model))
    assert seen == list(range(1, TINY.steps + 1))
    assert checksums[0] == checksums[1]


def test_shipped_weights_replace_pretraining_and_a_from_scratch_build_reproduces_them(tmp_path, monkeypatch, capsys):
    """The demo's first run loads a registered world's shipped base instead of pretraining it; the
    build still derives the same bits from scratch (here on the TINY world; the demo's own base is
    checked the same way by `target-sft world build --from-scratch`, README)."""
    from pipeline.entry import cli

    monkeypatch.setattr(builder, "SHIPPED", tmp_path / "shipped")
    scratch = builder.build(TINY, tmp_path / "a", progress=False, from_scratch=True)
    builder.ship(TINY, scratch)
    loaded = builder.build(TINY, tmp_path / "b", progress=False)
    info = json.loads((loaded.model / builder.SUCCESS).read_text())
    assert info["weights_from"] == "shipped"
    assert info["weights_sha256"] == json.loads((scratch.model / builder.SUCCESS).read_text())["weights_sha256"]
    for name in ("sft_train.jsonl", "sft_heldout.jsonl", "forgetting.jsonl", "validation.jsonl"):
        assert (loaded.datasets / name).read_bytes() == (scratch.datasets / name).read_bytes()
    assert (loaded.model / "tokenizer.json").read_bytes() == (scratch.model / "tokenizer.json").read_bytes()
    cfg = load_config(RunConfig, None, [f"world={json.dumps(to_dict(TINY))}"])
    assert "identical to the shipped" in cli.compare_with_shipped(cfg, scratch)
    (shipped,) = (tmp_path / "shipped").glob("*.safetensors")
    data = bytearray(shipped.read_bytes())
    data[-3] ^= 0xFF
    shipped.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="does not hold the weights its record names"):
        builder.build(TINY, tmp_path / "c", progress=False)


@pytest.mark.slow
def test_every_shipped_world_is_rederived_bit_for_bit_from_scratch(tmp_path):
    """The shipped base weights are what `world build --from-scratch` pretrains, here (pinned
    kernels, as recorded in each record): 700 fp32 steps per world, about 4 minutes each on 2 cores."""
    shipped = sorted(builder.SHIPPED.glob("*.json"))
    assert shipped, "no shipped worlds"
    configs = [load_config(RunConfig, path).world for path in sorted((REPO / "configs").rglob("*.yaml"))]
    for record_path in shipped:
        record = json.loads(record_path.read_text())
        if "-teacher-" in record_path.stem:  # a teacher continued from its base (shipped beside it)
            config = next(c for c in configs if builder.teacher_hash(c) == record["build_hash"])
            model = builder.build_teacher(config, tmp_path / record_path.stem, progress=False, from_scratch=True)
        else:
            config = next(c for c in configs if builder.build_hash(c) == record["build_hash"])
            model = builder.build(config, tmp_path / record_path.stem, progress=False, from_scratch=True).model
        info = json.loads((model / builder.SUCCESS).read_text())
        assert info["weights_sha256"] == record["weights_sha256"], record_path.name


def test_a_teacher_continued_from_the_base_shares_its_tokenizer_and_never_sees_an_evaluation_problem(tmp_path):
    """`teacher_from: base` (docs/design.md §7): the base continued on clean demonstrations of the SFT
    skill, drawn from their own stream and never one of the held-out, forgetting or validation problems;
    its build is keyed by every teacher field, and the base's own build never by any."""
    teach = dataclasses.replace(TINY, teacher_from="base", teacher_steps=3, teacher_problems=50, teacher_lr=1e-3)
    assert builder.build_hash(teach) == builder.build_hash(TINY)  # the world stays as registered
    splits = problems.make_splits(builder.rules(teach))
    documents = problems.clean_demonstrations(builder.rules(teach), splits, 400, teach.seed)
    assert len(documents) == 400 and all(d.chat for d in documents)
    questions = {row["question"] for rows in (splits.heldout, splits.forgetting, splits.validation) for row in rows}
    assert not questions & {d.question for d in documents}
    assert all(problems.extract_answer(d.solution) is not None for d in documents)
    for document in documents[:50]:  # every step correct: the solution's own arithmetic checks out
        steps = re.findall(r"(\d+) ([-+*]) (\d+) (?:=|gives|makes) (\d+)\.", document.solution)
        assert steps and all(problems.apply(op, int(a), int(b)) == int(c) for a, op, b, c in steps)
    teacher = builder.build_teacher(teach, tmp_path, progress=False)
    student = builder.build(TINY, tmp_path, progress=False).model
    assert (teacher / "tokenizer.json").read_bytes() == (student / "tokenizer.json").read_bytes()
    info = json.loads((teacher / builder.SUCCESS).read_text())
    assert info["teacher_of"] == student.name and info["weights_from"] == "pretraining"
    base_weights = json.loads((student / builder.SUCCESS).read_text())["weights_sha256"]
    assert info["weights_sha256"] != base_weights
    more = dataclasses.replace(teach, teacher_steps=4)
    assert builder.build_teacher(more, tmp_path, progress=False) != teacher  # a changed teacher is a new build
    assert builder.build_teacher(teach, tmp_path, progress=False) == teacher  # and the same one is reused


def test_the_demo_says_when_its_arithmetic_is_not_the_readmes(monkeypatch):
    from flows import cli as flows_cli

    monkeypatch.setattr(cpu_kernels, "cpu_kind", lambda: "AuthenticAMD/avx2")
    monkeypatch.setattr(cpu_kernels, "mode", lambda: "pinned")
    assert flows_cli.arithmetic_note() is None
    monkeypatch.setattr(cpu_kernels, "cpu_kind", lambda: "GenuineIntel/avx512")
    note = flows_cli.arithmetic_note()
    assert note is not None and note.startswith("note: this run's arithmetic (GenuineIntel/avx512, pinned kernels)")
    monkeypatch.setattr(cpu_kernels, "cpu_kind", lambda: "AuthenticAMD/avx2")
    monkeypatch.setattr(cpu_kernels, "mode", lambda: "portable")
    assert "portable kernels" in (flows_cli.arithmetic_note() or "")
