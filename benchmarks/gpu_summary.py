"""The markdown summary of a benchmarks/gpu_suite.sh run: one table per benchmark JSON, plus each
step's status and time. `python benchmarks/gpu_summary.py OUT` prints it."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path


def ratio_table(title: str, results: list[dict], tokens: int | None = None) -> list[str]:
    """Speed and peak memory of each method as ratios to the first (measured in the same run)."""
    base = results[0]
    first = base["method"]
    lines = [f"### {title}", "", f"| method | step ms | speed vs {first} | peak MiB | memory vs {first} |"]
    lines.append("|---|---:|---:|---:|---:|")
    for r in results:
        rate = (r.get("tokens") or tokens or 1) / r["step_s"]
        base_rate = (base.get("tokens") or tokens or 1) / base["step_s"]
        lines.append(
            f"| {r['method']} | {r['step_s'] * 1e3:.1f} | {rate / base_rate:.2f}x | {r['peak_bytes'] / 2**20:,.0f} | "
            f"{r['peak_bytes'] / max(base['peak_bytes'], 1):.2f}x |"
        )
    return [*lines, ""]


def summary(out: Path) -> str:
    lines = ["# GPU suite", ""]
    device = "unknown"
    priors_path = out / "priors.json"
    if priors_path.exists():
        device = json.loads(priors_path.read_text()).get("device", device)
    lines += [f"device: {device}; host: {platform.node()}", "", "| step | status | seconds |", "|---|---|---:|"]
    steps = out / "steps.tsv"
    for row in steps.read_text().splitlines() if steps.exists() else []:
        name, status, seconds = row.split("\t")
        lines.append(f"| {name} | {'ok' if status == '0' else f'FAILED ({status})'} | {seconds} |")
    lines.append("")
    for name, title in (
        ("loss", "Loss (lm_head + loss + backward)"),
        ("train_loss", "Train step: plain CE vs fused Target-SFT"),
        ("train_packing", "Train step: padded vs packed (length-skewed)"),
    ):
        path = out / f"{name}.json"
        if path.exists():
            report = json.loads(path.read_text())
            lines += ratio_table(title, report["results"], report["args"].get("tokens"))
    if priors_path.exists():
        p = json.loads(priors_path.read_text())
        lines += ["### Prior capture (hf engine)", "", "| path | seconds | scored tokens/s |", "|---|---:|---:|"]
        lines += [f"| {name} | {seconds:.2f} | {p['scored'] / seconds:,.0f} |" for name, seconds in p["rows"]]
        mfu = f"{p['mfu']:.1%}" if p.get("mfu") else "n/a (peak unknown)"
        lines += ["", f"MFU of the hf engine (forward, 2 × params × tokens): {mfu}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary(Path(sys.argv[1])))
