"""Loss benchmark: plain SFT cross-entropy vs the dense Q loss vs the fused Q loss.

One step = lm_head forward + loss + backward to the hidden states and the lm_head weight, the
part of a training step the loss choice changes. Every method runs in its own subprocess so the
peak memory of one does not hide another's; results are reported as ratios to plain CE measured
in the same invocation (these machines are noisy).

    python benchmarks/loss.py                       # CPU, tiny shapes (README numbers)
    python benchmarks/loss.py --device cuda --tokens 16384 --hidden 896 --vocab 151936 --dtype bf16 --compiled

Peak memory: CUDA max_memory_allocated on GPU; on CPU the growth of the process's peak RSS
over its size after setup (ru_maxrss), which includes allocator slack.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

METHODS = ("plain_ce", "dense_q", "fused_q")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp64": "float64"}


def build_inputs(args):
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    dtype = getattr(torch, DTYPES[args.dtype])
    hidden = (torch.randn(args.tokens, args.hidden, generator=g) / args.hidden**0.5).to(args.device, dtype)
    weight = (torch.randn(args.vocab, args.hidden, generator=g) * 0.02).to(args.device, dtype)
    labels = torch.randint(args.vocab, (args.tokens,), generator=g)
    labels[: args.tokens // 10] = -100  # prompt tokens
    prior_ids = torch.randint(args.vocab, (args.tokens, args.k), generator=g)
    prior_lp = torch.log_softmax(torch.randn(args.tokens, args.k, generator=g), -1) - 0.1
    prior_obs = torch.full((args.tokens,), -5.0)
    move = lambda t: t.to(args.device)  # noqa: E731
    return hidden, weight, move(labels), move(prior_ids), move(prior_lp), move(prior_obs)


def run_one(args) -> dict:
    """Time one method in this process; print a JSON line."""
    import torch
    import torch.nn.functional as F

    from pipeline.common.prior_schema import Prior
    from pipeline.core.loss import fused_q_target_loss, q_target_loss
    from pipeline.core.targets import preset

    torch.manual_seed(0)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    hidden0, weight0, labels, prior_ids, prior_lp, prior_obs = build_inputs(args)
    setup_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # CPU baseline
    spec = preset("target_sft", eta=0.5)
    prior = {"prior": Prior(prior_ids, prior_lp, prior_obs)}

    def step():
        hidden = hidden0.detach().requires_grad_(True)
        weight = weight0.detach().requires_grad_(True)
        if args.method == "plain_ce":  # as HF causal LMs do: full logits, upcast, cross-entropy
            loss = F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=-100)
        elif args.method == "liger_flce":  # hard-label anchor: Liger's fused linear cross-entropy
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            loss = LigerFusedLinearCrossEntropyLoss()(weight, hidden, labels)
        elif args.method == "cce":  # hard-label anchor: Cut Cross-Entropy (apple/ml-cross-entropy)
            from cut_cross_entropy import linear_cross_entropy

            loss = linear_cross_entropy(hidden, weight, labels, reduction="mean")
        elif args.method == "dense_q":
            loss = q_target_loss(hidden @ weight.T, labels, spec, **prior, reduction="mean").loss
        else:  # fused_q, fused_q_compiled, fused_q_triton, fused_q_chunk<N>
            compiled = args.method == "fused_q_compiled"
            backend = "triton" if args.method == "fused_q_triton" else "torch"
            chunk = int(args.method.removeprefix("fused_q_chunk")) if "chunk" in args.method else args.chunk_size
            loss = fused_q_target_loss(
                hidden,
                weight,
                labels,
                spec,
                **prior,
                reduction="mean",
                chunk_size=chunk,
                compiled=compiled,
                backend=backend,
            ).loss
        loss.backward()
        return loss

    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base_mem = torch.cuda.memory_allocated() if args.device == "cuda" else setup_rss
    for _ in range(args.warmup):
        step()
    sync()
    times = []
    for _ in range(args.reps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base_mem
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_mem
    return {
        "method": args.method,
        "step_s": statistics.median(times),
        "peak_bytes": max(peak, 0),
        "base_bytes": base_mem,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--compiled", action="store_true", help="also time the torch.compile'd chunk step")
    parser.add_argument("--triton", action="store_true", help="also time the Triton kernels (CUDA)")
    parser.add_argument("--chunk-sizes", type=int, nargs="*", default=[], help="also time the torch path at these")
    parser.add_argument(
        "--anchors", action="store_true", help="also time Liger's and CCE's hard-label fused CE (where installed)"
    )
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.method:
        print(json.dumps(run_one(args)))
        return

    forwarded = sys.argv[1:]
    if args.json is not None:  # the parent writes the report; children only print JSON
        i = forwarded.index("--json")
        del forwarded[i : i + 2]
    results = []
    extra = [*(["fused_q_compiled"] if args.compiled else []), *(["fused_q_triton"] if args.triton else [])]
    for method, package in (("liger_flce", "liger_kernel"), ("cce", "cut_cross_entropy")) if args.anchors else ():
        if importlib.util.find_spec(package) is None:
            print(f"{package} is not installed: no {method} row (benchmarks/gpu_wheels.sh carries it)")
        else:
            extra.append(method)
    for method in [*METHODS, *extra, *(f"fused_q_chunk{c}" for c in args.chunk_sizes)]:
        out = subprocess.run(
            [sys.executable, __file__, *forwarded, "--method", method],
            check=True,
            capture_output=True,
            text=True,
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    report(args, results)


def report(args, results: list[dict]) -> None:
    base = results[0]
    print(
        f"\nloss benchmark: device={args.device} dtype={args.dtype} tokens={args.tokens} "
        f"hidden={args.hidden} vocab={args.vocab} k={args.k} chunk={args.chunk_size}"
    )
    print("| method | step ms | tokens/s | speed vs plain CE | peak MiB | memory vs plain CE |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['method']} | {r['step_s'] * 1e3:.1f} | {args.tokens / r['step_s']:,.0f} | "
            f"{base['step_s'] / r['step_s']:.2f}x | {r['peak_bytes'] / 2**20:.0f} | "
            f"{r['peak_bytes'] / max(base['peak_bytes'], 1):.2f}x |"
        )
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results}, indent=2))


if __name__ == "__main__":
    main()
