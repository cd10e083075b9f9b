"""Data-preparation benchmark: tokenisation speed and memory per token, today's path vs the baseline.

A generated chat set (default 50,000 examples of about 470 tokens with the embedded tokenizer) is
prepared three ways, each in a fresh process so that peak memory is its own:

* baseline: read the rows, one `tokenize_chat` call per row, examples held as Python lists of ids
  and labels (how `sources.prepare` worked before the tokenisation cache);
* build: `sources.prepare` with the cache, first run (batched Rust tokenizer, int32/bool arrays,
  written to `tokens/<key>/`);
* cached: `sources.prepare` again, reading the memory-mapped arrays; every token is touched once.

Reported: tokens/s, and bytes per token = the growth of the process's peak RSS while preparing
and holding the examples, divided by the token count.

    python benchmarks/data.py                   # 50k examples, 2 threads
    python benchmarks/data.py --examples 5000   # quicker
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORDS = "the a of to and in is it that for on with as was at by an be this are from or has one two".split()  # noqa: SIM905


def write_set(path: Path, examples: int, tokens: int, seed: int = 0) -> None:
    """Chat rows whose rendering is about `tokens` tokens with the embedded tokenizer."""
    rng = random.Random(seed)
    with path.open("w") as fh:
        for _ in range(examples):
            n = max(8, int(rng.gauss(tokens, tokens / 5)))
            words = " ".join(rng.choice(WORDS) for _ in range(n // 3))
            question, answer = words[: len(words) // 4], words[len(words) // 4 :]
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            fh.write(json.dumps({"messages": messages}) + "\n")


def run_one(method: str, data_path: str, model: str, cache: str) -> dict:
    """One method in this process: seconds, tokens and peak-RSS growth."""
    import numpy as np
    from transformers import AutoTokenizer

    from pipeline.data import sources
    from pipeline.data.config import DataConfig

    tokenizer = AutoTokenizer.from_pretrained(model)
    cfg = DataConfig(max_length=4096)
    warm = Path(data_path).with_name("warm-up.jsonl")  # imports and first calls outside the measurement
    with open(data_path) as fh:
        warm.write_text("".join(itertools.islice(fh, 4)))
    sources.prepare(cfg, warm, tokenizer)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    if method == "baseline":
        held = [sources.tokenize_chat(r["messages"], tokenizer) for r in sources.load_rows(data_path)]
        tokens = sum(len(ids) for ids, _ in held)
    else:
        prepared = sources.prepare(cfg, data_path, tokenizer, Path(cache))
        tokens = sum(len(e.input_ids) for e in prepared.examples)
        touched = sum(int(np.asarray(e.input_ids).sum()) + int(e.completion.sum()) for e in prepared.examples)
        assert touched > 0
    seconds = time.perf_counter() - start
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"method": method, "seconds": seconds, "tokens": tokens, "bytes_per_token": grown / tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=50_000)
    parser.add_argument("--tokens", type=int, default=470)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(*args.one)))
        return

    from pipeline.world import builder
    from pipeline.world.config import WorldConfig

    with tempfile.TemporaryDirectory() as tmp:
        build = builder.build(WorldConfig(), os.environ.get("TARGET_SFT_STORAGE", "storage"), progress=False)
        data_path = Path(tmp) / "chat.jsonl"
        write_set(data_path, args.examples, args.tokens)
        env = {**os.environ, "RAYON_NUM_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads)}
        env["TOKENIZERS_PARALLELISM"] = "true"
        results = []
        for method in ("baseline", "build", "cached"):
            cmd = [sys.executable, __file__, "--one", method, str(data_path), str(build.model), f"{tmp}/tokens"]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = results[0]["tokens"] / results[0]["seconds"]
    print(f"{args.examples} examples, {results[0]['tokens'] / args.examples:.0f} tokens each, {args.threads} threads")
    print(f"{'method':10} {'tokens/s':>12} {'ratio':>7} {'bytes/token':>12}")
    for r in results:
        rate = r["tokens"] / r["seconds"]
        r["tokens_per_s"] = rate
        print(f"{r['method']:10} {rate:12,.0f} {rate / base:7.2f} {r['bytes_per_token']:12.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
