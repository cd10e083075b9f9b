"""Experiments: expand a grid of targets × seeds into runs, then compare the finished runs.

The orchestration itself (priors once, train and evaluate every run) is the Prefect flow in
`flows/experiment.py`; this module holds the parts that need no orchestrator: naming the runs,
their config overrides, and the comparison (table, plot, summary.json) from files on storage.
"""

from __future__ import annotations

import itertools
import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.common import cpu_kernels
from pipeline.common.config import section_problems
from pipeline.common.storage import atomic_write_text
from pipeline.core.targets import TargetError, from_config
from pipeline.experiments import stats
from pipeline.experiments.config import ExperimentConfig
from pipeline.priors import regimes
from pipeline.training import diagnostics
from pipeline.training.config import TargetConfig, TrainConfig, target_config


@dataclass
class RunSpec:
    """One training run of the grid."""

    label: str
    """The target as people read it, e.g. `target_sft(eta=0.5)`; runs of one label differ by seed."""
    seed: int
    run_name: str
    """`train.name` of the run: `<experiment>-<target slug>-s<seed>`."""
    target: TargetConfig
    """This run's `train.target`."""
    train: dict[str, Any] = field(default_factory=dict)
    """This run's own train settings (from the entry's `train:` mapping)."""

    def overrides(self) -> list[str]:
        """`--set`-style overrides that turn the experiment's config into this run's config."""
        items = [
            f"train.name={self.run_name}",
            f"train.target={json.dumps(self.target.compact())}",
            f"train.seed={self.seed}",
            f"eval.seed={self.seed}",
        ]
        return items + [f"train.{key}={json.dumps(value)}" for key, value in self.train.items()]


def expand_grid(exp: ExperimentConfig) -> list[RunSpec]:
    """Every target entry (lists expanded) × every seed; targets are validated here, up front.

    Raises:
        TargetError: an unknown preset or parameter, or two entries that name the same run.
    """
    if not exp.seeds:
        raise TargetError("experiment.seeds is empty; give at least one seed")
    repeated = sorted({s for s in exp.seeds if exp.seeds.count(s) > 1})
    if repeated:
        raise TargetError(f"experiment.seeds lists seed {repeated[0]} twice; each seed is one run, list it once")
    if not exp.targets:
        raise TargetError("experiment.targets is empty; list at least one target (e.g. [sft, dft])")
    runs, labels = [], set()
    for i, entry in enumerate(exp.targets):
        expanded = _expand_entry(entry)
        if not expanded:
            raise TargetError(f"experiment.targets[{i}] sweeps an empty list; give each swept parameter a value")
        for raw, train in expanded:
            target = target_config(raw, f"experiment.targets[{i}]")
            from_config(target)  # unknown presets and parameters fail before anything runs
            label = target_label(target.compact())
            if train:  # the same target at other train settings is another row: `sft[lr=0.001]`
                label += "[" + ", ".join(f"{k}={v}" for k, v in train.items()) + "]"
            if label in labels:
                raise TargetError(f"experiment.targets names {label!r} twice")
            labels.add(label)
            for seed in exp.seeds:
                runs.append(RunSpec(label, seed, f"{exp.name}-{slug(label)}-s{seed}", target, train))
    if exp.compare_to is not None and exp.compare_to not in labels:
        raise TargetError(
            f"experiment.compare_to={exp.compare_to!r} names no target of the grid; use one of {sorted(labels)}"
        )
    return runs


def _expand_entry(entry: Any) -> list[tuple[str | dict[str, Any], dict[str, Any]]]:
    if isinstance(entry, str):
        return [(entry, {})]
    if not isinstance(entry, dict):
        raise TargetError(f"experiment.targets entry {entry!r} must be a preset name or a mapping")
    entry = dict(entry)
    train = entry.pop("train", {}) or {}
    if not isinstance(train, dict):
        raise TargetError(f"experiment.targets entry {entry!r}: `train` must be a mapping of train settings")
    if "target" in train or "name" in train:
        raise TargetError(
            f"experiment.targets entry {entry!r}: its `train` mapping may not set target or name (the entry "
            "itself is the target, and the experiment names its runs)"
        )
    problems = section_problems(TrainConfig, train, "train.")
    if problems:
        raise TargetError(f"experiment.targets entry {entry!r}: " + "; ".join(problems))
    swept = {k: v for k, v in entry.items() if isinstance(v, list)}
    combos = itertools.product(*swept.values()) if swept else [()]
    return [({**entry, **dict(zip(swept, values, strict=True))}, train) for values in combos]


def target_label(target: str | dict[str, Any]) -> str:
    """`sft`, `target_sft(eta=0.5)`, `composition(gamma=..., residual=...)`."""
    if isinstance(target, str):
        return target
    name = target.get("preset", "composition")
    params = ", ".join(f"{k}={v}" for k, v in target.items() if k != "preset")
    return f"{name}({params})" if params else str(name)


def slug(label: str) -> str:
    """A folder-safe form of a label: `target_sft(eta=0.5)` -> `target_sft-eta0.5`, `sft[lr=0.001]` -> `sft-lr0.001`."""
    text = re.sub(r"[=\s)\]]+", "", re.sub(r"[(\[,]", "-", label))
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", text)


# --- selection on the validation split ----------------------------------------------------------------


def choose(runs: list[dict[str, Any]], set_name: str) -> dict[str, Any]:
    """Every candidate's mean validation Average@n over its seeds, and the best one (ties: fewer steps,
    then the lower learning rate, the cheaper and safer choice)."""
    candidates = []
    for label in dict.fromkeys(r["label"] for r in runs):
        group = [r for r in runs if r["label"] == label]
        scores = [r["eval"][set_name]["average_at_n"] for r in group if r["status"] == "ok" and r["eval"]]
        train = next(r.get("train", {}) for r in group)
        candidates.append({"label": label, "train": train, "seeds": len(group), "average_at_n": scores})
    finished = [c for c in candidates if c["average_at_n"] and len(c["average_at_n"]) == c["seeds"]]
    if not finished:
        raise TargetError("no selection candidate finished; see the table for the failed runs")
    best = max(
        finished,
        key=lambda c: (statistics.mean(c["average_at_n"]), -c["train"]["max_steps"], -c["train"]["lr"]),
    )
    return {"set": set_name, "candidates": candidates, "chosen": best["train"]}


# --- comparison --------------------------------------------------------------------------------------


def run_summary(spec: RunSpec, run_dir: Path, report_path: str | None, error: str | None) -> dict[str, Any]:
    """What the comparison needs from one run, read from its files (or its error)."""
    row: dict[str, Any] = {"label": spec.label, "seed": spec.seed, "run": spec.run_name, "status": "ok"}
    row["train"] = spec.train
    if error is not None:
        return {**row, "status": "failed", "error": error}
    metrics_path = run_dir / "metrics.jsonl"
    metrics = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    row["loss_curve"] = [(m["step"], m["loss"], m["ce"]) for m in metrics]
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    row["heldout_ce"] = evals[-1] if evals else None
    info = _read_json(run_dir / "run.json")
    row["diagnostics"] = info.get("diagnostics") if isinstance(info, dict) else None
    row["arithmetic"] = info.get("arithmetic") if isinstance(info, dict) else None
    row["eval"] = json.loads(Path(report_path).read_text())["sets"] if report_path else None
    row["scores"] = problem_scores(Path(report_path).with_name("samples.jsonl")) if report_path else None
    return row


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def problem_scores(samples: Path) -> dict[str, list[float]] | None:
    """Per set, each problem's share of correct samples (its Average@n), in the report's problem order."""
    if not samples.exists():
        return None
    scores: dict[str, list[float]] = {}
    for line in samples.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            scores.setdefault(record["set"], []).append(sum(record["correct"]) / len(record["correct"]))
    return scores


def _score_matrix(group: list[dict[str, Any]], name: str) -> tuple[list[int], np.ndarray] | None:
    """(seeds, [seeds, problems] scores on set `name`) of a target's finished runs; None if any lacks them."""
    ok = sorted((r for r in group if r["status"] == "ok" and r.get("scores")), key=lambda r: r["seed"])
    if not ok or any(name not in r["scores"] for r in ok) or len({len(r["scores"][name]) for r in ok}) != 1:
        return None
    return [r["seed"] for r in ok], np.array([r["scores"][name] for r in ok])


def _intervals(runs: list[dict[str, Any]], label: str, compare_to: str | None, name: str) -> tuple[str, str, str]:
    """Average@n with its 95% interval; against `compare_to`: the paired difference and seeds won."""
    mine = _score_matrix([r for r in runs if r["label"] == label], name)
    if mine is None:
        return "-", "-", "-"
    seeds, scores = mine
    average = stats.bootstrap(scores).percent()
    reference = _score_matrix([r for r in runs if r["label"] == compare_to], name) if compare_to else None
    if reference is None or label == compare_to:
        return average, "-", "-"
    shared = [s for s in seeds if s in reference[0]]
    if not shared or scores.shape[1] != reference[1].shape[1]:
        return average, "-", "-"
    pick = lambda seeds_, m: m[[seeds_.index(s) for s in shared]]  # noqa: E731
    result = stats.paired(pick(seeds, scores), pick(reference[0], reference[1]))
    return average, result.difference.points(), f"{result.wins}/{result.seeds}"


def _pct(values: dict[str, Any], key: str) -> str:
    return f"{values[key]:.1%}" if key in values else "-"


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1%}"
    return f"{statistics.mean(values):.1%} ± {statistics.stdev(values):.1%}"


@dataclass
class Comparison:
    """What an experiment's table, plot and summary.json are made from."""

    name: str
    n: int
    """Samples per problem (Average@n)."""
    base: dict[str, Any] | None
    """The untrained base model's per-set eval report (`sets` of its report.json), or None."""
    runs: list[dict[str, Any]]
    """`run_summary` of every run of the grid."""
    prior: dict | None = None
    """The prior set used (key, forward passes), or None."""
    compare_to: str | None = None
    """The reference target of the paired column (`experiment.compare_to`)."""

    @property
    def sets(self) -> list[str]:
        """The evaluation sets, in report order; the first is the one the plot shows."""
        reports = [r["eval"] for r in self.runs if r["status"] == "ok" and r["eval"]] + [self.base or {}]
        return list(dict.fromkeys(name for report in reports for name in report))


def comparison_markdown(c: Comparison) -> str:
    """The experiment's table: per evaluation set, one row per target (Average@n with its 95% bootstrap
    interval over problems and seeds, mean ± std over seeds, and the paired difference to `compare_to`),
    then one row per run."""
    name, n, base, runs, prior, compare_to = c.name, c.n, c.base, c.runs, c.prior, c.compare_to
    lines = [f"# Experiment `{name}`", "", arithmetic_line(runs), ""]
    if prior is not None:
        reuse = "reused from the cache" if prior["forward_passes"] == 0 else "captured in this run"
        lines += [f"Priors: set `{prior['key']}`, {reuse} ({prior['forward_passes']} prior forward passes).", ""]
        for found in (prior, prior.get("student") or {}):
            if found.get("gamma_profile"):
                if found is not prior:
                    lines += [f"The student's own prior set `{found['key']}` (for its γ profile):", ""]
                described = regimes.describe(found["gamma_profile"], found.get("prior_role"))
                lines += [line + "  " for line in described.splitlines()] + [""]  # markdown line breaks
    versus = compare_to or "reference"
    for set_name in c.sets:
        problems = next(
            (r["eval"][set_name].get("problems", "?") for r in runs if r.get("eval") and set_name in r["eval"]), "?"
        )
        lines += [
            f"## `{set_name}` ({problems} problems)",
            "",
            f"| target | seeds | Average@{n} [95% CI] | Average@{n} (mean ± std) | pass@{n} | greedy "
            f"| Δ vs {versus} [95% CI] | seeds won | failed runs |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        if base is not None and set_name in base:
            cells = " | ".join(_pct(base[set_name], k) for k in ("average_at_n", "average_at_n", "pass_at_n", "greedy"))
            lines.append(f"| base model (untrained) | - | {cells} | - | - | - |")
        for label in dict.fromkeys(r["label"] for r in runs):
            group = [r for r in runs if r["label"] == label]
            ok = [r["eval"][set_name] for r in group if r["status"] == "ok" and r["eval"] and set_name in r["eval"]]
            failed = sum(r["status"] == "failed" for r in group)
            keys = ("average_at_n", "pass_at_n", "greedy")
            cells = " | ".join(_mean_std([e[k] for e in ok if k in e]) for k in keys)
            interval, delta, won = _intervals(runs, label, compare_to, set_name)
            lines.append(f"| {label} | {len(group)} | {interval} | {cells} | {delta} | {won} | {failed} |")
        lines.append("")
    first = c.sets[0] if c.sets else None
    lines += [
        "Intervals: 95% bootstrap over problems and seeds (pipeline/experiments/stats.py). Δ: the paired per-problem "
        "difference to the reference target on the same seeds; seeds won: seeds whose mean beats it.",
        "",
        f"| run | seed | status | {' | '.join(f'Average@{n} {s}' for s in c.sets)} | final train loss | held-out CE "
        f"| {' | '.join(DIAGNOSTICS.values())} | collapsed ({first}) |",
        "|---|---:|---|" + "---:|" * (len(c.sets) + 3 + len(DIAGNOSTICS)),
    ]
    for r in runs:
        if r["status"] == "failed":
            dashes = " | ".join("-" for _ in range(len(c.sets) + 3 + len(DIAGNOSTICS)))
            lines.append(f"| {r['run']} | {r['seed']} | failed: {r['error'][:120]} | {dashes} |")
            continue
        cells = " | ".join(_pct((r["eval"] or {}).get(s, {}), "average_at_n") for s in c.sets)
        loss = f"{r['loss_curve'][-1][1]:.4f}" if r["loss_curve"] else "-"
        ce = f"{r['heldout_ce']:.3f}" if r["heldout_ce"] is not None else "-"
        found = r.get("diagnostics") or {}
        measured = " | ".join(diagnostics.fmt(found.get(k)) for k in DIAGNOSTICS)
        collapsed = _pct((r["eval"] or {}).get(first, {}), "collapsed_share")
        lines.append(f"| {r['run']} | {r['seed']} | ok | {cells} | {loss} | {ce} | {measured} | {collapsed} |")
    lines += [
        "",
        f"Diagnostics (pipeline/training/diagnostics.py) on the first {diagnostics.SLICE} SFT examples after "
        "training: the NLL and mean p of the observed tokens, the share with p > 0.9 (sharpening), "
        "KL(prior model ‖ run) per token (a lower bound from the stored top-k); collapsed: the share of samples "
        "that never end or loop.",
    ]
    return "\n".join(lines) + "\n"


def arithmetic_line(runs: list[dict[str, Any]]) -> str:
    """Where the runs computed: CPU, ISA, kernel mode, torch and MKL (docs/design.md §7). Numbers
    from different lines here are not comparable digit for digit."""
    seen = list(dict.fromkeys(cpu_kernels.describe(r["arithmetic"]) for r in runs if r.get("arithmetic")))
    if not seen:
        return f"Arithmetic: not recorded by the runs; this process: {cpu_kernels.describe(cpu_kernels.arithmetic())}."
    return (
        "Arithmetic: "
        + ("; ".join(seen) if len(seen) == 1 else "MIXED, not comparable digit for digit: " + "; ".join(seen))
        + "."
    )


DIAGNOSTICS = {
    "observed_nll": "NLL(obs)",
    "mean_p_observed": "mean p(obs)",
    "share_p_above_0_9": "p(obs) > 0.9",
    "kl_from_prior": "KL from prior",
}
"""run.json's diagnostics as the comparison table names them."""


def comparison_plot(path: Path, c: Comparison) -> None:
    """PNG: Average@n on the first set per target with every seed's point; each run's training loss and
    its CE to the observed token (the one curve that compares across targets) over the steps."""
    n, base, runs = c.n, c.base, c.runs
    first = c.sets[0] if c.sets else None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["label"] for r in runs))
    fig, (acc_ax, own_ax, loss_ax, diag_ax) = plt.subplots(1, 4, figsize=(22, 4.5))
    for x, label in enumerate(labels):
        reports = [r["eval"] for r in runs if r["label"] == label and r["status"] == "ok" and r["eval"]]
        values = [report[first]["average_at_n"] for report in reports if first in report]
        if values:
            acc_ax.bar(x, statistics.mean(values), color="C0", alpha=0.5)
            acc_ax.scatter([x] * len(values), values, color="C0", zorder=3, label="seeds" if x == 0 else None)
            matrix = _score_matrix([r for r in runs if r["label"] == label], str(first))
            if matrix is not None:
                ci = stats.bootstrap(matrix[1])
                acc_ax.errorbar(x, ci.mean, yerr=[[ci.mean - ci.low], [ci.high - ci.mean]], color="k", capsize=4)
        else:
            acc_ax.text(x, 0.01, "failed", ha="center", color="C3")
    if base is not None and first in base:
        acc_ax.axhline(base[first]["average_at_n"], color="C3", linestyle="--", label="base model")
    acc_ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    acc_ax.set_ylabel(f"Average@{n} on {first}")
    acc_ax.set_title("held-out accuracy per target (bar: mean, dots: seeds, whisker: 95% bootstrap CI)", fontsize=10)
    acc_ax.legend()
    for i, label in enumerate(labels):
        for r in runs:
            if r["label"] == label and r["status"] == "ok" and r["loss_curve"]:
                steps, own, ce = zip(*r["loss_curve"], strict=True)
                legend = label if r["seed"] == min(x["seed"] for x in runs) else None
                own_ax.plot(steps, own, color=f"C{i}", alpha=0.8, label=legend)
                loss_ax.plot(steps, ce, color=f"C{i}", alpha=0.8, label=legend)
    own_ax.set_xlabel("step")
    own_ax.set_ylabel("training loss (each target's own objective)")
    own_ax.set_title("training loss curves (one line per seed)")
    own_ax.legend()
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("training CE to the observed token")
    loss_ax.set_title("CE to the observed token (comparable across targets)")
    loss_ax.legend()
    for x, label in enumerate(labels):
        found = [r.get("diagnostics") or {} for r in runs if r["label"] == label and r["status"] == "ok"]
        for key, marker, name in (("mean_p_observed", "o", "mean p(obs)"), ("share_p_above_0_9", "s", "p(obs) > 0.9")):
            values = [d[key] for d in found if d.get(key) is not None]
            diag_ax.scatter([x] * len(values), values, marker=marker, color="C0" if marker == "o" else "C1",
                            label=name if x == 0 else None)  # fmt: skip
        collapsed = [r["eval"][first]["collapsed_share"] for r in runs if r["label"] == label and r["status"] == "ok"
                     and r["eval"] and "collapsed_share" in r["eval"].get(first, {})]  # fmt: skip
        diag_ax.scatter([x] * len(collapsed), collapsed, marker="x", color="C3", label="collapsed" if x == 0 else None)
    diag_ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    diag_ax.set_ylim(-0.02, 1.02)
    diag_ax.set_title("after training: SFT-slice p(observed), sharpening, collapsed samples", fontsize=10)
    diag_ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def paper_plot(path: Path, c: Comparison) -> None:
    """PNG in the manner of the paper's figure: per evaluation set (setting), one marker per target
    (method) at its Average@n with the 95% bootstrap interval over problems and seeds; the base model
    as a hollow marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["label"] for r in c.runs))
    fig, ax = plt.subplots(figsize=(2.2 + 2.6 * max(len(c.sets), 1), 4.5))
    width = 0.8 / max(len(labels), 1)
    for x, set_name in enumerate(c.sets):
        if c.base is not None and set_name in c.base:
            ax.scatter(x - 0.45, c.base[set_name]["average_at_n"], marker="o", facecolors="none", edgecolors="k",
                       s=60, label="base model" if x == 0 else None, zorder=3)  # fmt: skip
        for i, label in enumerate(labels):
            matrix = _score_matrix([r for r in c.runs if r["label"] == label], set_name)
            if matrix is None:
                continue
            ci = stats.bootstrap(matrix[1])
            at = x - 0.4 + width * (i + 0.5)
            ax.errorbar(at, ci.mean, yerr=[[ci.mean - ci.low], [ci.high - ci.mean]], fmt="os^Dvp<>h*"[i % 10],
                        color=f"C{i}", capsize=3, label=label if x == 0 else None)  # fmt: skip
    ax.set_xticks(range(len(c.sets)), c.sets)
    ax.set_ylabel(f"Average@{c.n} (95% CI over problems and seeds)")
    ax.set_title(f"{c.name}: one marker per method and setting", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_comparison(out_dir: Path, c: Comparison) -> str:
    """Write comparison.md, comparison.png, figure.png (the paper's kind) and summary.json into
    `out_dir`; returns the markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = comparison_markdown(c)
    comparison_plot(out_dir / "comparison.png", c)
    paper_plot(out_dir / "figure.png", c)
    atomic_write_text(out_dir / "comparison.md", markdown)
    summary = {"name": c.name, "n": c.n, "base": c.base, "priors": c.prior, "compare_to": c.compare_to, "runs": c.runs}
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    return markdown
