"""`target-sft` command line: one subcommand per stage, each a thin call into the library."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pipeline import base_model, data
from pipeline.config import ConfigError, FoundationConfig, load_config
from pipeline.resolve import resolve_inputs

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


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

    base = commands.add_parser("base-model", help="build or evaluate the embedded base model")
    base_commands = base.add_subparsers(dest="action", required=True)
    _add_config_args(base_commands.add_parser("build", help="build it (idempotent)"), required=False)
    evaluate = base_commands.add_parser("eval", help="greedy held-out accuracy")
    _add_config_args(evaluate, required=False)
    evaluate.add_argument("--format", choices=["plain", "chat", "both"], default="both")

    data_cmd = commands.add_parser("data", help="dataset tools")
    data_commands = data_cmd.add_subparsers(dest="action", required=True)
    _add_config_args(data_commands.add_parser("inspect", help="counts, lengths, masks, fingerprint"), required=True)

    demo = commands.add_parser("demo", help="the main job on the embedded model (make demo)")
    _add_config_args(demo, required=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config_path = getattr(args, "config", None)
        if args.command == "demo" and config_path is None:
            config_path = DEMO_CONFIG
        cfg = load_config(FoundationConfig, config_path, args.overrides)
        if args.command == "base-model" and args.action == "build":
            out = base_model.build(cfg.base_model, cfg.storage_root)
            print(f"base model: {out.model}\nembedded data: {out.datasets}")
        elif args.command == "base-model":
            formats = ["plain", "chat"] if args.format == "both" else [args.format]
            print_base_eval(cfg, formats)
        elif args.command == "data":
            inspect_data(cfg)
        elif args.command == "demo":
            run_demo(cfg)
    except (ConfigError, data.DataError, RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def print_base_eval(cfg: FoundationConfig, formats: list[str]) -> list[dict]:
    out = base_model.build(cfg.base_model, cfg.storage_root)
    heldout = [json.loads(line) for line in out.sft_heldout.read_text().splitlines()]
    results = [base_model.evaluate(out.model, heldout, fmt) for fmt in formats]
    print(f"\nGreedy held-out accuracy of {out.model} ({len(heldout)} problems)")
    print("| format | accuracy | majority-answer baseline |\n|---|---:|---:|")
    for r in results:
        print(f"| {r['format']} | {r['accuracy']:.1%} | {r['majority_baseline']:.1%} |")
    example = results[0]["example"]
    print(f"\nexample prompt:\n{example['prompt']}\nmodel:{example['completion']}\n(expected {example['answer']})")
    return results


def inspect_data(cfg: FoundationConfig) -> None:
    from transformers import AutoTokenizer

    inputs = resolve_inputs(cfg)
    tokenizer = AutoTokenizer.from_pretrained(inputs.model_path)
    prepared = data.prepare(cfg.data, inputs.data_path, tokenizer)
    print(f"dataset: {inputs.data_path}\ntokenizer: {inputs.model_path}")
    for key, value in data.summary(prepared).items():
        print(f"  {key:>22}: {value}")
    for index, reason in prepared.skipped[:10]:
        print(f"  skipped row {index}: {reason}")
    print("\nexample 0 (completion tokens highlighted):")
    print(data.highlight(prepared.examples[0], tokenizer, color=sys.stdout.isatty()))


def run_demo(cfg: FoundationConfig) -> None:
    started = time.time()
    print("== 1/3 embedded base model (built once, then reused)")
    base_model.build(cfg.base_model, cfg.storage_root)
    print("== 2/3 SFT data")
    inspect_data(cfg)
    print("== 3/3 base-model evaluation")
    print_base_eval(cfg, ["plain", "chat"])
    print(f"\ndemo finished in {time.time() - started:.0f}s")


if __name__ == "__main__":
    raise SystemExit(main())
