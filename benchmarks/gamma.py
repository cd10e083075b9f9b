"""Per-token γ over an SFT set: how much DFT and Target-SFT trust each observed token at step 0.

γ = p(observed) is what the γ = p targets weight the demonstration by; at the first step p is the
base model's, which is exactly what a captured prior set stores (`obs_logprob`). This reads the
config's prior set (capture it first: `target-sft priors CONFIG`, or any experiment run) and prints
γ by kind of token and the most frequent tokens the base gives almost nothing.

    python benchmarks/gamma.py                          # the demo world, base as prior (model-strong.yaml)
    python benchmarks/gamma.py --config configs/worlds/new-format.yaml
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def kind(token: str) -> str:
    if token.startswith("<|") and token.endswith("|>"):
        return "chat markers"
    if token.strip().isdigit():
        return "digits"
    if token.strip() and all(not c.isalnum() for c in token.strip()):
        return "operators, punctuation"
    if not token.strip():
        return "whitespace, newlines"
    return "words"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/worlds/model-strong.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--top", type=int, default=12, help="rows of the low-γ token table")
    args = parser.parse_args(argv)

    from pipeline.common.config import load_config
    from pipeline.common.models import load_tokenizer
    from pipeline.entry import stages
    from pipeline.entry.config import RunConfig
    from pipeline.priors.cache import PriorStore

    cfg = load_config(RunConfig, args.config, args.overrides)
    plan = stages.plan_priors(cfg, progress=False)
    store = PriorStore(cfg.storage_root)
    if not store.complete(plan.key):
        raise SystemExit(f"error: prior set {plan.key} is not captured; run `target-sft priors {args.config}` first")
    tokenizer = load_tokenizer(plan.prior_model, cfg.model.trust_remote_code)
    examples = {e.index: e for e in plan.prepared.examples}
    sums: dict[int, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    gammas = []
    for record in store.open(plan.key).iter_records():
        observed = examples[record.example_index].input_ids[record.positions + 1]
        gamma = np.exp(record.obs_logprob.astype(np.float64))
        gammas.append(gamma)
        for token, g in zip(observed.tolist(), gamma.tolist(), strict=True):
            sums[token][0] += g
            sums[token][1] += 1
    every = np.concatenate(gammas)
    print(f"prior set {plan.key}: {every.size:,} scored tokens, mean γ {every.mean():.3f}, ", end="")
    print(f"median {np.median(every):.3f}")
    print(f"share with γ < 0.01: {(every < 0.01).mean():.1%}; γ < 0.1: {(every < 0.1).mean():.1%}\n")
    groups: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for token, (total, count) in sums.items():
        group = groups[kind(tokenizer.convert_ids_to_tokens(token).replace("Ġ", " ").replace("Ċ", "\n"))]
        group[0] += total
        group[1] += count
    print("| tokens | share of scored | mean γ |\n|---|---:|---:|")
    for name, (total, count) in sorted(groups.items(), key=lambda kv: kv[1][0] / kv[1][1]):
        print(f"| {name} | {count / every.size:.1%} | {total / count:.3f} |")
    frequent = [(t, s) for t, s in sums.items() if s[1] >= every.size / 1000]
    print(f"\n| token | count | mean γ |  (the {args.top} lowest-γ tokens among those with >= 0.1% of positions)")
    print("|---|---:|---:|")
    for token, (total, count) in sorted(frequent, key=lambda ts: ts[1][0] / ts[1][1])[: args.top]:
        print(f"| {tokenizer.decode([token])!r} | {count:,} | {total / count:.4f} |")


if __name__ == "__main__":
    main()
