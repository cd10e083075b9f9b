"""Deterministic synthetic reasoning data for the embedded base model.

Multi-step +/- word problems with step-by-step solutions and a final `#### <answer>` line. Each
step has several phrasings, in the question and in the solution, so the next token is genuinely
non-unique and a model's prior over it carries information. The held-out split is drawn first
and excluded by problem signature (start number and operations) from everything else.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jo", "Kim", "Lea"]
OBJECTS = ["apples", "coins", "books", "stamps", "marbles", "cards", "shells", "pens"]
ADD_QUESTION = ["{who} buys {b} more.", "{who} finds {b} more.", "{who} gets {b} more."]
SUB_QUESTION = ["{who} gives away {b}.", "{who} loses {b}.", "{who} sells {b}."]
STEP_SOLUTION = ["{a} {op} {b} = {c}.", "Now {a} {op} {b} = {c}.", "So {a} {op} {b} = {c}."]
ANSWER_RE = re.compile(r"####\s*(-?\d+)")


@dataclass(frozen=True)
class Problem:
    """One word problem: the start amount and a list of (+1/-1, operand) steps."""

    who: str
    obj: str
    start: int
    steps: tuple[tuple[int, int], ...]

    @property
    def signature(self) -> tuple[int, tuple[tuple[int, int], ...]]:
        """What makes two problems the same problem, whatever the wording."""
        return (self.start, self.steps)

    @property
    def answer(self) -> int:
        value = self.start
        for sign, b in self.steps:
            value += sign * b
        return value


def sample_problem(rng: random.Random, max_number: int, max_steps: int) -> Problem:
    """Draw a problem whose running total never goes negative."""
    start = rng.randint(1, max_number)
    value, steps = start, []
    for _ in range(rng.randint(1, max_steps)):
        b = rng.randint(1, max_number)
        sign = -1 if (value - b >= 0 and rng.random() < 0.5) else 1
        value += sign * b
        steps.append((sign, b))
    return Problem(rng.choice(NAMES), rng.choice(OBJECTS), start, tuple(steps))


def question_text(problem: Problem, rng: random.Random) -> str:
    parts = [f"{problem.who} has {problem.start} {problem.obj}."]
    for sign, b in problem.steps:
        template = rng.choice(ADD_QUESTION if sign > 0 else SUB_QUESTION)
        parts.append(template.format(who=rng.choice([problem.who, "Then " + problem.who]), b=b))
    parts.append(f"How many {problem.obj} does {problem.who} have now?")
    return " ".join(parts)


def solution_text(problem: Problem, rng: random.Random, error_step: int | None = None) -> str:
    """Step-by-step solution; `error_step` makes that step's result off by one, carried on."""
    value, lines = problem.start, []
    for i, (sign, b) in enumerate(problem.steps):
        result = value + sign * b + (1 if i == error_step else 0)
        op = "+" if sign > 0 else "-"
        lines.append(rng.choice(STEP_SOLUTION).format(a=value, op=op, b=b, c=result))
        value = result
    return " ".join(lines) + f"\n#### {value}"


def plain_prompt(question: str) -> str:
    """The pretraining format's prompt; the model continues with the solution."""
    return f"Question: {question}\nAnswer:"


def plain_document(problem: Problem, rng: random.Random) -> str:
    return plain_prompt(question_text(problem, rng)) + " " + solution_text(problem, rng)


def extract_answer(text: str) -> int | None:
    """The integer after the first `####`, or None when the text has none."""
    match = ANSWER_RE.search(text)
    return int(match.group(1)) if match else None


@dataclass
class SyntheticSplits:
    """All text the embedded base model is built from."""

    pretrain_documents: list[str]
    sft_train: list[dict]
    heldout: list[dict]


def make_splits(
    seed: int,
    max_number: int,
    max_steps: int,
    pretrain_problems: int,
    sft_train_problems: int,
    heldout_problems: int,
    sft_noise_fraction: float,
) -> SyntheticSplits:
    """Generate the pretraining corpus, the (noisy) SFT set and the held-out problems.

    Held-out rows carry `question`, `answer` (int) and clean chat `messages`; SFT rows carry
    `messages`, `answer` (the true answer) and `noisy` (whether the demonstration is wrong).
    """
    rng = random.Random(seed)
    heldout: list[dict] = []
    seen: set[tuple] = set()
    while len(heldout) < heldout_problems:
        problem = sample_problem(rng, max_number, max_steps)
        if problem.signature in seen:
            continue
        seen.add(problem.signature)
        question = question_text(problem, rng)
        messages = _chat(question, solution_text(problem, rng))
        heldout.append({"question": question, "answer": problem.answer, "messages": messages})

    def fresh_problem() -> Problem:
        while True:
            problem = sample_problem(rng, max_number, max_steps)
            if problem.signature not in seen:
                return problem

    documents = [plain_document(fresh_problem(), rng) for _ in range(pretrain_problems)]
    sft_train = []
    for _ in range(sft_train_problems):
        problem = fresh_problem()
        noisy = rng.random() < sft_noise_fraction
        error_step = rng.randrange(len(problem.steps)) if noisy else None
        messages = _chat(question_text(problem, rng), solution_text(problem, rng, error_step))
        sft_train.append({"messages": messages, "answer": problem.answer, "noisy": noisy})
    return SyntheticSplits(documents, sft_train, heldout)


def _chat(question: str, solution: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": solution}]
