"""The capability continuum, measured: each world's mean γ against each target's difference from SFT.

For every world in `configs/worlds/model-*.yaml` whose experiment has run (`target-sft run ...`),
this reads its prior set's γ profile and its runs' per-problem scores, and plots, at x = the
world's mean γ, the paired difference to plain SFT (with its 95% bootstrap interval over problems
and seeds) of DFT and of Target-SFT, at the shared lr and at each objective's own lr. The sign the
literature predicts for the world's band (pipeline/priors/regimes.py) is marked beside each point, and a
table prints predicted against measured.

    python benchmarks/continuum.py                       # writes docs/continuum.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORLDS = ("model-weak", "model-intermediate", "model-strong")
PREDICTED = {"model-weak": "−", "model-intermediate": "≈ 0", "model-strong": "+"}
"""The sign of (γ = p target − SFT) that BLL measured in each band (its Tables 1–3)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/continuum.png")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    from pipeline.common.config import load_config
    from pipeline.entry.config import RunConfig
    from pipeline.entry.resolve import experiment_dir
    from pipeline.experiments import experiment, stats
    from pipeline.priors.cache import PriorStore

    points = []
    print("| world | mean γ | regime | target | predicted vs SFT | measured Δ vs SFT [95% CI] | seeds won | agrees |")
    print("|---|---:|---|---|:---:|---:|---:|:---:|")
    for name in WORLDS:
        path = Path("configs/worlds") / f"{name}.yaml"
        cfg = load_config(RunConfig, path, args.overrides)
        summary_path = experiment_dir(cfg) / "summary.json"
        if not summary_path.exists():
            print(f"| {name} | - | - | - | - | not run (`target-sft run {path}`) | - | - |")
            continue
        summary = json.loads(summary_path.read_text())
        profile = PriorStore(cfg.storage_root).gamma_profile(summary["priors"]["key"])
        runs = summary["runs"]
        first = next(iter(next(r["eval"] for r in runs if r.get("eval"))))  # the skill the SFT set teaches
        reference = experiment._score_matrix([r for r in runs if r["label"] == "sft"], first)
        for label in dict.fromkeys(r["label"] for r in runs):
            if label == "sft" or reference is None:
                continue
            mine = experiment._score_matrix([r for r in runs if r["label"] == label], first)
            if mine is None:
                continue
            shared = [s for s in mine[0] if s in reference[0]]
            result = stats.paired(
                mine[1][[mine[0].index(s) for s in shared]], reference[1][[reference[0].index(s) for s in shared]]
            )
            d = result.difference
            sign = "+" if d.low > 0 else "−" if d.high < 0 else "≈ 0"
            predicted = PREDICTED[profile["regime"]]
            print(
                f"| {name} | {profile['mean']:.3f} | {profile['regime']} | {label} | {predicted} | {d.points()} "
                f"| {result.wins}/{result.seeds} | {'yes' if sign == predicted else 'no'} |"
            )
            points.append((profile["mean"], label, d, predicted))
    if points:
        plot(points, Path(args.out))
        print(f"\nplot: {args.out}")


def plot(points: list, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    labels = list(dict.fromkeys(p[1] for p in points))
    for i, label in enumerate(labels):
        mine = [p for p in points if p[1] == label]
        x = np.array([p[0] for p in mine]) + (i - (len(labels) - 1) / 2) * 0.012  # side by side
        y = np.array([100 * p[2].mean for p in mine])
        err = np.array([[100 * (p[2].mean - p[2].low) for p in mine], [100 * (p[2].high - p[2].mean) for p in mine]])
        ax.errorbar(x, y, yerr=err, fmt="o", capsize=4, label=label, color=f"C{i}")
    for mean in sorted({p[0] for p in points}):
        predicted = next(p[3] for p in points if p[0] == mean)
        ax.annotate(f"predicted {predicted}", (mean, 1.0), xycoords=("data", "axes fraction"), ha="center",
                    va="top", fontsize=9, color="0.3")  # fmt: skip
    for cut in (0.30, 0.70):
        ax.axvline(cut, color="0.7", linestyle=":")
    ax.axhline(0, color="k", linewidth=0.8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("mean γ = p_base(observed) over the SFT set (the world's γ profile)")
    ax.set_ylabel("Average@n − SFT's, points (paired, 95% CI)")
    ax.set_title("The capability continuum in the embedded worlds (bands: weak | intermediate | strong)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
