"""Evaluation decode benchmark: transformers `generate` vs the hf engine's loop (pipeline/evaluation/sampling.py).

Both sample n completions per held-out problem of the embedded set, in the same batches, with the
demo's sampling settings; the report gives seconds, generated tokens/s and the speed ratio measured
in the same process, best of `--repeats` runs each.

    python benchmarks/generate.py                                              # the embedded base model
    python benchmarks/generate.py --model storage/runs/paper-regime-sft-s0/final   # a fine-tuned run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model folder (default: the embedded base model, built on first use)")
    parser.add_argument("--problems", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64, help="problems per batch (eval.batch_size)")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.data.tokens import pad_rows
    from pipeline.evaluation import evaluate, sampling
    from pipeline.world import builder
    from pipeline.world.config import WorldConfig

    torch.set_num_threads(args.threads)
    build = builder.build(WorldConfig(), "storage")
    path = Path(args.model) if args.model else build.model
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    rows = [json.loads(line) for line in build.sft_heldout.read_text().splitlines()][: args.problems]
    prompts = [evaluate.prompt_ids(tok, r["messages"][0]["content"], None) for r in rows]
    stops, pad = evaluate.stop_ids(model), tok.pad_token_id
    batches = [range(i, min(i + args.batch, len(prompts))) for i in range(0, len(prompts), args.batch)]

    def transformers_generate() -> int:
        torch.manual_seed(0)
        tokens = 0
        for b in batches:
            ids, mask = pad_rows([prompts[i] for i in b], pad, left=True)
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=args.max_new_tokens, do_sample=True,
                temperature=args.temperature, top_k=0, num_return_sequences=args.n, pad_token_id=pad,
            )[:, ids.shape[1] :]  # fmt: skip
            tokens += int((~torch.isin(out, torch.tensor([pad]))).sum())
        return tokens

    def engine_loop() -> int:
        tokens = 0
        for b in batches:
            keys = [sampling.sample_key(0, "bench", i) for i in b]
            out = sampling.sample(
                model, [prompts[i] for i in b], keys, args.n, args.max_new_tokens, stops, pad,
                temperature=args.temperature,
            )  # fmt: skip
            tokens += sum(len(s) for row in out for s in row)
        return tokens

    results = {}
    for name, fn in [("transformers generate", transformers_generate), ("hf engine loop", engine_loop)]:
        best, tokens = float("inf"), 0
        for _ in range(args.repeats):
            start = time.perf_counter()
            tokens = fn()
            best = min(best, time.perf_counter() - start)
        results[name] = (best, tokens)
    base_seconds = results["transformers generate"][0]
    print(f"{path}: {len(prompts)} problems x {args.n} samples, batches of {args.batch}, {args.threads} threads")
    print("| decode | seconds | generated tokens/s | speed vs generate |")
    print("|---|---:|---:|---:|")
    for name, (seconds, tokens) in results.items():
        print(f"| {name} | {seconds:.2f} | {tokens / seconds:,.0f} | {base_seconds / seconds:.2f}x |")


if __name__ == "__main__":
    main()
