"""`target-sft` command line: one subcommand per stage, each a thin call into the library.

The commands that run Prefect flows (`run`, `serve`, `demo`) are defined here but handled by
`flows.cli`, the installed `target-sft` entry point, so that this library never imports prefect.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipeline.common import storage
from pipeline.common.config import load_config
from pipeline.common.errors import CacheError, ConfigError, TargetSFTError
from pipeline.common.models import load_tokenizer
from pipeline.data import sources
from pipeline.entry import check, launch, prune, stages
from pipeline.entry.config import RunConfig
from pipeline.entry.resolve import resolve_inputs, tokens_dir
from pipeline.evaluation import evaluate
from pipeline.priors import interop, regimes
from pipeline.priors.cache import PriorStore, storage_error
from pipeline.world import builder

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def _add_config_args(parser: argparse.ArgumentParser, required: bool) -> None:
    if required:
        parser.add_argument("config", help="YAML run config (see configs/)")
    else:
        parser.add_argument("--config", default=None, help="YAML run config (default: built-in defaults)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set data.max_length=256 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="target-sft", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_world_commands(commands)
    _add_stage_commands(commands)
    _add_cache_commands(commands)
    _add_flow_commands(commands)
    return parser


def _add_world_commands(commands: Any) -> None:
    # `base-model`: the command's former name, still accepted
    world = commands.add_parser("world", aliases=["base-model"], help="build or evaluate the embedded world")
    world_commands = world.add_subparsers(dest="action", required=True)
    build = world_commands.add_parser("build", help="build it (idempotent)")
    _add_config_args(build, required=False)
    build.add_argument(
        "--from-scratch",
        action="store_true",
        help="pretrain even where the repository ships this build's weights, then compare with them",
    )
    build.add_argument("--ship", action="store_true", help="(maintainers) copy its weights to pipeline/world/shipped/")
    build.add_argument("--teacher", action="store_true", help="build the embedded teacher (world.teacher_*) instead")
    evaluate = world_commands.add_parser("eval", help="greedy held-out accuracy")
    _add_config_args(evaluate, required=False)
    evaluate.add_argument("--format", choices=["plain", "chat", "both"], default="both")


def _add_stage_commands(commands: Any) -> None:
    """The stages one at a time: data, priors (stage 1), train (stage 2), eval."""
    data_cmd = commands.add_parser("data", help="dataset tools")
    data_commands = data_cmd.add_subparsers(dest="action", required=True)
    _add_config_args(data_commands.add_parser("inspect", help="counts, lengths, masks, fingerprint"), required=True)

    train_cmd = commands.add_parser("train", help="stage 2: train toward a Q-target")
    _add_config_args(train_cmd, required=True)
    train_cmd.add_argument("--resume", action="store_true", help="continue the run from its last checkpoint")
    train_cmd.add_argument(
        "--nproc", type=int, default=None, help="processes (GPUs); launches torchrun (= train.processes)"
    )

    eval_cmd = commands.add_parser("eval", help="sample, verify and score held-out problems (Average@n, pass@n)")
    _add_config_args(eval_cmd, required=True)
    which = eval_cmd.add_mutually_exclusive_group()
    which.add_argument("--base", action="store_true", help="evaluate the untrained base model instead of the run")
    which.add_argument(
        "--prior-model", action="store_true", help="evaluate the model the priors come from (a teacher) instead"
    )

    priors_cmd = commands.add_parser("priors", help="stage 1: capture sparse top-k priors (cached)")
    _add_config_args(priors_cmd, required=True)


def _add_cache_commands(commands: Any) -> None:
    """The prior cache and the storage root: list, show, verify, remove, import, export, gc."""
    cache = commands.add_parser("cache", help="inspect the prior cache; prune the storage root")
    cache_commands = cache.add_subparsers(dest="action", required=True)
    _add_config_args(cache_commands.add_parser("ls", help="list prior sets"), required=False)
    gc_cmd = cache_commands.add_parser(
        "gc", help="remove temporaries, unreferenced tokenisation entries, unfinished runs (never prior sets)"
    )
    gc_cmd.add_argument("--dry-run", action="store_true", help="list what would go and the space it frees")
    gc_cmd.add_argument(
        "--min-age", type=float, default=24.0, metavar="HOURS", help="keep anything changed more recently (24)"
    )
    _add_config_args(gc_cmd, required=False)
    imp = cache_commands.add_parser(
        "import", help="read another tool's top-k logprobs (Axolotl KD, DistillKit) over the config's data rows"
    )
    imp.add_argument("source", help="the dataset: a file, a folder or a Hub snapshot, one row per data row")
    imp.add_argument(
        "--format",
        choices=["axolotl", "distillkit"],
        default="axolotl",
        help="axolotl: a KD chat_template dataset, one row per data row; distillkit: a folder of compressed shards",
    )
    imp.add_argument("--ids-field", default="target_token_ids", help="column of per-position top-k ids")
    imp.add_argument(
        "--logprobs-field",
        default=None,
        help="column of per-position top-k log-probs (default: logprobs or target_logprobs)",
    )
    imp.add_argument(
        "--normalized",
        action="store_true",
        help="axolotl: the values are log-probs renormalized over the top-k (Axolotl's strategy writes those)",
    )
    imp.add_argument(
        "--rows",
        choices=["t", "t-1"],
        default="t",
        help="axolotl: t = a row per token, the last padding; t-1 = no padding row (row i describes token i+1)",
    )
    _add_config_args(imp, required=False)
    exp = cache_commands.add_parser("export", help="write a prior set with its data rows as an Axolotl KD dataset")
    exp.add_argument("key")
    exp.add_argument("--out", required=True, help="a new folder; train.parquet appears there whole")
    exp.add_argument("--format", choices=["axolotl"], default="axolotl")
    _add_config_args(exp, required=False)
    for action, text in (
        ("show", "print a manifest"),
        ("verify", "re-check checksums and counts"),
        ("rm", "delete a set"),
    ):
        sub = cache_commands.add_parser(action, help=text)
        sub.add_argument("key")
        _add_config_args(sub, required=False)


def _add_flow_commands(commands: Any) -> None:
    """Whole experiments: check a config, select settings, run, serve on a schedule, the demo."""
    check = commands.add_parser("check", help="dry-run a config: grid, batch shapes, priors, eval (no model needed)")
    _add_config_args(check, required=True)

    select = commands.add_parser(
        "select", help="choose train.lr and train.max_steps by plain SFT on the validation split (select.*)"
    )
    _add_config_args(select, required=False)
    run = commands.add_parser("run", help="the experiment flow: priors once, train the grid, evaluate, compare")
    _add_config_args(run, required=True)
    serve = commands.add_parser("serve", help="serve the experiment flow as a scheduled Prefect deployment")
    _add_config_args(serve, required=True)
    serve.add_argument("--cron", default=None, help="cron schedule (default: experiment.schedule)")
    serve.add_argument("--name", default=None, help="deployment name (default: experiment.name)")
    demo = commands.add_parser("demo", help="the main job: the demo experiment on the embedded model (make demo)")
    _add_config_args(demo, required=False)


FlowCommand = Callable[[argparse.Namespace, "str | Path | None", RunConfig], int]


def main(argv: list[str] | None = None, flow_commands: dict[str, FlowCommand] | None = None) -> int:
    """Run one command; `flow_commands` handles `run`, `serve`, `demo` and `select` (see flows.cli).
    Returns the exit code: 2 and one line for an input error, 130 for Ctrl-C."""
    args = build_parser().parse_args(argv)
    if args.command == "base-model":
        print("note: `target-sft base-model` is now `target-sft world`", file=sys.stderr)
        args.command = "world"
    try:
        config_path = getattr(args, "config", None)
        if args.command in ("demo", "select") and config_path is None:
            config_path = DEMO_CONFIG
        cfg = load_config(RunConfig, config_path, args.overrides)
        if args.command in ("run", "serve", "demo", "select"):
            if not flow_commands:
                raise ConfigError(f"`{args.command}` runs a Prefect flow: use the `target-sft` command (flows.cli)")
            return flow_commands[args.command](args, config_path, cfg)
        return _run_command(args, config_path, cfg)
    except TargetSFTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished outputs and the last checkpoint are intact", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print(
            "error: the above is not an input error target-sft knows; if your config and data look right, "
            "please report it with this traceback",
            file=sys.stderr,
        )
        return 1


def _run_command(args: argparse.Namespace, config_path: str | Path | None, cfg: RunConfig) -> int:
    """One command that is not a flow; returns its exit code."""
    if args.command == "world":
        _world_command(args, cfg)
    elif args.command == "data":
        inspect_data(cfg)
    elif args.command == "train":
        if args.nproc is not None:
            if args.nproc < 1:
                raise ConfigError(f"--nproc {args.nproc}: give the number of processes (GPUs), at least 1")
            cfg.train.processes = args.nproc
        final = launch.train_or_launch(cfg, config_path, args.overrides, args.resume, progress=True)
        if os.environ.get("RANK", "0") == "0":  # once, not per torchrun process
            print(f"final model: {final}")
    elif args.command == "eval":
        report_path = stages.evaluate_run(cfg, base=args.base, prior=args.prior_model)
        report = json.loads(report_path.read_text())
        print(evaluate.markdown_report(report) + f"\nreport: {report_path}")
    elif args.command == "check":
        plan = check.dry_run(cfg)
        problems = check.check_inputs(cfg)
        if problems:
            raise ConfigError(f"{len(problems)} problem(s): " + "; ".join(problems))
        print(json.dumps(plan, indent=2))
    elif args.command == "priors":
        _priors_command(args, config_path, cfg)
    elif args.command == "cache" and args.action == "import":
        _import_command(args, cfg)
    elif args.command == "cache" and args.action == "export":
        with on_storage(cfg.storage_root):
            print(f"wrote {interop.export_axolotl(stages.capture_job(cfg), args.key, Path(args.out))}")
    elif args.command == "cache" and args.action == "gc":
        return gc_command(cfg.storage_root, args.dry_run, args.min_age)
    elif args.command == "cache":
        with on_storage(cfg.storage_root):
            return cache_command(args.action, getattr(args, "key", None), PriorStore(cfg.storage_root))
    return 0


def _world_command(args: argparse.Namespace, cfg: RunConfig) -> None:
    if args.action == "build" and args.teacher:
        teacher = builder.build_teacher(cfg.world, cfg.storage_root, from_scratch=args.from_scratch)
        print(f"teacher: {teacher}\n{describe_weights(teacher, builder.shipped_by_name(teacher.name))}")
        if args.ship:
            print(f"shipped: {builder.ship_teacher(teacher)}")
    elif args.action == "build":
        out = builder.build(cfg.world, cfg.storage_root, from_scratch=args.from_scratch)
        print(f"base model: {out.model}\nembedded data: {out.datasets}")
        print(compare_with_shipped(cfg, out))
        if args.ship:
            print(f"shipped: {builder.ship(cfg.world, out)}")
    else:
        print_base_eval(cfg, ["plain", "chat"] if args.format == "both" else [args.format])


def _priors_command(args: argparse.Namespace, config_path: str | Path | None, cfg: RunConfig) -> None:
    if cfg.priors.num_workers > 1:
        gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "all")
        print(f"prior worker {cfg.priors.worker_index} of {cfg.priors.num_workers}, CUDA_VISIBLE_DEVICES={gpu}")
    result = launch.capture_priors(cfg, config_path, args.overrides, progress=True)
    state = "complete" if result.complete else "this worker's shards done; others still missing"
    print(f"prior set {result.key}: {state}")
    print(f"manifest: {result.manifest_path}\nforward passes: {result.forward_passes}")
    if result.complete:
        profile = PriorStore(cfg.storage_root).gamma_profile(result.key)
        print(regimes.describe(profile, stages.prior_role(cfg)))


def _import_command(args: argparse.Namespace, cfg: RunConfig) -> None:
    with on_storage(cfg.storage_root):
        if args.format == "distillkit":
            imported = interop.import_distillkit(stages.capture_job(cfg), args.source)
        else:
            imported = interop.import_axolotl(
                stages.capture_job(cfg),
                args.source,
                args.ids_field,
                args.logprobs_field,
                normalized=args.normalized,
                rows=args.rows,
            )
    state = "reused (already imported)" if imported.reused else f"imported {imported.examples} examples"
    if imported.clamped:
        state += f"; {imported.clamped:,} log-probs above 0 stored as 0 (counted in the manifest)"
    print(f"prior set {imported.key}: {state}\nmanifest: {imported.manifest_path}")
    print(regimes.describe(PriorStore(cfg.storage_root).gamma_profile(imported.key), stages.prior_role(cfg)))
    print(f"train on it with --set train.prior_key={imported.key}")


@contextlib.contextmanager
def on_storage(root: str) -> Iterator[None]:
    """An object store's credentials, network or permissions failing inside the block: the one line
    `priors` gives for them (a local root's errors keep their traceback: they are not the user's)."""
    try:
        yield
    except TargetSFTError:
        raise
    except Exception as e:
        if not storage.is_remote(root):
            raise
        raise storage_error(root, e) from None


def compare_with_shipped(cfg: RunConfig, out: builder.WorldPaths) -> str:
    """One line: how this build's weights compare with the ones the repository ships for it."""
    return describe_weights(out.model, builder.shipped_weights(cfg.world))


def describe_weights(model: Path, shipped: tuple[Path, dict] | None) -> str:
    """One line: how a built model's weights compare with the shipped ones, if any."""
    info = json.loads((model / builder.SUCCESS).read_text())
    if shipped is None:
        return f"weights {info['weights_sha256'][:16]}… from {info.get('weights_from', 'pretraining')} (none shipped)"
    same = shipped[1]["weights_sha256"] == info["weights_sha256"]
    return (
        f"weights {info['weights_sha256'][:16]}… from {info.get('weights_from', 'pretraining')}: "
        f"{'identical to' if same else 'DIFFERENT from'} the shipped {shipped[0].name}"
        + ("" if same else " (another CPU arithmetic: see docs/design.md §7)")
    )


def print_base_eval(cfg: RunConfig, formats: list[str]) -> list[dict]:
    """Greedy accuracy of the embedded base model on its held-out sets (the SFT skill, then the old one)."""
    out = builder.build(cfg.world, cfg.storage_root)
    sets = [("held-out (SFT skill)", out.sft_heldout), ("forgetting (old skill)", out.forgetting)]
    print(f"\nGreedy accuracy of {out.model}")
    print("| set | problems | format | accuracy | majority-answer baseline |\n|---|---:|---|---:|---:|")
    results = []
    for name, path in sets:
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        for fmt in formats if rows else []:
            r = builder.evaluate(out.model, rows, fmt)
            print(f"| {name} | {r['n']} | {fmt} | {r['accuracy']:.1%} | {r['majority_baseline']:.1%} |")
            results.append(r)
    example = results[0]["example"]
    print(f"\nexample prompt:\n{example['prompt']}\nmodel:{example['completion']}\n(expected {example['answer']})")
    return results


def inspect_data(cfg: RunConfig) -> None:
    inputs = resolve_inputs(cfg)
    tokenizer = load_tokenizer(inputs.model_path, cfg.model.trust_remote_code)
    prepared = sources.prepare(cfg.data, inputs.data_path, tokenizer, tokens_dir(cfg))
    print(f"dataset: {inputs.data_path}\ntokenizer: {inputs.model_path}")
    for key, value in sources.summary(prepared).items():
        print(f"  {key:>22}: {value}")
    for index, reason in prepared.skipped[:10]:
        print(f"  skipped row {index}: {reason}")
    print("\nexample 0 (completion tokens highlighted):")
    print(sources.highlight(prepared.examples[0], tokenizer, color=sys.stdout.isatty()))


def gc_command(storage_root: str, dry_run: bool, min_age_hours: float) -> int:
    """`cache gc`: the rules are pipeline/entry/prune.py's; a dry run first is the habit to keep."""
    if storage.is_remote(storage_root):
        raise ConfigError(
            f"cache gc works on a folder (it takes the runs' file locks); {storage_root} is an object store: "
            "prune it with `cache rm KEY` per prior set"
        )
    if not math.isfinite(min_age_hours) or min_age_hours < 0:
        raise ConfigError(f"--min-age {min_age_hours}: give hours, 0 or more")
    root = Path(storage_root)
    dead = prune.find(root, min_age_hours * 3600)
    if dry_run:
        print(prune.report(dead, root, removed=False))
        return 0
    removed, failed = prune.collect(dead)
    print(prune.report(removed, root, removed=True, failed=failed))
    return 1 if failed else 0


def cache_command(action: str, key: str | None, store: PriorStore) -> int:
    if action == "ls":
        print("| key | complete | examples | scored tokens | engine | B/token |\n|---|---|---:|---:|---|---:|")
        for k in store.list_keys():
            if store.complete(k):
                try:
                    m = store.manifest(k)
                except CacheError as e:  # one broken set must not hide the others
                    print(f"| {k} | corrupted: {e} | | | | |")
                    continue
                print(
                    f"| {k} | yes | {m['counts']['examples']} | {m['counts']['scored_tokens']} | {m['engine']} | "
                    f"{m['statistics'].get('bytes_per_scored_token', float('nan')):.1f} |"
                )
            else:
                print(f"| {k} | no ({len(store.done_shards(k))} shards so far) | | | | |")
        return 0
    assert key is not None
    if action == "show":
        profile = store.gamma_profile(key)  # computed (and recorded) here for sets captured before profiles
        print(json.dumps(store.manifest(key), indent=2))
        print(regimes.describe(profile))
    elif action == "verify":
        problems = store.verify(key)
        print("ok" if not problems else "\n".join(problems))
        return 0 if not problems else 1
    elif action == "rm":
        store.remove(key)
        print(f"removed prior set {key}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
