"""Answer checking: is a completion's final answer the reference answer?

Per eval set: `numeric` (the embedded task: the number after `####`, else the last `\\boxed{}`),
`math` (math-verify: `\\boxed{}`, LaTeX fractions, intervals, ...) and `choice` (the option letter).

math-verify runs in a worker process, whose main thread can use its SIGALRM timeouts, and every
answer also has a hard deadline: a worker that does not answer in time (sympy expanding
`9^{9^{9^9}}` holds the GIL and ignores signals) is killed, the answer counts as wrong, and a new
worker takes the rest. So no answer can hang an evaluation, in any thread (Prefect runs tasks in
threads).
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any, cast

log = logging.getLogger(__name__)

LETTERS = "ABCDEFGHIJ"
MATH_TIMEOUT_S = 5
"""math-verify's own parsing and verification timeouts, inside the worker."""
ANSWER_DEADLINE_S = 20.0
"""Wall-clock limit per answer, after which the worker is killed and the answer counts as wrong."""


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
    # math-verify's timeouts use SIGALRM, which only a main thread may set: in the worker process it is one.
    import threading

    from math_verify import parse, verify

    timeout = MATH_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
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


def check_answers(items: list[tuple[str, str]], answer_type: str, deadline_s: float = ANSWER_DEADLINE_S) -> list[bool]:
    """Verdicts for (completion, reference) pairs; math answers are verified in a worker process."""
    if answer_type != "math":
        return [is_correct(completion, reference, answer_type) for completion, reference in items]
    return run_with_deadline(_math_worker, items, deadline_s)


def run_with_deadline(
    worker: Callable[[list[tuple[str, str]], Any], None], items: list[tuple[str, str]], deadline_s: float
) -> list[bool]:
    """`worker(items, results_queue)` in a spawned process, one verdict per item in order; an item
    without a verdict within `deadline_s` is False, and a fresh worker continues after it."""
    context = multiprocessing.get_context("spawn")
    verdicts: list[bool] = []
    while len(verdicts) < len(items):
        results = context.Queue()
        process = context.Process(target=worker, args=(items[len(verdicts) :], results), daemon=True)
        process.start()
        try:
            while len(verdicts) < len(items):
                verdicts.append(bool(results.get(timeout=deadline_s)))
        except queue.Empty:
            log.warning("answer %d took over %.0f s to verify; counted as wrong", len(verdicts), deadline_s)
            verdicts.append(False)
        finally:
            process.kill()
            process.join()
    return verdicts


def _math_worker(items: list[tuple[str, str]], results: Any) -> None:
    for completion, reference in items:
        try:
            results.put(verify_math(completion, reference))
        except Exception:  # an unparseable answer is a wrong answer
            results.put(False)
