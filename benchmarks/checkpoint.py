"""Checkpoint benchmark: save and resume time, hashing while writing/reading vs hashing afterwards.

Two ways to write and read the same checkpoint (model weights + AdamW state + RNG), in one process,
alternating, so the machine's noise hits both alike:

* baseline: how `checkpoints.py` worked before: `save_pretrained` + `torch.save`, then the sha256
  of every file read back; resume hashes every file again, then `load_file` + `torch.load`;
* streaming: today's `save_checkpoint` / `read_checkpoint` (`pipeline/common/tensorfiles.py`): digests
  computed from the buffers being written and read, each byte crossing the disk once.

Reported per shape: seconds (median of the repeats), the ratio to the baseline, and the bytes
read through read() (Linux rchar; the baseline's `load_file` maps its file, so its loading reads
are not in that count, only its hashing).

    python benchmarks/checkpoint.py                       # embedded model and a random 0.5B (CPU)
    python benchmarks/checkpoint.py --shapes embedded     # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def rchar() -> int:
    return int(
        next(line for line in Path("/proc/self/io").read_text().splitlines() if line.startswith("rchar")).split()[1]
    )


def settle() -> bool:
    """Flush dirty pages and, where allowed (root), drop the page cache, so that each timed step
    starts from the same state instead of paying for the previous one's writeback."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def baseline_save(folder: Path, model, tokenizer, model_state, optimizer_state, scheduler, rng) -> None:
    import torch

    from pipeline.common.storage import sha256_file
    from pipeline.training.checkpoints import untied_for_saving

    folder.mkdir(parents=True)
    model.save_pretrained(folder, state_dict=untied_for_saving(model, model_state))
    tokenizer.save_pretrained(folder)
    torch.save(
        {"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": rng}, folder / "trainer_state.pt"
    )
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}
    (folder / "checkpoint.json").write_text(json.dumps({"sha256": files}))


def baseline_read(folder: Path):
    import torch
    from safetensors.torch import load_file

    from pipeline.common.storage import sha256_file

    listed = json.loads((folder / "checkpoint.json").read_text())["sha256"]
    assert all(sha256_file(folder / name) == digest for name, digest in listed.items())
    return load_file(folder / "model.safetensors"), torch.load(folder / "trainer_state.pt", weights_only=True)


def model_for(shape: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.world import builder
    from pipeline.world.config import WorldConfig

    build = builder.build(WorldConfig(), os.environ.get("TARGET_SFT_STORAGE", "storage"), progress=False)
    tokenizer = AutoTokenizer.from_pretrained(build.model)
    if shape == "embedded":
        model = AutoModelForCausalLM.from_pretrained(build.model, dtype=torch.float32)
    else:
        from benchmarks.shapes import random_qwen2

        model = random_qwen2(shape)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():  # one step's worth of AdamW state, without a forward pass
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return model, tokenizer, optimizer, scheduler


def main() -> None:
    import torch

    from pipeline.training import checkpoints

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["embedded", "0.5b"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    print(
        "| shape | checkpoint | method | save s | resume s | save vs baseline | resume vs baseline "
        "| read while saving | read while resuming |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for shape in args.shapes:
        model, tokenizer, optimizer, scheduler = model_for(shape)
        rng = checkpoints.rng_states(1)
        times: dict[str, dict[str, list[float]]] = {
            m: {"save": [], "read": [], "rs": [], "rr": []} for m in ("baseline", "streaming")
        }
        size, cold = 0, True
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            for repeat in range(args.repeats):
                for method in ("baseline", "streaming") if repeat % 2 == 0 else ("streaming", "baseline"):
                    root = Path(tmp) / method
                    shutil.rmtree(root, ignore_errors=True)
                    state = (model.state_dict(), optimizer.state_dict(), scheduler, rng)
                    cold = settle() and cold
                    r0, t0 = rchar(), time.perf_counter()
                    if method == "baseline":
                        folder = root / "step"
                        baseline_save(folder, model, tokenizer, *state)
                    else:
                        checkpoints.save_checkpoint(root, 1, model, tokenizer, *state)
                        folder = root / "checkpoints" / "step-000001"
                    os.sync()  # a checkpoint counts as saved once it is on the disk
                    t1, r1 = time.perf_counter(), rchar()
                    cold = settle() and cold  # resume reads from the disk, not from the page cache
                    t2, r2 = time.perf_counter(), rchar()
                    loaded = baseline_read(folder) if method == "baseline" else checkpoints.read_checkpoint(folder)
                    t3, r3 = time.perf_counter(), rchar()
                    del loaded
                    size = sum(p.stat().st_size for p in folder.iterdir())
                    for key, value in (("save", t1 - t0), ("read", t3 - t2), ("rs", r1 - r0), ("rr", r3 - r2)):
                        times[method][key].append(value)
                    print(
                        f"  {shape} repeat {repeat} {method}: save {t1 - t0:.2f} s, resume {t3 - t2:.2f} s",
                        file=sys.stderr,
                    )
        print(f"  page cache dropped before each step: {cold}", file=sys.stderr)
        base = {k: statistics.median(v) for k, v in times["baseline"].items()}
        for method in ("baseline", "streaming"):
            m = {k: statistics.median(v) for k, v in times[method].items()}
            print(
                f"| {shape} | {size / 2**20:,.0f} MiB | {method} | {m['save']:.2f} | {m['read']:.2f} | "
                f"{m['save'] / base['save']:.2f}× | {m['read'] / base['read']:.2f}× | "
                f"{m['rs'] / 2**20:,.0f} MiB | {m['rr'] / 2**20:,.0f} MiB |"
            )
        del model, optimizer


if __name__ == "__main__":
    main()
