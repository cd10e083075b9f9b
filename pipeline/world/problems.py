"""The embedded world's problems: deterministic arithmetic word problems for its base model (docs/design.md §7).

Multi-step word problems with step-by-step solutions and a final `#### <answer>` line. The old
skill is +/- arithmetic; the new skill is one doubling step ("Ana doubles them."), rare in
pretraining and present in every SFT, validation and held-out problem when `Rules.sft_new_op`.
Each step has several phrasings, so the next token is genuinely non-unique and a model's prior
over it carries information. SFT demonstrations can be written in a style of their own
(`Step 1: 3 + 4 gives 7.`), off-policy for a base pretrained on the `So 3 + 4 = 7.` style.

Held-out, forgetting and validation problems are drawn first and excluded by signature (start
number and operations) from everything else, and from each other.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Literal

NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jo", "Kim", "Lea"]
OBJECTS = ["apples", "coins", "books", "stamps", "marbles", "cards", "shells", "pens"]
ADD_QUESTION = ["{who} buys {b} more.", "{who} finds {b} more.", "{who} gets {b} more."]
SUB_QUESTION = ["{who} gives away {b}.", "{who} loses {b}.", "{who} sells {b}."]
DOUBLE_QUESTION = ["{who} doubles them.", "{who} doubles the pile.", "{who} ends up with twice as many."]
STEP_SOLUTION = ["{a} {op} {b} = {c}.", "Now {a} {op} {b} = {c}.", "So {a} {op} {b} = {c}."]
OWN_STEP_SOLUTION = ["Step {i}: {a} {op} {b} gives {c}.", "Step {i}: {a} {op} {b} makes {c}."]
ANSWER_RE = re.compile(r"####\s*(-?\d+)")
DOUBLE = ("*", 2)


@dataclass(frozen=True)
class Rules:
    """What the synthetic data looks like; built from `WorldConfig` (its fields say why)."""

    seed: int
    max_number: int
    max_steps: int
    pretrain_problems: int
    sft_train_problems: int
    heldout_problems: int
    forgetting_problems: int
    validation_problems: int
    sft_noise_fraction: float
    chat_share: float
    new_op_share: float
    sft_new_op: bool
    sft_style: Literal["base", "own"]
    own_style_share: float


@dataclass(frozen=True)
class Problem:
    """One word problem: the start amount and a list of (op, operand) steps, op in + - *."""

    who: str
    obj: str
    start: int
    steps: tuple[tuple[str, int], ...]

    @property
    def signature(self) -> tuple[int, tuple[tuple[str, int], ...]]:
        """What makes two problems the same problem, whatever the wording."""
        return (self.start, self.steps)

    @property
    def answer(self) -> int:
        value = self.start
        for op, b in self.steps:
            value = apply(op, value, b)
        return value


def apply(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def sample_problem(rng: random.Random, max_number: int, max_steps: int, double: bool = False) -> Problem:
    """Draw a problem whose running total never goes negative; `double` inserts one doubling step."""
    start = rng.randint(1, max_number)
    n_steps = rng.randint(1, max_steps)
    double_at = rng.randint(0, n_steps) if double else -1
    value, steps = start, []
    for i in range(n_steps + (1 if double else 0)):
        if i == double_at:
            op, b = DOUBLE
        else:
            b = rng.randint(1, max_number)
            op = "-" if (value - b >= 0 and rng.random() < 0.5) else "+"
        value = apply(op, value, b)
        steps.append((op, b))
    return Problem(rng.choice(NAMES), rng.choice(OBJECTS), start, tuple(steps))


def question_text(problem: Problem, rng: random.Random) -> str:
    parts = [f"{problem.who} has {problem.start} {problem.obj}."]
    for op, b in problem.steps:
        templates = ADD_QUESTION if op == "+" else SUB_QUESTION if op == "-" else DOUBLE_QUESTION
        parts.append(rng.choice(templates).format(who=rng.choice([problem.who, "Then " + problem.who]), b=b))
    parts.append(f"How many {problem.obj} does {problem.who} have now?")
    return " ".join(parts)


def solution_text(problem: Problem, rng: random.Random, error_step: int | None = None, style: str = "base") -> str:
    """Step-by-step solution; `error_step` makes that step's result off by one, carried on.

    `base` is the pretraining style (`So 3 + 4 = 7.`); `own` the SFT set's (`Step 1: 3 + 4 gives 7.`
    and a closing sentence), which a base model has never seen.
    """
    value, lines = problem.start, []
    for i, (op, b) in enumerate(problem.steps):
        result = apply(op, value, b) + (1 if i == error_step else 0)
        templates = STEP_SOLUTION if style == "base" else OWN_STEP_SOLUTION
        lines.append(rng.choice(templates).format(i=i + 1, a=value, op=op, b=b, c=result))
        value = result
    if style == "own":
        lines.append(f"The answer is {value}.")
    return " ".join(lines) + f"\n#### {value}"


def plain_prompt(question: str) -> str:
    """The plain pretraining format's prompt; the model continues with the solution."""
    return f"Question: {question}\nAnswer:"


def extract_answer(text: str) -> int | None:
    """The integer after the first `####`, or None when the text has none."""
    match = ANSWER_RE.search(text)
    return int(match.group(1)) if match else None


@dataclass
class Document:
    """One pretraining problem: rendered as plain text or as a chat by the model builder."""

    question: str
    solution: str
    chat: bool


@dataclass
class Splits:
    """All text the embedded base model is built from."""

    pretrain: list[Document]
    sft_train: list[dict]
    heldout: list[dict]
    """The new skill's held-out problems (the old skill's when the world has no new operation)."""
    forgetting: list[dict]
    """Held-out problems of the old skill only, to measure what fine-tuning forgets."""
    validation: list[dict]
    """Problems drawn like `heldout`, disjoint from it: where learning rate and steps are chosen."""
    evaluation_signatures: frozenset[tuple] = frozenset()
    """The signatures of every held-out, forgetting and validation problem (what nothing may train on)."""


def make_splits(world: Rules) -> Splits:
    """Generate the pretraining corpus, the (noisy) SFT set and the evaluation splits.

    Evaluation rows carry `question`, `answer` (int) and clean chat `messages` in the SFT style;
    SFT rows carry `messages`, `answer` (the true answer) and `noisy` (whether the demonstration is wrong).
    """
    rng = random.Random(world.seed)
    seen: set[tuple] = set()

    def fresh_problem(double: bool) -> Problem:
        while True:
            problem = sample_problem(rng, world.max_number, world.max_steps, double)
            if problem.signature not in seen:
                return problem

    def evaluation_rows(count: int, double: bool) -> list[dict]:
        rows = []
        for _ in range(count):
            problem = fresh_problem(double)
            seen.add(problem.signature)
            question = question_text(problem, rng)
            solution = solution_text(problem, rng, style=world.sft_style)
            rows.append({"question": question, "answer": problem.answer, "messages": _chat(question, solution)})
        return rows

    heldout = evaluation_rows(world.heldout_problems, world.sft_new_op)
    forgetting = evaluation_rows(world.forgetting_problems, False)
    validation = evaluation_rows(world.validation_problems, world.sft_new_op)
    pretrain = []
    for _ in range(world.pretrain_problems):
        problem = fresh_problem(rng.random() < world.new_op_share)
        chat = rng.random() < world.chat_share
        # drawn only where the share is set: a world without it keeps the random stream (and model) it had
        own = world.own_style_share > 0 and rng.random() < world.own_style_share
        question = question_text(problem, rng)
        pretrain.append(Document(question, solution_text(problem, rng, style="own" if own else "base"), chat))
    sft_train = []
    for _ in range(world.sft_train_problems):
        problem = fresh_problem(world.sft_new_op)
        noisy = rng.random() < world.sft_noise_fraction
        error_step = rng.randrange(len(problem.steps)) if noisy else None
        solution = solution_text(problem, rng, error_step, world.sft_style)
        sft_train.append(
            {"messages": _chat(question_text(problem, rng), solution), "answer": problem.answer, "noisy": noisy}
        )
    return Splits(pretrain, sft_train, heldout, forgetting, validation, frozenset(seen))


def clean_demonstrations(world: Rules, splits: Splits, count: int, seed: int) -> list[Document]:
    """Correct chat demonstrations of the SFT skill in the SFT phrasing, for a teacher fitted to the
    task (docs/design.md §7): drawn from a stream of their own, so the world's splits stay as they
    are, and never one of the evaluation problems."""
    rng = random.Random(f"teacher-{world.seed}-{seed}")
    documents: list[Document] = []
    while len(documents) < count:
        problem = sample_problem(rng, world.max_number, world.max_steps, world.sft_new_op)
        if problem.signature in splits.evaluation_signatures:
            continue
        question = question_text(problem, rng)
        documents.append(Document(question, solution_text(problem, rng, style=world.sft_style), chat=True))
    return documents


def _chat(question: str, solution: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": solution}]
