"""Evaluation: sample n answers per held-out problem, verify them, report Average@n, pass@n, greedy.

Reads top to bottom: setup (model, sets, engine), build (prompts), loop (generate, verify per set),
save (report.json, report.md and samples.jsonl, each written atomically into the output folder).

Answers are checked per set: `numeric` (the embedded task: the number after `####`, else the last
`\\boxed{}`), `math` (math-verify, which understands `\\boxed{}`, LaTeX fractions, intervals, ...)
and `choice` (the option letter of a multiple-choice answer).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from tqdm import tqdm

from pipeline.common.config import to_dict
from pipeline.common.devices import (
    import_vllm,
    resolve_device,
    resolve_dtype,
    resolve_engine,
    set_vllm_cpu_environment,
    shutdown_vllm,
)
from pipeline.common.errors import DataError, EvalError
from pipeline.common.models import load_model, load_model_config, load_tokenizer, pad_id
from pipeline.common.storage import atomic_write_text, fast_hash_file, sha256_json, sums_problem, write_jsonl
from pipeline.data import sources
from pipeline.data.config import DataConfig
from pipeline.evaluation.answers import LETTERS, check_answers
from pipeline.evaluation.config import EvalConfig, EvalSetConfig
from pipeline.evaluation.sampling import sample, sample_key
from pipeline.training.diagnostics import loops

log = logging.getLogger(__name__)

SAMPLER_VERSION = 2
"""2: `pipeline.evaluation.sampling` (per-sample random streams); 1: transformers `generate` (one stream per batch)."""


@dataclass
class Problem:
    """One held-out problem and its reference answer (as text)."""

    question: str
    answer: str
    prompt: str
    """The user turn: the set's prompt_template filled from the row."""


# --- metrics ---------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021)."""
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def summarize(correct: list[list[bool]], greedy: list[bool] | None) -> dict[str, Any]:
    """Average@n (mean accuracy over all samples), pass@n and greedy accuracy over problems."""
    n = len(correct[0])
    out: dict[str, Any] = {
        "problems": len(correct),
        "n": n,
        "average_at_n": sum(sum(row) / n for row in correct) / len(correct),
        "pass_at_n": sum(pass_at_k(n, sum(row), n) for row in correct) / len(correct),
    }
    if greedy is not None:
        out["greedy"] = sum(greedy) / len(greedy)
    return out


# --- engines ---------------------------------------------------------------------------------------


class HFGenerator:
    """transformers models through `pipeline.evaluation.sampling` (static cache, per-sample random streams)."""

    name = "hf"

    def __init__(
        self, model_path: Path, dtype: str, batch_size: int, progress: bool, trust_remote_code: bool, pad: int
    ) -> None:
        self.device = resolve_device("auto")
        dtype = resolve_dtype(dtype, self.device)
        model: Any = load_model(model_path, trust_remote_code, dtype=getattr(torch, dtype))
        self.model = model.to(self.device).eval()
        self.pad_id = pad  # left padding under the attention mask: never generated from
        self.stop_ids = stop_ids(model)
        self.batch_size, self.progress = batch_size, progress

    def generate(
        self, prompts: list[list[int]], n: int, sampling: dict[str, Any], max_new_tokens: int, keys: list[int]
    ) -> list[list[list[int]]]:
        """n completions (token ids) per prompt; `sampling` empty means greedy."""
        outputs: list[list[list[int]]] = []
        batches = range(0, len(prompts), self.batch_size)
        for start in tqdm(batches, desc="generate", unit="batch", disable=not self.progress, mininterval=2.0):
            end = start + self.batch_size
            outputs += sample(
                self.model, prompts[start:end], keys[start:end], n, max_new_tokens, self.stop_ids, self.pad_id,
                temperature=sampling.get("temperature", 1.0), top_p=sampling.get("top_p", 1.0), greedy=not sampling,
            )  # fmt: skip
        return outputs

    def close(self) -> None:
        del self.model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def stop_ids(model: Any) -> list[int]:
    """The tokens that end a completion: the generation config's and the model config's eos ids."""
    ids: set[int] = set()
    for value in (model.generation_config.eos_token_id, model.config.eos_token_id):
        ids.update(value if isinstance(value, list) else [] if value is None else [value])
    return sorted(ids)


class VLLMGenerator:
    """vLLM's offline `LLM` (continuous batching; the fast path on GPUs)."""

    name = "vllm"

    def __init__(self, model_path: Path, cfg: EvalConfig, progress: bool, trust_remote_code: bool) -> None:
        limit = getattr(load_model_config(model_path, trust_remote_code), "max_position_embeddings", cfg.max_model_len)
        set_vllm_cpu_environment()
        LLM = import_vllm().LLM

        self.llm = LLM(
            model=str(model_path),
            tokenizer=str(model_path),
            dtype=cast(Any, resolve_dtype(cfg.dtype, resolve_device("auto"))),
            trust_remote_code=trust_remote_code,
            seed=cfg.seed,  # per-request seeds are not supported by the CPU build; the engine seed is
            max_model_len=min(cfg.max_model_len, limit),
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
        )
        self.progress = progress

    def generate(
        self, prompts: list[list[int]], n: int, sampling: dict[str, Any], max_new_tokens: int, keys: list[int]
    ) -> list[list[list[int]]]:
        """`keys` unused: the CPU build takes no per-request seeds, so vLLM's samples follow `eval.seed` alone."""
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(
            n=n,
            temperature=sampling.get("temperature", 0.0),
            top_p=sampling.get("top_p", 1.0),
            max_tokens=max_new_tokens,
            detokenize=False,
        )
        requests = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        results = self.llm.generate(requests, params, use_tqdm=self.progress)
        return [[list(o.token_ids) for o in r.outputs] for r in results]

    def close(self) -> None:
        shutdown_vllm(self.llm)
        del self.llm


# --- the evaluation --------------------------------------------------------------------------------


def evaluate(
    cfg: EvalConfig,
    model_path: Path,
    out_dir: Path,
    default_sets: Sequence[EvalSetConfig] = (),
    progress: bool = True,
    trust_remote_code: bool = False,
    chat: DataConfig | None = None,
) -> dict[str, Any]:
    """Evaluate one model on every configured set; write report.json, report.md, samples.jsonl.

    Args:
        cfg: What to sample and how.
        model_path: A `from_pretrained` folder (model plus tokenizer).
        out_dir: Where the report files go (created; files replaced atomically).
        default_sets: The sets to use when `cfg.sets` is empty (the embedded held-out problems).
        progress: Show progress bars.
        trust_remote_code: Let the model folder run its own code (`model.trust_remote_code`).
        chat: The training data's chat settings (`data.chat_template`, `data.chat_template_kwargs`),
            so prompts are rendered the way the model was trained.

    Returns:
        The report: per set and overall Average@n, pass@n and greedy accuracy.
    """
    # --- setup: sets, tokenizer, engine ---------------------------------------------------------------
    sets = cfg.sets or list(default_sets)
    _refuse_what_cannot_run(cfg, sets, Path(model_path))
    fingerprint = report_fingerprint(cfg, Path(model_path), sets, chat)
    previous = _read_report(out_dir / "report.json")
    if previous is not None and previous.get("fingerprint") == fingerprint:
        log.info("reusing %s: same model files, eval settings and sets", out_dir / "report.json")
        return {**previous, "reused": True}
    if (damage := sums_problem(Path(model_path))) is not None:  # read only when the model is about to load
        raise EvalError(f"the model in {model_path} is damaged: {damage}; train the run again, or restore the folder")
    problems = {s.name: load_problems(s, cfg.limit) for s in sets}
    tokenizer = load_tokenizer(Path(model_path), trust_remote_code)
    chat = chat or DataConfig()
    if chat.chat_template is not None:
        tokenizer.chat_template = sources.chat_template_text(chat.chat_template)
    engine_name = resolve_engine(cfg.engine, "eval.engine")
    started = time.time()
    engine: HFGenerator | VLLMGenerator
    if engine_name == "vllm":
        engine = VLLMGenerator(Path(model_path), cfg, progress, trust_remote_code)
    else:
        engine = HFGenerator(
            Path(model_path), cfg.dtype, cfg.batch_size, progress, trust_remote_code, pad_id(tokenizer)
        )
    sampling = {"temperature": cfg.temperature, "top_p": cfg.top_p}

    # --- loop: generate and verify, set by set ---------------------------------------------------------
    report: dict[str, Any] = {
        "model": str(model_path),
        "fingerprint": fingerprint,
        "engine": engine_name,
        **{k: getattr(cfg, k) for k in ("n", "temperature", "top_p", "max_new_tokens", "seed")},
        "sets": {},
    }
    samples: list[dict[str, Any]] = []
    try:
        for s in sets:
            report["sets"][s.name], records = evaluate_set(
                engine, tokenizer, s, problems[s.name], cfg, sampling, chat.chat_template_kwargs
            )
            samples += records
    finally:
        engine.close()
    report["overall"] = overall(report["sets"])
    report["seconds"] = round(time.time() - started, 1)

    # --- save ------------------------------------------------------------------------------------
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "samples.jsonl", samples)
    atomic_write_text(out_dir / "report.md", markdown_report(report))
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2))  # last: its presence means done
    return report


def _refuse_what_cannot_run(cfg: EvalConfig, sets: list[EvalSetConfig], model_path: Path) -> None:
    """One line, before anything loads, for an evaluation that cannot run."""
    if not sets:
        raise EvalError("no evaluation sets: list them under eval.sets (name, path, answer_type)")
    if cfg.n < 1 or cfg.max_new_tokens < 1:
        raise EvalError(f"eval.n={cfg.n} and eval.max_new_tokens={cfg.max_new_tokens} must both be >= 1")
    if not (model_path / "config.json").exists():
        raise EvalError(f"no model at {model_path} (config.json missing); train it first or fix eval.model_path")


def report_fingerprint(cfg: EvalConfig, model_path: Path, sets: list[EvalSetConfig], chat: DataConfig | None) -> str:
    """Identity of an evaluation: its settings, the name, size and mtime of every model and set file,
    and the content of every set file (they are small; model weights are not re-read).

    A retrained model is written to a new folder and renamed into place, so its files get new
    mtimes; an unchanged model and unchanged settings give the same fingerprint and the report is reused.
    SAMPLER_VERSION keeps reports drawn by an older decode loop from being reused beside new ones.
    """
    files = [p for p in sorted(model_path.iterdir()) if p.is_file()]
    set_files: list[Path] = []
    for s in sets:
        path = Path(s.path)
        set_files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    files += set_files
    stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.exists()]
    contents = [(str(p), fast_hash_file(p)) for p in set_files if p.exists()]  # same size and mtime, new answers
    template = {} if chat is None else {"template": chat.chat_template, "kwargs": chat.chat_template_kwargs}
    identity = {"sampler": SAMPLER_VERSION, "eval": to_dict(cfg), "sets": [to_dict(s) for s in sets]}
    return sha256_json({**identity, "files": stats, "set_contents": contents, **template})


def _read_report(path: Path) -> dict[str, Any] | None:
    try:
        return cast(dict[str, Any], json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def evaluate_set(
    engine: HFGenerator | VLLMGenerator,
    tokenizer: Any,
    s: EvalSetConfig,
    problems: list[Problem],
    cfg: EvalConfig,
    sampling: dict[str, Any],
    template_kwargs: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Sample, decode greedily and verify one set; returns its summary and one record per problem."""
    prompts = [prompt_ids(tokenizer, p.prompt, cfg.system_prompt, template_kwargs) for p in problems]
    keys = [sample_key(cfg.seed, s.name, i) for i in range(len(problems))]
    sampled = engine.generate(prompts, cfg.n, sampling, cfg.max_new_tokens, keys)
    greedy = engine.generate(prompts, 1, {}, cfg.max_new_tokens, keys) if cfg.greedy else None
    texts = [tokenizer.batch_decode(sampled[i], skip_special_tokens=True) for i in range(len(problems))]
    greedy_texts = [str(tokenizer.decode(g[0], skip_special_tokens=True)) for g in greedy] if greedy else []
    verdicts = check_answers(
        [(t, p.answer) for p, row in zip(problems, texts, strict=True) for t in row]
        + [(t, p.answer) for p, t in zip(problems, greedy_texts, strict=False)],
        s.answer_type,
    )
    correct = [verdicts[i * cfg.n : (i + 1) * cfg.n] for i in range(len(problems))]
    greedy_correct = verdicts[len(problems) * cfg.n :]
    # collapse: a sample that never ends (all max_new_tokens used) or loops (diagnostics.loops)
    collapsed = [
        [len(ids) >= cfg.max_new_tokens or loops(list(ids)) for ids in sampled[i]] for i in range(len(problems))
    ]
    records = []
    for i, problem in enumerate(problems):
        record: dict[str, Any] = {"set": s.name, "question": problem.question, "answer": problem.answer}
        record.update(samples=texts[i], correct=correct[i], collapsed=collapsed[i])
        if greedy is not None:
            record.update(greedy=greedy_texts[i], greedy_correct=greedy_correct[i])
        records.append(record)
    summary = summarize(correct, greedy_correct if greedy is not None else None)
    summary["collapsed_share"] = sum(map(sum, collapsed)) / (len(problems) * cfg.n)
    return summary, records


PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def load_problems(s: EvalSetConfig, limit: int | None) -> list[Problem]:
    """Rows of one set as problems, each with its prompt rendered from the template.

    `{question}` is the question column whatever its name; `{name}` is any other column of the set
    (a dict or list column, such as multiple-choice options, renders as `A. ...` lines). Other
    braces stay as they are. A template naming a missing column, or the answer column, is refused.
    """
    try:
        source = sources.open_source(s.path, s.split, s.subset)
    except DataError as e:
        raise EvalError(f"eval set {s.name!r}: {e}") from None
    used = {name for name in PLACEHOLDER.findall(s.prompt_template) if name != "question"}
    for column in [s.question_column, s.answer_column, *sorted(used)]:
        if column not in source.columns:
            raise EvalError(
                f"eval set {s.name!r}: column {column!r} not found (columns: {sorted(source.columns)}); "
                "set question_column/answer_column or fix prompt_template"
            )
    if s.answer_column in used:
        raise EvalError(f"eval set {s.name!r}: prompt_template names the answer column {s.answer_column!r}")
    rows = source.read(sorted({s.question_column, s.answer_column} | used))
    rows = rows[: min(x for x in (limit, s.limit, len(rows)) if x is not None)]
    if not rows:
        raise EvalError(f"eval set {s.name!r} ({s.path}) has no rows")
    missing = [i for i, r in enumerate(rows) if r[s.answer_column] is None or str(r[s.answer_column]).strip() == ""]
    if missing:
        raise EvalError(
            f"eval set {s.name!r}: rows {missing[:5]} have no reference answer in column {s.answer_column!r}; "
            "fix or drop them (every problem needs an answer to score)"
        )
    return [Problem(str(r[s.question_column]), str(r[s.answer_column]), render_prompt(s, r)) for r in rows]


def render_prompt(s: EvalSetConfig, row: dict[str, Any]) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        return _as_text(row[s.question_column] if name == "question" else row[name])

    return PLACEHOLDER.sub(value, s.prompt_template)


def _as_text(value: Any) -> str:
    """Options as people write them: a dict {A: ..} or a list renders as `A. ...` lines."""
    if isinstance(value, dict):
        return "\n".join(f"{k}. {v}" for k, v in value.items())
    if isinstance(value, list):
        return "\n".join(f"{LETTERS[i]}. {v}" for i, v in enumerate(value[: len(LETTERS)]))
    return str(value)


def prompt_ids(tokenizer: Any, user_text: str, system: str | None, kwargs: dict[str, Any] | None = None) -> list[int]:
    """The chat-formatted prompt (generation prompt opened) as token ids; plain text without a template."""
    if tokenizer.chat_template is None:
        return list(tokenizer(user_text, add_special_tokens=True)["input_ids"])
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user_text}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **(kwargs or {}))
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def overall(per_set: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Problem-weighted means over sets."""
    total = sum(s["problems"] for s in per_set.values())
    keys = [k for k in ("average_at_n", "pass_at_n", "greedy") if all(k in s for s in per_set.values())]
    out: dict[str, Any] = {"problems": total}
    for k in keys:
        out[k] = sum(s[k] * s["problems"] for s in per_set.values()) / total
    return out


def markdown_report(report: dict[str, Any]) -> str:
    n = report["n"]
    lines = [
        f"# Evaluation of `{report['model']}`",
        "",
        f"engine {report['engine']}, n={n}, temperature {report['temperature']}, top_p {report['top_p']}, "
        f"max new tokens {report['max_new_tokens']}, seed {report['seed']}",
        "",
        f"| set | problems | Average@{n} | pass@{n} | greedy |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, s in [*report["sets"].items(), ("overall", report["overall"])]:
        greedy = f"{s['greedy']:.1%}" if "greedy" in s else "-"
        lines.append(f"| {name} | {s['problems']} | {s['average_at_n']:.1%} | {s['pass_at_n']:.1%} | {greedy} |")
    return "\n".join(lines) + "\n"
