"""Where a prior puts its mass on the demonstrations' wrong tokens (issue 31; docs/design.md §10).

30% of the embedded SFT demonstrations carry one step off by one (`13 + 5 = 19.`), carried on. At the
first wrong digit of each such demonstration the observed token is wrong and the correct digit is
known, so the prior set of a teacher and of the base can be asked: how much mass on the observed
(wrong) token, how much on the correct one, and which one the top-k ranks first. That is the signal
the paper credits Target-SFT with ("strengthens signals when a desired token is under-supported").

    python benchmarks/wrong_tokens.py configs/worlds/model-strong-teacher.yaml   # both sets captured first

It reads the teacher's prior set and the base's own (the same config with priors.embedded_teacher
false) from the cache; it captures nothing.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

from pipeline.common.config import load_config
from pipeline.common.models import load_tokenizer
from pipeline.entry import stages
from pipeline.entry.config import RunConfig
from pipeline.entry.resolve import resolve_inputs
from pipeline.priors.cache import PriorStore
from pipeline.world import problems

STEP = re.compile(r"(-?\d+) ([-+*]) (\d+) = (-?\d+)\.")


def first_wrong_digit(solution: str) -> tuple[int, str] | None:
    """(character offset of the first wrong digit, the correct digit) in a solution, or None if all
    its steps are right. Steps carry the running value, so the first wrong result is the error."""
    for match in STEP.finditer(solution):
        a, op, b, c = match.groups()
        right = str(problems.apply(op, int(a), int(b)))
        if right != c:
            i = next((j for j, (x, y) in enumerate(zip(c, right, strict=False)) if x != y), min(len(c), len(right)))
            if i >= len(right):
                return None  # the wrong result only adds digits: no single correct token to compare
            return match.start(4) + i, right[i]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="a config whose priors come from the teacher")
    args = parser.parse_args()
    teacher_cfg = load_config(RunConfig, args.config)
    base_cfg = load_config(RunConfig, args.config, ["priors.embedded_teacher=false"])
    inputs = resolve_inputs(teacher_cfg, progress=False)
    tokenizer = load_tokenizer(inputs.model_path)
    store = PriorStore(teacher_cfg.storage_root)
    sets = {}
    for role, cfg in (("teacher", teacher_cfg), ("base", base_cfg)):
        plan = stages.plan_priors(cfg, progress=False)
        if not store.complete(plan.key):
            sys.exit(f"the {role}'s prior set {plan.key} is not captured: run `target-sft priors` on its config first")
        sets[role] = store.open(plan.key).load_all()
    rows = [json.loads(line) for line in inputs.data_path.read_text().splitlines()]
    found: dict[str, list[dict[str, float]]] = {"teacher": [], "base": []}
    for index, row in enumerate(rows):
        if not row.get("noisy"):
            continue
        solution = row["messages"][1]["content"]
        wrong = first_wrong_digit(solution)
        if wrong is None:
            continue
        offset, correct_digit = wrong
        prefix = tokenizer.apply_chat_template(row["messages"][:1], tokenize=False, add_generation_prompt=True)
        text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        char = len(prefix) + offset
        token = next(t for t, (s, e) in enumerate(encoded["offset_mapping"]) if s <= char < e)
        correct_id = tokenizer.convert_tokens_to_ids(correct_digit)
        for role, records in sets.items():
            record = records[index]
            where = np.flatnonzero(record.positions == token - 1)  # the prior at j scores token j + 1
            if len(where) == 0:
                continue
            j = int(where[0])
            ids, logprobs = record.topk_ids[j], record.topk_logprobs[j]
            correct = float(np.exp(logprobs[ids == correct_id][0])) if (ids == correct_id).any() else 0.0
            found[role].append({
                "p_observed": float(np.exp(record.obs_logprob[j])),
                "p_correct": correct,
                "correct_first": float(ids[0] == correct_id),
                "observed_first": float(record.obs_rank[j] == 1),
            })  # fmt: skip
    print("| prior | wrong tokens | p(observed, wrong) | p(correct) | top-1 correct | top-1 the wrong token |")
    print("|---|---:|---:|---:|---:|---:|")
    summary = {}
    for role, values in found.items():
        mean = {k: float(np.mean([v[k] for v in values])) for k in values[0]} if values else {}
        summary[role] = {"count": len(values), **mean}
        if values:
            print(
                f"| {role} | {len(values)} | {mean['p_observed']:.3f} | {mean['p_correct']:.3f} "
                f"| {mean['correct_first']:.1%} | {mean['observed_first']:.1%} |"
            )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
