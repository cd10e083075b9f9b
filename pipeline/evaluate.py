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
import threading
import time
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, cast

import torch
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from pipeline import data
from pipeline.config import EvalConfig, EvalSetConfig, RunConfig
from pipeline.prior_engines import set_vllm_cpu_environment, shutdown_vllm
from pipeline.priors import resolve_device, resolve_dtype, resolve_engine
from pipeline.resolve import resolve_inputs
from pipeline.storage import atomic_write_text, write_jsonl

EMBEDDED_SET = "arith-heldout"
LETTERS = "ABCDEFGHIJ"


class EvalError(ValueError):
    """Evaluation cannot run as configured; the message says what to change."""


@dataclass
class Problem:
    """One held-out problem and its reference answer (as text)."""

    question: str
    answer: str


# --- answer checking -------------------------------------------------------------------------------

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"


def last_boxed(text: str) -> str | None:
    r"""Content of the last `\boxed{...}` (nested braces allowed), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def to_number(text: str) -> Decimal | None:
    """`1,000` -> 1000, `-3.50` -> -3.5; None for anything that is not just a number."""
    cleaned = text.strip().strip("$").rstrip(".").replace(",", "").strip()
    if not re.fullmatch(r"-?\d+(?:\.\d+)?", cleaned):
        return None
    try:
        return Decimal(cleaned)
    except InvalidOperation:
        return None


def extract_number(completion: str) -> Decimal | None:
    """The number after the first `####` (the embedded task's answer line), else the last box."""
    match = re.search(rf"####\s*({_NUMBER})", completion)
    if match:
        return to_number(match.group(1))
    boxed = last_boxed(completion)
    return to_number(boxed) if boxed is not None else None


def normalize_choice(reference: str) -> str | None:
    """`B`, `(b)`, `B)`, `B. some text` -> `B`."""
    match = re.match(rf"^\s*\(?([{LETTERS}{LETTERS.lower()}])\)?(?:[.:)\s]|$)", str(reference))
    return match.group(1).upper() if match else None


def extract_choice(completion: str) -> str | None:
    """The chosen option letter: a boxed letter, `answer is (B)`, `#### B`, or a lone letter."""
    boxed = last_boxed(completion)
    if boxed is not None:
        letters = re.findall(rf"\b([{LETTERS}])\b", boxed)
        if letters:
            return letters[0]
    for pattern in (
        rf"[Aa]nswer(?: is)?\s*[:：]?\s*\(?([{LETTERS}])\)?(?![A-Za-z])",
        rf"####\s*\(?([{LETTERS}])\)?(?![A-Za-z])",
        rf"^\s*\(?([{LETTERS}])\)?[.)]?\s*$",
        rf"\(([{LETTERS}])\)",
    ):
        found = re.findall(pattern, completion, flags=re.MULTILINE)
        if found:
            return str(found[-1])
    return None


def verify_math(completion: str, reference: str) -> bool:
    """math-verify equivalence of the completion's final answer and the reference."""
    from math_verify import parse, verify

    # math-verify's timeouts use SIGALRM, which only the main thread may set (flows run tasks in threads).
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    boxed = last_boxed(completion)
    if boxed is not None:  # the last box is the final answer (earlier ones may be drafts)
        completion = f"\\boxed{{{boxed}}}"
    else:
        completion = re.sub(r"####\s*(.+)", lambda m: f"\\boxed{{{m.group(1).strip()}}}", completion, count=1)
    gold_text = reference if ("$" in reference or "\\boxed" in reference) else f"${reference}$"
    gold = parse(gold_text, parsing_timeout=cast(int, timeout))
    predicted = parse(completion, parsing_timeout=cast(int, timeout))
    return bool(gold) and bool(predicted) and verify(gold, predicted, timeout_seconds=timeout)


def is_correct(completion: str, reference: str, answer_type: str) -> bool:
    """Whether a completion's answer matches the reference under the set's answer type."""
    if answer_type == "numeric":
        got, want = extract_number(completion), to_number(str(reference))
        return got is not None and want is not None and got == want
    if answer_type == "choice":
        want_letter = normalize_choice(str(reference))
        return want_letter is not None and extract_choice(completion) == want_letter
    return verify_math(completion, str(reference))


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
    """transformers `generate` over left-padded batches of token-id prompts."""

    name = "hf"

    def __init__(self, model_path: Path, dtype: str, batch_size: int, progress: bool) -> None:
        self.device = resolve_device("auto")
        model: Any = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=getattr(torch, resolve_dtype(dtype, self.device))
        )
        self.model = model.to(self.device).eval()
        self.pad_id = self.model.generation_config.pad_token_id or self.model.config.eos_token_id or 0
        self.batch_size, self.progress = batch_size, progress

    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], n: int, sampling: dict[str, Any], max_new_tokens: int
    ) -> list[list[list[int]]]:
        """n completions (token ids) per prompt; `sampling` empty means greedy."""
        outputs: list[list[list[int]]] = []
        batches = range(0, len(prompts), self.batch_size)
        for start in tqdm(batches, desc="generate", unit="batch", disable=not self.progress):
            chunk = prompts[start : start + self.batch_size]
            longest = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), longest), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, p in enumerate(chunk):
                ids[row, longest - len(p) :] = torch.tensor(p)
                mask[row, longest - len(p) :] = 1
            generated = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=max_new_tokens,
                num_return_sequences=n,
                pad_token_id=self.pad_id,
                **(sampling or {"do_sample": False}),
            )[:, longest:].cpu()
            for row in range(len(chunk)):
                outputs.append([generated[row * n + j].tolist() for j in range(n)])
        return outputs

    def close(self) -> None:
        del self.model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class VLLMGenerator:
    """vLLM's offline `LLM` (continuous batching; the fast path on GPUs)."""

    name = "vllm"

    def __init__(self, model_path: Path, cfg: EvalConfig, progress: bool) -> None:
        set_vllm_cpu_environment()
        from vllm import LLM

        limit = getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", cfg.max_model_len)
        self.llm = LLM(
            model=str(model_path),
            tokenizer=str(model_path),
            dtype=cast(Any, resolve_dtype(cfg.dtype, resolve_device("auto"))),
            seed=cfg.seed,  # per-request seeds are not supported by the CPU build; the engine seed is
            max_model_len=min(cfg.max_model_len, limit),
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
        )
        self.progress = progress

    def generate(
        self, prompts: list[list[int]], n: int, sampling: dict[str, Any], max_new_tokens: int
    ) -> list[list[list[int]]]:
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
    default_set: EvalSetConfig | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate one model on every configured set; write report.json, report.md, samples.jsonl.

    Args:
        cfg: What to sample and how.
        model_path: A `from_pretrained` folder (model plus tokenizer).
        out_dir: Where the report files go (created; files replaced atomically).
        default_set: The set to use when `cfg.sets` is empty (the embedded held-out problems).
        progress: Show progress bars.

    Returns:
        The report: per set and overall Average@n, pass@n and greedy accuracy.
    """
    # --- setup: sets, tokenizer, engine ---------------------------------------------------------------
    sets = cfg.sets or ([default_set] if default_set else [])
    if not sets:
        raise EvalError("no evaluation sets: list them under eval.sets (name, path, answer_type)")
    if cfg.n < 1 or cfg.max_new_tokens < 1:
        raise EvalError(f"eval.n={cfg.n} and eval.max_new_tokens={cfg.max_new_tokens} must both be >= 1")
    problems = {s.name: load_problems(s, cfg.limit) for s in sets}
    if not (Path(model_path) / "config.json").exists():
        raise EvalError(f"no model at {model_path} (config.json missing); train it first or fix eval.model_path")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    engine_name = resolve_engine(cfg.engine)
    started = time.time()
    engine: HFGenerator | VLLMGenerator
    if engine_name == "vllm":
        engine = VLLMGenerator(Path(model_path), cfg, progress)
    else:
        engine = HFGenerator(Path(model_path), cfg.dtype, cfg.batch_size, progress)
    torch.manual_seed(cfg.seed)
    sampling = {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": 0}

    # --- loop: generate and verify, set by set ---------------------------------------------------------
    report: dict[str, Any] = {
        "model": str(model_path),
        "engine": engine_name,
        **{k: getattr(cfg, k) for k in ("n", "temperature", "top_p", "max_new_tokens", "seed")},
        "sets": {},
    }
    samples: list[dict[str, Any]] = []
    try:
        for s in sets:
            report["sets"][s.name], records = evaluate_set(engine, tokenizer, s, problems[s.name], cfg, sampling)
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


def evaluate_set(
    engine: HFGenerator | VLLMGenerator,
    tokenizer: Any,
    s: EvalSetConfig,
    problems: list[Problem],
    cfg: EvalConfig,
    sampling: dict[str, Any],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Sample, decode greedily and verify one set; returns its summary and one record per problem."""
    prompts = [
        prompt_ids(tokenizer, s.prompt_template.replace("{question}", p.question), cfg.system_prompt) for p in problems
    ]
    sampled = engine.generate(prompts, cfg.n, sampling, cfg.max_new_tokens)
    greedy = engine.generate(prompts, 1, {}, cfg.max_new_tokens) if cfg.greedy else None
    correct, greedy_correct, records = [], [], []
    for i, problem in enumerate(problems):
        texts = tokenizer.batch_decode(sampled[i], skip_special_tokens=True)
        correct.append([is_correct(t, problem.answer, s.answer_type) for t in texts])
        record: dict[str, Any] = {"set": s.name, "question": problem.question, "answer": problem.answer}
        record.update(samples=texts, correct=correct[-1])
        if greedy is not None:
            text = str(tokenizer.decode(greedy[i][0], skip_special_tokens=True))
            greedy_correct.append(is_correct(text, problem.answer, s.answer_type))
            record.update(greedy=text, greedy_correct=greedy_correct[-1])
        records.append(record)
    return summarize(correct, greedy_correct if greedy is not None else None), records


def load_problems(s: EvalSetConfig, limit: int | None) -> list[Problem]:
    """Rows of one set as problems; a missing column is an error that names the column."""
    try:
        rows = data.load_rows(s.path)
    except data.DataError as e:
        raise EvalError(f"eval set {s.name!r}: {e}") from None
    rows = rows[: min(x for x in (limit, s.limit, len(rows)) if x is not None)]
    if not rows:
        raise EvalError(f"eval set {s.name!r} ({s.path}) has no rows")
    for column in (s.question_column, s.answer_column):
        if column not in rows[0]:
            raise EvalError(
                f"eval set {s.name!r}: column {column!r} not found (columns: {sorted(rows[0])}); "
                "set question_column/answer_column"
            )
    return [Problem(str(r[s.question_column]), str(r[s.answer_column])) for r in rows]


def prompt_ids(tokenizer: Any, user_text: str, system: str | None) -> list[int]:
    """The chat-formatted prompt (generation prompt opened) as token ids; plain text without a template."""
    if tokenizer.chat_template is None:
        return list(tokenizer(user_text, add_special_tokens=True)["input_ids"])
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user_text}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
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


def embedded_set(heldout_path: Path) -> EvalSetConfig:
    """The embedded base model's held-out arithmetic problems (numeric answers)."""
    return EvalSetConfig(name=EMBEDDED_SET, path=str(heldout_path), answer_type="numeric")


def eval_target(cfg: RunConfig, base: bool = False) -> tuple[Path, Path, EvalSetConfig | None]:
    """Which model `target-sft eval` evaluates, where its report goes, and the default set.

    Default: the trained run `<storage>/runs/<train.name>/final`, reported into that run's `eval/`.
    `base=True`: the untrained base model, reported into `<storage>/evals/base-<model folder>/`.
    """
    storage = Path(cfg.storage_root)
    run = storage / "runs" / cfg.train.name
    if not base and not cfg.eval.model_path and not (run / "final" / "config.json").exists():
        raise EvalError(
            f"run {cfg.train.name!r} has no final model at {run / 'final'}; train it first "
            "(`target-sft train`), or set eval.model_path, or pass --base"
        )
    inputs = resolve_inputs(cfg, progress=False) if (base or not cfg.eval.sets) else None
    default = embedded_set(inputs.heldout_path) if inputs and inputs.heldout_path else None
    if base:
        assert inputs is not None
        return inputs.model_path, storage / "evals" / f"base-{inputs.model_path.name}", default
    if cfg.eval.model_path:
        model = Path(cfg.eval.model_path)
        return model, storage / "evals" / model.name, default
    return run / "final", run / "eval", default
