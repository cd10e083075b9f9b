"""The `target-sft` entry point: the library's commands plus `run`, `serve` and `demo` (Prefect flows)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import flows  # noqa: F401  (offline Prefect settings before prefect is imported)
from pipeline.common import cpu_kernels

if __name__ == "__main__":  # `python -m flows.cli`: re-executed with pinned kernels before the imports below
    cpu_kernels.reexec_pinned()

from pipeline.common.config import SafeName
from pipeline.common.errors import ConfigError
from pipeline.common.storage import atomic_write_text
from pipeline.entry import cli, stages
from pipeline.entry.config import RunConfig
from pipeline.entry.resolve import resolve_inputs
from pipeline.experiments import experiment
from pipeline.priors.cache import PriorStore
from pipeline.world import builder


def run(args: argparse.Namespace, config: str | Path | None, cfg: RunConfig) -> int:
    """`target-sft run CONFIG`: the experiment flow once; exit 1 when a run of the grid failed."""
    from flows.experiment import experiment_flow

    result = experiment_flow(str(config) if config else None, args.overrides, progress=True)
    print(f"table: {result['table']}\nplot: {result['plot']}")
    if result["failed_runs"]:
        print(f"failed runs (see the table): {', '.join(result['failed_runs'])}")
    return 1 if result["failed_runs"] else 0


def serve(args: argparse.Namespace, config: str | Path | None, cfg: RunConfig) -> int:
    """`target-sft serve CONFIG --cron ...`: register the deployment and run its schedule (blocks)."""
    from prefect.client.schemas.schedules import CronSchedule

    from flows.experiment import experiment_flow

    cron = args.cron or cfg.experiment.schedule
    name = args.name or cfg.experiment.name
    problem = SafeName().problem(name)
    if problem:
        raise ConfigError(f"deployment name {name!r}: {problem}")
    if cron is not None:
        try:
            CronSchedule(cron=cron)
        except ValueError:
            raise ConfigError(f"--cron {cron!r} is not a cron schedule; e.g. '0 3 * * *' (daily at 03:00)") from None
    parameters = {"config": str(Path(config).resolve()) if config else None, "overrides": args.overrides}
    check_api_reachable()
    experiment_flow.serve(name=name, cron=cron, parameters=parameters)
    return 0


def check_api_reachable() -> None:
    """`serve` registers its deployment with the server at PREFECT_API_URL; an unreachable one was an
    httpx traceback after Prefect's own retries. Ask its health endpoint first, briefly."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return
    try:
        httpx.get(f"{url.rstrip('/')}/health", timeout=10).raise_for_status()
    except httpx.HTTPError as e:
        raise ConfigError(
            f"the Prefect server at PREFECT_API_URL={url} does not answer ({type(e).__name__}: {e}); start it "
            '(`prefect server start`, docs/experiments.md "Schedules") or point PREFECT_API_URL at the one you run'
        ) from None


README_CPU_KINDS = ("AuthenticAMD/avx2", "AuthenticAMD/avx512")
"""The CPU kinds whose pinned kernels printed the README's demo tables (AMD EPYC Zen 3; Zen 4 gave the
same digits for every piece measured on both). Another kind computes the same experiment in other
rounding (MKL runs another branch there: docs/design.md §7), so its last digits may differ."""


def arithmetic_note() -> str | None:
    """A line for a demo run whose numbers are not the README's own arithmetic, else None."""
    kind, mode = cpu_kernels.cpu_kind(), cpu_kernels.mode()
    if mode == "pinned" and kind in README_CPU_KINDS:
        return None
    return (
        f"note: this run's arithmetic ({kind}, {mode} kernels) is not the one that printed the README's tables "
        f"({' or '.join(README_CPU_KINDS)}, pinned kernels): expect the same experiment with other rounding, so "
        'the last digits of its table may differ (docs/results.md "The same numbers across x86 CPUs")'
    )


def demo(args: argparse.Namespace, config: str | Path | None, cfg: RunConfig) -> int:
    """`make demo`: the demo experiment on the embedded base model, with what each stage did."""
    from flows.experiment import experiment_flow

    started = time.time()
    if note := arithmetic_note():
        print(note)
    print("== 1/4 embedded base model (built once, then reused)")
    builder.build(cfg.world, cfg.storage_root)
    seconds = {"base model build": time.time() - started}
    print("== 2/4 SFT data")
    cli.inspect_data(cfg)
    seconds["SFT data summary"] = time.time() - started - sum(seconds.values())
    runs = len(experiment.expand_grid(cfg.experiment))
    print(f"== 3/4 experiment {cfg.experiment.name!r}: priors once, {runs} training runs, evaluation (Prefect flow)")
    flow_started = time.time()
    result = experiment_flow(str(config) if config else None, args.overrides, progress=True)
    stages = {f"flow: {stage}": value for stage, value in result["seconds"].items() if stage != "base model"}
    seconds.update(stages, **{"flow: server, tasks, comparison": time.time() - flow_started - sum(stages.values())})
    print("== 4/4 comparison")
    if result["prior"]:
        manifest = PriorStore(cfg.storage_root).manifest(result["prior"]["key"])
        print(f"prior set {result['prior']['key']}: {manifest['counts']}")
        print(json.dumps(manifest["statistics"], indent=2))
    print(Path(result["table"]).read_text())
    print("| stage | seconds |\n|---|---:|" + "".join(f"\n| {k} | {v:.0f} |" for k, v in seconds.items()))
    print(f"table: {result['table']}\nplots: {result['plot']}, {result['figure']}")
    if note := arithmetic_note():
        print(note)
    print(f"demo finished in {time.time() - started:.0f}s")
    return 1 if result["failed_runs"] else 0


def select(args: argparse.Namespace, config: str | Path | None, cfg: RunConfig) -> int:
    """`target-sft select [CONFIG]`: `select.target` (plain SFT by default) at every select.lrs ×
    select.max_steps, scored on the validation split only; writes selection.json and prints the
    settings chosen (for SFT, those every target then uses; for another target, its own)."""
    from flows.experiment import experiment_flow

    validation = cfg.select.validation
    if validation is None:
        embedded = resolve_inputs(cfg).embedded
        if embedded is None or not embedded.validation.exists():
            raise ConfigError(
                "select.validation is not set and there is no embedded validation split: give one "
                "({name, path, answer_type}), disjoint from the eval.sets problems"
            )
        validation = builder.validation_set(embedded)
    overrides = [*args.overrides, *stages.selection_overrides(cfg, validation)]
    result = experiment_flow(str(config) if config else None, overrides, progress=True)
    out = Path(result["dir"])
    runs = json.loads((out / "summary.json").read_text())["runs"]
    selection = experiment.choose(runs, validation.name)
    atomic_write_text(out / "selection.json", json.dumps(selection, indent=2))
    print(f"\n| lr | max_steps | validation Average@{cfg.eval.n} (per seed) |\n|---:|---:|---|")
    for c in selection["candidates"]:
        scores = ", ".join(f"{v:.1%}" for v in c["average_at_n"]) or "failed"
        print(f"| {c['train']['lr']:g} | {c['train']['max_steps']} | {scores} |")
    chosen = selection["chosen"]
    print(f"\nchosen on {validation.name}: train.lr={chosen['lr']:g} train.max_steps={chosen['max_steps']}")
    print(f"selection: {out / 'selection.json'}")
    return 1 if result["failed_runs"] else 0


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the command line: same kernels on every CPU (tests call main(argv) in-process)
        cpu_kernels.reexec_pinned()  # a no-op once `flows.main` or the `__main__` check above has run
    return cli.main(argv, {"run": run, "serve": serve, "demo": demo, "select": select})


if __name__ == "__main__":
    raise SystemExit(main())
