"""Full train-step benchmark. Forward, backward and an AdamW step, each method in its own
subprocess, reported as ratios to the first method from the same run.

* `--compare loss` (default): plain SFT cross-entropy (the model's own loss) vs the fused
  Target-SFT loss (`TargetLossModel`, as `target-sft train` runs it), on full-length rows;
* `--compare packing`: the fused Target-SFT loss on length-skewed examples (one of `--seq` tokens,
  the rest 1/16 to 1/4 of it), padded (`collate`) vs packed into one row (`collate_packed`,
  `train.packing`); tokens/s counts real tokens only.

    python benchmarks/train.py                                   # CPU, embedded model
    python benchmarks/train.py --compare packing --batch 16 --seq 512
    python benchmarks/train.py --device cuda --shape 0.5b --batch 2 --seq 8192 --grad-ckpt --dtype bf16
    python benchmarks/train.py --device cuda --shape 0.5b --compare packing --batch 16 --seq 8192 \
        --grad-ckpt --dtype bf16 --attn flash_attention_2

Peak memory: CUDA max_memory_allocated on GPU; growth of peak RSS over the setup on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
METHODS = {"loss": ("plain_ce", "fused_target_sft"), "packing": ("padded", "packed")}


def build_model(args):
    import torch

    if args.shape == "embedded":
        from transformers import AutoModelForCausalLM

        from pipeline.world import builder
        from pipeline.world.config import WorldConfig

        build = builder.build(WorldConfig(), os.environ.get("TARGET_SFT_STORAGE", "storage"), progress=False)
        return AutoModelForCausalLM.from_pretrained(build.model, dtype=torch.float32, attn_implementation=args.attn)
    from benchmarks.shapes import random_qwen2

    return random_qwen2(args.shape, args.attn)


def skewed_batch(args, vocab: int):
    """Length-skewed examples with random priors, collated padded or packed (`args.method`)."""
    import numpy as np

    from pipeline.common.prior_schema import PriorRecord
    from pipeline.data.tokens import Example
    from pipeline.training import batching

    rng = np.random.default_rng(0)
    lengths = [args.seq, *rng.integers(args.seq // 16, args.seq // 4, args.batch - 1)]
    examples, records, k = [], {}, 20
    for i, n in enumerate(lengths):
        completion = np.arange(n) >= n // 10
        examples.append(Example(i, rng.integers(vocab, size=n).astype(np.int32), completion))
        positions = np.nonzero(completion[1:])[0].astype(np.int32)
        m = len(positions)
        top_lp = np.sort(np.log(rng.dirichlet(np.ones(k), m)).astype(np.float32), axis=1)[:, ::-1].copy()
        records[i] = PriorRecord(i, n, positions, rng.integers(vocab, size=(m, k)).astype(np.int32), top_lp,
                                 np.full(m, -5.0, np.float32), np.ones(m, np.int32))  # fmt: skip
    if args.method == "packed":
        batch = batching.collate_packed(examples, records)
    else:
        batch = batching.collate(examples, 0, records)
    return batch, int(sum(lengths))


def run_one(args) -> dict:
    import torch

    from pipeline.common.prior_schema import Prior
    from pipeline.core.targets import preset
    from pipeline.training.batching import Batch
    from pipeline.training.train import TargetLossModel

    torch.manual_seed(0)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    model = build_model(args).to(args.device)
    if args.grad_ckpt:
        model.gradient_checkpointing_enable()
    vocab = model.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(vocab, (args.batch, args.seq), generator=g)
    labels = ids.clone()
    labels[:, : args.seq // 10] = -100
    tokens = args.batch * args.seq
    if args.compare == "packing":
        batch, tokens = skewed_batch(args, vocab)
        batch = batch.to(args.device)
    else:
        k = 20
        batch = Batch(
            ids,
            torch.ones_like(ids),
            labels[:, 1:],
            Prior(
                torch.randint(vocab, (args.batch, args.seq - 1, k), generator=g),
                torch.log_softmax(torch.randn(args.batch, args.seq - 1, k, generator=g), -1) - 0.1,
                torch.full((args.batch, args.seq - 1), -5.0),
            ),
        ).to(args.device)
    loss_model = TargetLossModel(model, preset("target_sft", eta=0.5), "student_tail", args.chunk_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    use_bf16 = args.dtype == "bf16"
    scored = float((batch.labels != -100).sum())
    setup_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def step():
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=use_bf16):
            if args.method == "plain_ce":
                loss = model(input_ids=batch.input_ids, labels=labels.to(args.device)).loss
            else:
                loss, _ = loss_model(batch, scored)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        step()
    sync()
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - setup_rss
    return {"method": args.method, "step_s": statistics.median(times), "peak_bytes": peak, "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shape", default="embedded", choices=["embedded", "tiny", "0.5b"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--grad-ckpt", action="store_true")
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--compare", default="loss", choices=sorted(METHODS))
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    parser.add_argument("--method", choices=[m for pair in METHODS.values() for m in pair], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        print(json.dumps(run_one(args)))
        return
    results = []
    for method in METHODS[args.compare]:
        out = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--method", method], check=True, stdout=subprocess.PIPE, text=True
        )  # stderr passes through: a failing method shows its own traceback
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = results[0]
    print(
        f"\ntrain-step benchmark ({args.compare}): {args.shape} model, device={args.device}, dtype={args.dtype}, "
        f"batch={args.batch}x{args.seq}, grad_ckpt={args.grad_ckpt}, chunk={args.chunk_size}, attn={args.attn}"
    )
    print(f"| method | step s | tokens/s | speed vs {base['method']} | peak MiB | memory vs {base['method']} |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        rate, base_rate = r["tokens"] / r["step_s"], base["tokens"] / base["step_s"]
        memory = r["peak_bytes"] / max(base["peak_bytes"], 1)
        print(
            f"| {r['method']} | {r['step_s']:.3f} | {rate:,.0f} | {rate / base_rate:.2f}x | "
            f"{r['peak_bytes'] / 2**20:.0f} | {memory:.2f}x |"
        )
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results}, indent=2))


if __name__ == "__main__":
    main()
