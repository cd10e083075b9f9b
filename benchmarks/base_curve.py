"""The embedded base model's greedy chat accuracy along its pretraining, in the current CPU kernel
mode (docs/results.md "The same numbers across x86 CPUs"): how far the build has got when it stops, and so
how much a rounding-level change of arithmetic can move the finished base.

    make install && export MKL_CBWR=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2   # or the portable mode's
    python benchmarks/base_curve.py [--every 100] [--problems 200]

It repeats the build in memory (nothing is written to storage), evaluates a copy every `--every`
steps on the first problems of the old skill (forgetting set) and the new one (held-out set), and
prints the final weights' checksum, which equals the stored build's: evaluating does not perturb
the run.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from pipeline.world import builder, problems
from pipeline.world.config import WorldConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--every", type=int, default=100, help="evaluate every this many steps")
    parser.add_argument("--problems", type=int, default=200, help="problems per skill")
    args = parser.parse_args()
    cfg = WorldConfig()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # as builder.build does, so the run is the stored build's
    splits = problems.make_splits(builder.rules(cfg))
    tokenizer = builder.train_tokenizer(splits, cfg.vocab_size)
    model = builder.new_model(cfg, tokenizer)
    old, new = splits.forgetting[: args.problems], splits.heldout[: args.problems]

    def accuracy(step: int) -> None:
        if step % args.every and step != cfg.steps:
            return
        rng = torch.get_rng_state()
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            a, b = (builder.evaluate(tmp, rows, "chat")["accuracy"] for rows in (old, new))
        torch.set_rng_state(rng)
        print(f"| {step} | {a:.1%} | {b:.1%} |", flush=True)

    print(f"| step | old skill ({len(old)}) | new skill ({len(new)}) |\n|---:|---:|---:|")
    builder.pretrain(model, tokenizer, [builder.document_text(d) for d in splits.pretrain], cfg, False, accuracy)
    print(f"\nweights sha256: {builder.weights_checksum(model)}")


if __name__ == "__main__":
    main()
