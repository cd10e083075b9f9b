"""The `target-sft` command line and the library's import boundary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.common import cpu_kernels
from pipeline.entry import cli

from .conftest import REPO, TINY


def tiny_overrides(storage: Path) -> list[str]:
    fields = (
        "name",
        "pretrain_problems",
        "sft_train_problems",
        "heldout_problems",
        "hidden_size",
        "num_heads",
        "num_layers",
        "intermediate_size",
        "seq_len",
        "batch_size",
        "steps",
        "warmup_steps",
    )
    return [f"--set=storage_root={storage}"] + [f"--set=world.{f}={getattr(TINY, f)}" for f in fields]


def test_data_inspect_prints_counts_example_and_fingerprint(tmp_path, capsys):
    assert (
        cli.main(["data", "inspect", str(REPO / "configs" / "worlds" / "model-strong.yaml"), *tiny_overrides(tmp_path)])
        == 0
    )
    out = capsys.readouterr().out
    for needle in ("examples", "completion_tokens", "prompt_tokens", "fingerprint", "⟦", "####"):
        assert needle in out, needle


def test_world_eval_reports_accuracy_and_baseline(tmp_path, capsys, monkeypatch):
    from pipeline.common import config

    monkeypatch.setattr(config, "_NOTED", set())  # each note is said once per process
    assert cli.main(["world", "eval", "--format", "plain", *tiny_overrides(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "majority-answer baseline" in out
    assert "| held-out (SFT skill) | " in out and "| forgetting (old skill) | " in out and "| plain |" in out
    # the command's former name and the section's (`base-model`, `base_model`) still work, each with a note
    old_names = [a.replace("--set=world.", "--set=base_model.") for a in tiny_overrides(tmp_path)]
    assert cli.main(["base-model", "eval", "--format", "plain", *old_names]) == 0
    captured = capsys.readouterr()
    assert captured.out == out
    notes = [line for line in captured.err.splitlines() if line.startswith("note:")]  # not the progress bars
    assert notes[0] == "note: `target-sft base-model` is now `target-sft world`"
    assert len(notes) == 1 + len(old_names) - 1 and all("it is now called 'world'" in n for n in notes[1:])


def test_bad_config_is_an_error_not_a_traceback(tiny_build, tmp_path, capsys):
    assert (
        cli.main(
            ["data", "inspect", str(REPO / "configs" / "worlds" / "model-strong.yaml"), "--set", "data.max_lenght=3"]
        )
        == 2
    )
    assert "unknown config key 'max_lenght'" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Q", "completion": "A"}) + "\n" + json.dumps({"prompt": "Q"}) + "\n")
    code = cli.main(
        [
            "data",
            "inspect",
            str(REPO / "configs" / "worlds" / "model-strong.yaml"),
            f"--set=data.path={bad}",
            *tiny_overrides(tmp_path),
            f"--set=model.path={tiny_build.model}",
        ]
    )
    assert code == 2
    assert "row 1: missing field 'completion'" in capsys.readouterr().err


def test_pipeline_never_imports_prefect():
    paths = sorted(p for p in (REPO / "pipeline").rglob("*.py") if p.stem != "__init__")
    modules = [".".join(p.relative_to(REPO).with_suffix("").parts) for p in paths]
    assert len(modules) > 40  # every subpackage's modules, not an empty glob
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "assert not any(k == 'prefect' or k.startswith('prefect.') for k in sys.modules), 'prefect imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    for path in paths:
        assert "import prefect" not in path.read_text() and "from prefect" not in path.read_text(), path


REEXEC_PROBE = """
import os, runpy, sys
def execve(*args):  # where the command re-executes itself: has it loaded torch already?
    print("torch loaded before re-exec:", "torch" in sys.modules)
    sys.exit(0)
os.execve = execve
sys.argv = ["target-sft", "--help"]
if sys.argv[-1] == "module": runpy.run_module("flows.cli", run_name="__main__")
import flows
flows.main()
"""


@pytest.mark.parametrize("how", ["command", "module"])
def test_the_command_reexecutes_with_pinned_kernels_before_loading_torch(how):
    """Without the pinning variables, `target-sft` and `python -m flows.cli` re-execute themselves:
    before torch and the library load (once ~15 s of imports were paid twice)."""
    env = {k: v for k, v in os.environ.items() if k not in (*cpu_kernels.PINNED, cpu_kernels.MODE)}
    probe = REEXEC_PROBE.replace('sys.argv[-1] == "module"', repr(how == "module"))
    done = subprocess.run([sys.executable, "-c", probe], env=env, cwd=REPO, capture_output=True, text=True)
    assert done.stdout.strip() == "torch loaded before re-exec: False", done.stdout + done.stderr[-2000:]


def test_a_model_path_without_a_data_path_is_one_line_not_the_embedded_data(tiny_build, tmp_path, capsys):
    """The embedded world is used only when both paths are unset: a user's model must never train on
    the embedded arithmetic set because data.path was forgotten (and the same the other way round)."""
    config = str(REPO / "configs" / "worlds" / "model-strong.yaml")
    for given, missing in (
        (f"model.path={tiny_build.model}", "data.path"),
        (f"data.path={tiny_build.sft_train}", "model.path"),
    ):
        for command in (["train", config], ["check", config]):
            code = cli.main([*command, f"--set=storage_root={tmp_path}", f"--set={given}"])
            err = capsys.readouterr().err
            lines = [line for line in err.splitlines() if line.strip()]
            assert code == 2 and f"but {missing} is not" in err and len(lines) == 1, (command, err)
    assert not [p for p in tmp_path.rglob("*") if p.is_dir() and p.name != "runs"]  # no run, no world built
