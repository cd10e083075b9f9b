"""The embedded world: its data, tokenizer, base model and teacher, built here from nothing in a few CPU
minutes (or loaded from the shipped weights).

`build` generates the problems (`problems.py`), trains a byte-level BPE tokenizer (digits split), pretrains
a ~1M-parameter Llama-architecture model on plain-text problems and saves everything with
`save_pretrained` (safetensors) so transformers and vLLM load it offline. It is idempotent: a
finished build with the same config is reused. `evaluate` reports greedy held-out accuracy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from pipeline.common import cpu_kernels
from pipeline.common.config import to_dict
from pipeline.common.errors import ModelError
from pipeline.common.storage import atomic_dir, inside, sha256_json, write_jsonl
from pipeline.evaluation.config import EvalSetConfig
from pipeline.training.schedule import warmup_cosine
from pipeline.world import problems
from pipeline.world.config import WorldConfig

EOS, PAD, END = "<|endoftext|>", "<|pad|>", "<|end|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [EOS, PAD, END, *ROLE_TOKENS]
# Each turn is `<|role|>\n content <|end|>\n`; the generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)
SUCCESS = "_SUCCESS"


@dataclass
class WorldPaths:
    """Where one embedded build lives."""

    model: Path
    """`from_pretrained` folder: weights, config, tokenizer, chat template."""
    datasets: Path
    """sft_train.jsonl and the evaluation splits (chat rows with `question` and `answer`)."""

    @property
    def sft_train(self) -> Path:
        return self.datasets / "sft_train.jsonl"

    @property
    def sft_heldout(self) -> Path:
        """The held-out problems of the SFT skill."""
        return self.datasets / "sft_heldout.jsonl"

    @property
    def forgetting(self) -> Path:
        """Held-out problems of the old skill (empty when `forgetting_problems` is 0)."""
        return self.datasets / "forgetting.jsonl"

    @property
    def validation(self) -> Path:
        """Where `target-sft select` chooses settings; disjoint from the held-out problems."""
        return self.datasets / "validation.jsonl"


def paths(cfg: WorldConfig, storage_root: str | Path) -> WorldPaths:
    """Folders named `<name>-<config hash>`: a changed config never overwrites an older build."""
    folder = f"{cfg.name}-{build_hash(cfg)[:8]}"
    return WorldPaths(inside(storage_root, "models", folder), inside(storage_root, "datasets", folder))


# Bumped whenever the build's code makes something else from the same config (data, tokenizer, training),
# so a build made by older code is never reused as this code's.
BUILD_VERSION = 2


# Fields added after BUILD_VERSION 2, with the value that builds what came before: left at it, they
# stay out of the hash, so the builds made before they existed keep their names and are reused.
ADDED_LATER = {"own_style_share": 0.0}


def build_hash(cfg: WorldConfig) -> str:
    """Identity of a build: every field that shapes it (the teacher's fields shape only the teacher's)."""
    fields = {
        k: v
        for k, v in to_dict(cfg).items()
        if not k.startswith("teacher_") and not (k in ADDED_LATER and v == ADDED_LATER[k])
    }
    return sha256_json({**fields, "build_version": BUILD_VERSION})


SHIPPED = Path(__file__).resolve().parent / "shipped"
"""Pretrained weights of the registered worlds' bases (`<name>-<hash8>.safetensors`) with the
checksum of the build that made them (`<name>-<hash8>.json`): the demo's first run loads them
instead of spending minutes pretraining. `build(..., from_scratch=True)` pretrains and compares."""


def shipped_weights(cfg: WorldConfig) -> tuple[Path, dict[str, Any]] | None:
    """The shipped weights file of this build and its record, if the repository holds them."""
    return shipped_by_name(f"{cfg.name}-{build_hash(cfg)[:8]}")


def build(cfg: WorldConfig, storage_root: str | Path, progress: bool = True, from_scratch: bool = False) -> WorldPaths:
    """Build the embedded base model and its data, or reuse a finished build of the same config.

    Where the repository ships this build's weights (`SHIPPED`), they are loaded and checked
    against the recorded checksum instead of pretraining; `from_scratch` pretrains anyway (into a
    fresh root, to compare with the shipped bits: `target-sft world build --from-scratch`).
    """
    out = paths(cfg, storage_root)
    if (out.model / SUCCESS).exists():
        return out

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    splits = problems.make_splits(rules(cfg))
    tokenizer = train_tokenizer(splits, cfg.vocab_size)
    model = new_model(cfg, tokenizer)
    started = time.time()
    shipped = None if from_scratch else shipped_weights(cfg)
    if shipped is not None:
        losses = _load_shipped(model, *shipped)
    else:
        losses = pretrain(model, tokenizer, [document_text(d) for d in splits.pretrain], cfg, progress)
    if (out.model / SUCCESS).exists():  # another process finished the same (deterministic) build meanwhile
        return out
    for folder in (out.datasets, out.model):
        if folder.exists():  # a leftover from an interrupted build: it has no marker
            shutil.rmtree(folder)
    with atomic_dir(out.datasets) as tmp:
        write_jsonl(tmp / "sft_train.jsonl", splits.sft_train)
        write_jsonl(tmp / "sft_heldout.jsonl", splits.heldout)
        write_jsonl(tmp / "forgetting.jsonl", splits.forgetting)
        write_jsonl(tmp / "validation.jsonl", splits.validation)
    with atomic_dir(out.model) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {
            "build_hash": build_hash(cfg),
            "config": to_dict(cfg),
            "parameters": sum(p.numel() for p in model.parameters()),
            "pretrain_seconds": round(time.time() - started, 1),
            "precision": resolve_precision(cfg.precision),
            "final_loss": sum(losses[-20:]) / len(losses[-20:]) if losses else None,
            "weights_sha256": weights_checksum(model),
            "weights_from": "shipped" if shipped is not None else "pretraining",
        }
        (tmp / SUCCESS).write_text(json.dumps(info, indent=2))
    return out


def _load_shipped(model: torch.nn.Module, path: Path, record: dict[str, Any]) -> list[float]:
    """Load shipped weights into the freshly made model, refused unless their checksum is the one the
    pretraining recorded (a damaged or swapped file must not become a world's base)."""
    from safetensors.torch import load_file

    state = load_file(path)
    state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])  # tied: saved once
    model.load_state_dict(state)
    if weights_checksum(model) != record["weights_sha256"]:
        raise ModelError(f"{path} does not hold the weights its record names; restore it (git checkout -- {path.name})")
    return []


def ship(cfg: WorldConfig, built: WorldPaths) -> Path:
    """Copy a finished from-scratch build's weights into `SHIPPED` with its checksum (maintainers:
    after registering a world, commit the two files)."""
    return _ship_files(built.model, SHIPPED / f"{cfg.name}-{build_hash(cfg)[:8]}")


def _ship_files(model: Path, stem: Path) -> Path:
    info = json.loads((model / SUCCESS).read_text())
    SHIPPED.mkdir(exist_ok=True)
    shutil.copyfile(model / "model.safetensors", stem.with_suffix(".safetensors"))
    record = {k: info[k] for k in ("build_hash", "weights_sha256", "precision", "final_loss", "pretrain_seconds")}
    kernels = {k: os.environ.get(k) for k in cpu_kernels.PINNED}  # the arithmetic it was built in
    stem.with_suffix(".json").write_text(json.dumps({**record, "cpu_kernels": kernels}, indent=2) + "\n")
    return stem.with_suffix(".safetensors")


def rules(cfg: WorldConfig) -> problems.Rules:
    """The rules of the problems a world config describes (every `Rules` field has the config field's name)."""
    return problems.Rules(
        max_steps=cfg.max_steps_per_problem,
        **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(problems.Rules) if f.name != "max_steps"},
    )


def build_teacher(
    cfg: WorldConfig, storage_root: str | Path, progress: bool = True, from_scratch: bool = False
) -> Path:
    """The embedded teacher's model folder (`priors.embedded_teacher`), built on first use.

    `teacher_from: scratch` pretrains a larger model on the base's corpus (`teacher_config`);
    `teacher_from: base` continues the world's base on clean demonstrations of the SFT skill. Both
    share the base's tokenizer byte for byte. Shipped weights (`SHIPPED`) replace the training as
    they do for bases.
    """
    if cfg.teacher_from == "scratch":
        return build(teacher_config(cfg), storage_root, progress, from_scratch).model
    base = build(cfg, storage_root, progress)
    name = f"{cfg.name}-teacher-{teacher_hash(cfg)[:8]}"
    out = inside(storage_root, "models", name)
    if (out / SUCCESS).exists():
        return out
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base.model)
    model = LlamaForCausalLM.from_pretrained(base.model, torch_dtype=torch.float32)
    started = time.time()
    shipped = None if from_scratch else shipped_by_name(name)
    if shipped is not None:
        losses = _load_shipped(model, *shipped)
    else:
        world_ = rules(cfg)
        documents = problems.clean_demonstrations(world_, problems.make_splits(world_), cfg.teacher_problems, cfg.seed)
        steps = dataclasses.replace(
            cfg, steps=cfg.teacher_steps, lr=cfg.teacher_lr, warmup_steps=min(cfg.warmup_steps, cfg.teacher_steps // 10)
        )
        losses = pretrain(model, tokenizer, [document_text(d) for d in documents], steps, progress)
    if (out / SUCCESS).exists():
        return out
    if out.exists():
        shutil.rmtree(out)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {
            "build_hash": teacher_hash(cfg),
            "teacher_of": base.model.name,
            "config": {k: v for k, v in to_dict(cfg).items() if k.startswith("teacher_")},
            "parameters": sum(p.numel() for p in model.parameters()),
            "pretrain_seconds": round(time.time() - started, 1),
            "precision": "fp32",
            "final_loss": sum(losses[-20:]) / len(losses[-20:]) if losses else None,
            "weights_sha256": weights_checksum(model),
            "weights_from": "shipped" if shipped is not None else "pretraining",
        }
        (tmp / SUCCESS).write_text(json.dumps(info, indent=2))
    return out


def teacher_hash(cfg: WorldConfig) -> str:
    """Identity of a `teacher_from: base` teacher: its base's build and every teacher field."""
    fields = {k: v for k, v in to_dict(cfg).items() if k.startswith("teacher_")}
    return sha256_json({"base": build_hash(cfg), **fields, "teacher_version": 1})


def shipped_by_name(name: str) -> tuple[Path, dict[str, Any]] | None:
    """The shipped weights file named `<name>.safetensors` (a base's or a teacher's folder name) and
    its record, if the repository holds them."""
    stem = SHIPPED / name
    if not stem.with_suffix(".safetensors").exists():
        return None
    return stem.with_suffix(".safetensors"), json.loads(stem.with_suffix(".json").read_text())


def ship_teacher(built: Path) -> Path:
    """Copy a finished `teacher_from: base` build into `SHIPPED` with its checksum (maintainers)."""
    return _ship_files(built, SHIPPED / built.name)


def teacher_config(cfg: WorldConfig) -> WorldConfig:
    """The embedded teacher: the same data (hence the same tokenizer), a larger model, more steps."""
    return dataclasses.replace(
        cfg,
        name=f"{cfg.name}-teacher",
        hidden_size=cfg.teacher_hidden_size,
        num_layers=cfg.teacher_num_layers,
        intermediate_size=4 * cfg.teacher_hidden_size,
        steps=cfg.teacher_steps,
    )


def document_text(doc: problems.Document) -> str:
    """A pretraining document: a chat exactly as CHAT_TEMPLATE renders it, or plain text."""
    if doc.chat:
        return f"<|user|>\n{doc.question}{END}\n<|assistant|>\n{doc.solution}{END}\n"
    return problems.plain_prompt(doc.question) + " " + doc.solution


def weights_checksum(model: torch.nn.Module) -> str:
    """sha256 over every parameter's bytes, in name order: equal checksums mean bit-identical models."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def train_tokenizer(splits: problems.Splits, vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE with single-digit tokens and the chat special tokens, trained on the pretraining text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The pretraining text alone, as for a real base model: the SFT set (its noise, its phrasing) never
    # shapes the vocabulary, so worlds that differ only in their SFT set share the base model.
    texts = [text for d in splits.pretrain for text in (problems.plain_prompt(d.question), d.solution)]
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[END, *ROLE_TOKENS],
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def new_model(cfg: WorldConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A randomly initialised Llama; vLLM and transformers both load this architecture."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        head_dim=cfg.hidden_size // cfg.num_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END)],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return model


def pretrain(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    documents: list[str],
    cfg: WorldConfig,
    progress: bool,
    on_step: Callable[[int], None] | None = None,
) -> list[float]:
    """Causal-LM pretraining on packed sequences for a fixed number of steps. `on_step(steps done)`
    runs after every optimizer step (benchmarks/base_curve.py evaluates there); it must leave the
    model's weights and the global RNG as it found them."""
    ids: list[int] = []
    for encoded in tokenizer(documents, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(tokenizer.eos_token_id)
    n_seq = len(ids) // cfg.seq_len
    sequences = torch.tensor(ids[: n_seq * cfg.seq_len]).view(n_seq, cfg.seq_len)
    generator = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(n_seq, generator=generator)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=0.1, betas=(0.9, 0.95), fused=cpu_kernels.adamw_fused("cpu")
    )

    use_bf16 = resolve_precision(cfg.precision) == "bf16"
    model.train()
    losses = []
    bar = tqdm(range(cfg.steps), desc="pretrain", unit="step", disable=not progress, mininterval=2.0)
    for step in bar:
        start = (step * cfg.batch_size) % n_seq
        if start + cfg.batch_size > n_seq:  # next epoch: reshuffle
            order = torch.randperm(n_seq, generator=generator)
            start = 0
        batch = sequences[order[start : start + cfg.batch_size]]
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * warmup_cosine(step, cfg.warmup_steps, cfg.steps)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1)
        tokens_per_s = (bar.format_dict["rate"] or 0) * batch.numel()
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens_per_s:.0f}", refresh=False)
    model.eval()
    return losses


def resolve_precision(precision: str) -> str:
    """`auto` means bf16 where the CPU computes it natively (AVX512-BF16), else fp32."""
    if precision != "auto":
        return precision
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return "bf16" if native else "fp32"


@torch.no_grad()
def greedy_answers(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    prompts: list[str],
    max_new_tokens: int = 96,
    batch_size: int = 100,
) -> list[str]:
    """Greedy completions of raw prompt strings (left-padded batches)."""
    tokenizer.padding_side = "left"
    outputs = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        generated = cast(Any, model).generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        outputs += tokenizer.batch_decode(generated[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return outputs


def evaluate(model_path: str | Path, heldout: list[dict], fmt: str = "plain") -> dict:
    """Greedy held-out accuracy in the pretraining (`plain`) or chat (`chat`) format.

    Returns accuracy, the count, and the trivial baseline (always answer the most common answer).
    """
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_path)
    model = LlamaForCausalLM.from_pretrained(model_path).eval()
    if fmt == "plain":
        prompts = [problems.plain_prompt(row["question"]) for row in heldout]
    else:
        prompts = [
            tokenizer.apply_chat_template([row["messages"][0]], tokenize=False, add_generation_prompt=True)
            for row in heldout
        ]
    completions = greedy_answers(model, tokenizer, prompts)
    answers = [row["answer"] for row in heldout]
    correct = [problems.extract_answer(c) == a for c, a in zip(completions, answers, strict=True)]
    majority = Counter(answers).most_common(1)[0][1] / len(answers)
    return {
        "format": fmt,
        "n": len(heldout),
        "accuracy": sum(correct) / len(correct),
        "majority_baseline": majority,
        "example": {"prompt": prompts[0], "completion": completions[0], "answer": answers[0]},
    }


def embedded_sets(build: WorldPaths, forgetting: bool = True) -> list[EvalSetConfig]:
    """The embedded build's held-out problems of the SFT skill and, where it has them and `forgetting`
    is on, of the old skill. The first set is the one comparisons are made on."""
    sets = [EvalSetConfig(name=EMBEDDED_SET, path=str(build.sft_heldout), answer_type="numeric")]
    if forgetting and build.forgetting.exists() and build.forgetting.stat().st_size > 0:
        sets.append(EvalSetConfig(name=FORGETTING_SET, path=str(build.forgetting), answer_type="numeric"))
    return sets


def validation_set(build: WorldPaths) -> EvalSetConfig:
    """The embedded validation split (where `target-sft select` chooses settings)."""
    return EvalSetConfig(name=VALIDATION_SET, path=str(build.validation), answer_type="numeric")


EMBEDDED_SET = "arith-heldout"


FORGETTING_SET = "arith-forgetting"


VALIDATION_SET = "arith-validation"
