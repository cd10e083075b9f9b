"""Does the teacher earn its cost? The paper's five rows in the model-strong world (issue 31).

Reads finished experiments from the storage root (it trains nothing):

- `model-strong-teacher`: SFT, DFT, Distill (kd, hybrid_kd 0.5) and Target-SFT at η 0..1, priors from
  the registered teacher (configs/worlds/model-strong-teacher.yaml);
- `model-strong`: Target-SFT (η 0.5) with the base itself as prior, the control (the earlier demo);
- `model-strong-teacher-weak`: the chosen Target-SFT and Distill with the weaker teacher.

and prints one table per evaluation set (Average@2 with its 95% interval over problems and seeds,
and the paired differences to SFT, DFT and Distill on the same problems and seeds), then the
teacher-strength table, the cost line, and writes docs/teacher-strength.png.

    python benchmarks/teacher.py --eta 0.5 --distill kd      # the choices made on validation
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pipeline.common.config import load_config
from pipeline.entry import stages
from pipeline.entry.config import RunConfig
from pipeline.entry.resolve import experiment_dir
from pipeline.experiments import stats
from pipeline.experiments.experiment import _score_matrix
from pipeline.world import builder

REPO = Path(__file__).resolve().parent.parent
WORLDS = REPO / "configs" / "worlds"
TEACHERS = {
    "base itself": "model-strong",
    "weaker teacher": "model-strong-teacher-weak",
    "teacher": "model-strong-teacher",
}


def runs_of(config: str, rename: dict[str, str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The runs of an experiment's summary.json, relabelled, and its base model's report."""
    cfg = load_config(RunConfig, WORLDS / f"{config}.yaml")
    summary = json.loads((experiment_dir(cfg) / "summary.json").read_text())
    runs = [{**r, "label": rename[r["label"]]} for r in summary["runs"] if r["label"] in rename]
    return runs, summary


def teacher_accuracy(config: str) -> float:
    """The prior model's held-out Average@n, as `target-sft eval CONFIG --prior-model` reported it."""
    cfg = load_config(RunConfig, WORLDS / f"{config}.yaml")
    report = json.loads(stages.evaluate_run(cfg, prior=True, progress=False).read_text())
    return report["sets"][builder.EMBEDDED_SET]["average_at_n"]


def paired(runs: list[dict[str, Any]], label: str, reference: str, set_name: str) -> stats.Paired | None:
    mine = _score_matrix([r for r in runs if r["label"] == label], set_name)
    other = _score_matrix([r for r in runs if r["label"] == reference], set_name)
    if mine is None or other is None or mine[0] != other[0] or label == reference:
        return None
    return stats.paired(mine[1], other[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eta", type=float, required=True, help="Target-SFT's η chosen on validation")
    parser.add_argument("--distill", choices=["kd", "hybrid_kd(lam=0.5)"], required=True, help="Distill's form")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "teacher-strength.png")
    args = parser.parse_args()
    chosen = f"target_sft(eta={args.eta!r})"  # labels as the grid writes them: eta=1.0, eta=0.25
    etas = [f"target_sft(eta={e!r})" for e in (0.0, 0.25, 0.5, 0.75, 1.0)]
    main_rows = ["sft", "dft", "kd", "hybrid_kd(lam=0.5)", *etas]
    teacher_runs, summary = runs_of("model-strong-teacher", {label: label for label in main_rows})
    control, _ = runs_of("model-strong", {"target_sft(eta=0.5)": "target_sft(eta=0.5), base as prior"})
    weak, _ = runs_of(
        "model-strong-teacher-weak",
        {chosen: f"{chosen}, weaker teacher", args.distill: f"{args.distill}, weaker teacher"},
    )
    runs = teacher_runs + control + weak
    labels = list(dict.fromkeys(r["label"] for r in runs))
    n = summary["n"]
    for set_name in dict.fromkeys(s for r in runs if r.get("scores") for s in r["scores"]):
        print(f"\n**`{set_name}`**\n")
        print(f"| target | seeds | Average@{n} [95% CI] | Δ vs SFT | Δ vs DFT | Δ vs Distill ({args.distill}) |")
        print("|---|---:|---:|---:|---:|---:|")
        if summary["base"] and set_name in summary["base"]:
            print(f"| base model (untrained) | - | {summary['base'][set_name]['average_at_n']:.1%} | - | - | - |")
        for label in labels:
            matrix = _score_matrix([r for r in runs if r["label"] == label], set_name)
            if matrix is None:
                continue
            cells = []
            for reference in ("sft", "dft", args.distill):
                result = paired(runs, label, reference, set_name)
                cells.append(f"{result.difference.points()} ({result.wins}/{result.seeds})" if result else "-")
            print(f"| {label} | {len(matrix[0])} | {stats.bootstrap(matrix[1]).percent()} | {' | '.join(cells)} |")

    # teacher strength: Target-SFT − DFT and Target-SFT − Distill against the teacher's advantage
    base_accuracy = summary["base"][builder.EMBEDDED_SET]["average_at_n"]
    points = []
    for name, config in TEACHERS.items():
        advantage = teacher_accuracy(config) - base_accuracy if config != "model-strong" else 0.0
        if config == "model-strong":
            target, distill, pool = "target_sft(eta=0.5), base as prior", None, runs
        elif config == "model-strong-teacher":
            target, distill, pool = chosen, args.distill, runs
        else:
            target, distill, pool = f"{chosen}, weaker teacher", f"{args.distill}, weaker teacher", runs
        versus_dft = paired(pool, target, "dft", builder.EMBEDDED_SET)
        versus_distill = paired(pool, target, distill, builder.EMBEDDED_SET) if distill else None
        points.append((name, advantage, versus_dft, versus_distill))
    print("\n| prior | its held-out advantage over the base | Target-SFT − DFT | Target-SFT − Distill |")
    print("|---|---:|---:|---:|")
    for name, advantage, dft, distill in points:
        cells = [p.difference.points() if p else "-" for p in (dft, distill)]
        print(f"| {name} | {100 * advantage:+.1f} pt | {cells[0]} | {cells[1]} |")
    plot(args.plot, points)
    print(f"\nplot: {args.plot}")


def plot(path: Path, points: list[tuple[str, float, Any, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for offset, index, label, color in ((-0.3, 2, "Target-SFT − DFT", "C0"), (0.3, 3, "Target-SFT − Distill", "C1")):
        xs, ys, lows, highs = [], [], [], []
        for point in points:
            if point[index] is None:
                continue
            d = point[index].difference
            xs.append(100 * point[1] + offset)
            ys.append(100 * d.mean)
            lows.append(100 * (d.mean - d.low))
            highs.append(100 * (d.high - d.mean))
        ax.errorbar(xs, ys, yerr=[lows, highs], fmt="o-", color=color, capsize=4, label=label)
    for name, advantage, *_ in points:
        ax.annotate(name, (100 * advantage, ax.get_ylim()[0]), textcoords="offset points", xytext=(0, 4), fontsize=8)
    ax.axhline(0, color="k", linewidth=0.8)
    ax.set_xlabel("the prior model's held-out advantage over the base (points of Average@2)")
    ax.set_ylabel("paired difference on the held-out set (points, 95% CI)")
    ax.set_title("Does the teacher earn its cost? (model-strong world, 3 seeds)", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
