"""Full train-step benchmark: plain SFT cross-entropy (the model's own loss) vs the fused
Target-SFT loss (`TargetLossModel`, as `target-sft train` runs it). Forward, backward and an AdamW
step, each method in its own subprocess, reported as ratios to plain CE from the same run.

    python benchmarks/train.py                                   # CPU, embedded model
    python benchmarks/train.py --device cuda --shape 0.5b --batch 2 --seq 8192 --grad-ckpt --dtype bf16

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
METHODS = ("plain_ce", "fused_target_sft")


def build_model(args):
    import torch

    if args.shape == "embedded":
        from transformers import AutoModelForCausalLM

        from pipeline import base_model
        from pipeline.config import BaseModelConfig

        build = base_model.build(BaseModelConfig(), os.environ.get("TARGET_SFT_STORAGE", "storage"), progress=False)
        return AutoModelForCausalLM.from_pretrained(build.model, dtype=torch.float32)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config)


def run_one(args) -> dict:
    import torch

    from pipeline.batching import Batch
    from pipeline.loss import Prior
    from pipeline.targets import preset
    from pipeline.train import TargetLossModel

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
    shifted = labels[:, 1:]
    k = 20
    batch = Batch(
        ids,
        torch.ones_like(ids),
        shifted,
        Prior(
            torch.randint(vocab, (args.batch, args.seq - 1, k), generator=g),
            torch.log_softmax(torch.randn(args.batch, args.seq - 1, k, generator=g), -1) - 0.1,
            torch.full((args.batch, args.seq - 1), -5.0),
        ),
    ).to(args.device)
    loss_model = TargetLossModel(model, preset("target_sft", eta=0.5), "student_tail", args.chunk_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    use_bf16 = args.dtype == "bf16"
    scored = float((shifted != -100).sum())
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
    return {"method": args.method, "step_s": statistics.median(times), "peak_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shape", default="embedded", choices=["embedded", "0.5b"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--grad-ckpt", action="store_true")
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        print(json.dumps(run_one(args)))
        return
    results = []
    for method in METHODS:
        out = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--method", method], check=True, capture_output=True, text=True
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    tokens = args.batch * args.seq
    base = results[0]
    print(
        f"\ntrain-step benchmark: {args.shape} model, device={args.device}, dtype={args.dtype}, "
        f"batch={args.batch}x{args.seq}, grad_ckpt={args.grad_ckpt}, chunk={args.chunk_size}"
    )
    print("| method | step s | tokens/s | speed vs plain CE | peak MiB | memory vs plain CE |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        speed, memory = base["step_s"] / r["step_s"], r["peak_bytes"] / max(base["peak_bytes"], 1)
        print(
            f"| {r['method']} | {r['step_s']:.3f} | {tokens / r['step_s']:,.0f} | {speed:.2f}x | "
            f"{r['peak_bytes'] / 2**20:.0f} | {memory:.2f}x |"
        )


if __name__ == "__main__":
    main()
