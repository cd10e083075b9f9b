"""The experiment: grid expansion, and the Prefect flow end to end on a tiny embedded model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.common import cpu_kernels
from pipeline.common.config import load_config
from pipeline.common.errors import ConfigError
from pipeline.core.targets import TargetError
from pipeline.entry import stages
from pipeline.entry.config import RunConfig
from pipeline.evaluation.config import EvalSetConfig
from pipeline.experiments import experiment
from pipeline.experiments.config import ExperimentConfig
from pipeline.training.config import TargetConfig
from tests.conftest import tiny_args


def test_grid_expands_lists_and_seeds_with_readable_names():
    exp = ExperimentConfig(
        name="sweep",
        targets=["sft", {"preset": "target_sft", "eta": [0.25, 0.75]}, {"preset": "dft", "train": {"lr": 1e-4}}],
        seeds=[0, 1],
    )
    runs = experiment.expand_grid(exp)
    assert [r.run_name for r in runs] == [
        "sweep-sft-s0",
        "sweep-sft-s1",
        "sweep-target_sft-eta0.25-s0",
        "sweep-target_sft-eta0.25-s1",
        "sweep-target_sft-eta0.75-s0",
        "sweep-target_sft-eta0.75-s1",
        "sweep-dft-lr0.0001-s0",
        "sweep-dft-lr0.0001-s1",
    ]
    assert runs[2].label == "target_sft(eta=0.25)" and runs[2].target == TargetConfig(preset="target_sft", eta=0.25)
    assert runs[-1].label == "dft[lr=0.0001]"
    assert "train.lr=0.0001" in runs[-1].overrides() and "train.seed=1" in runs[-1].overrides()
    assert 'train.target={"preset": "target_sft", "eta": 0.25}' in runs[2].overrides()


@pytest.mark.parametrize(
    "targets,seeds,message",
    [
        (["sft", "sft"], [0], "names 'sft' twice"),
        (["nope"], [0], "unknown"),
        ([{"preset": "target_sft", "eta": 2.0}], [0], "eta"),
        (["sft"], [], "seeds is empty"),
        ([{"preset": "sft", "train": 3}], [0], "must be a mapping"),
    ],
)
def test_bad_grids_fail_before_anything_runs(targets, seeds, message):
    with pytest.raises(TargetError, match=message):
        experiment.expand_grid(ExperimentConfig(targets=targets, seeds=seeds))


def _overrides(build, storage, name, targets, seeds, evaluate_base):
    eval_set = json.dumps([{"name": "arith", "path": str(build.sft_heldout), "answer_type": "numeric"}])
    return tiny_args(
        build,
        storage,
        "train.batch_size=4",
        "train.micro_batch_size=2",
        "train.max_steps=3",
        "train.eval_every=0",
        "eval.engine=hf",
        "eval.n=2",
        "eval.limit=6",
        "eval.max_new_tokens=24",
        f"eval.sets={eval_set}",
        f"experiment.name={name}",
        f"experiment.targets={json.dumps(targets)}",
        f"experiment.seeds={json.dumps(seeds)}",
        f"experiment.evaluate_base={json.dumps(evaluate_base)}",
    )


def test_experiment_flow_end_to_end_then_zero_prior_passes(prefect_server, tiny_build, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.experiment import experiment_flow

    diverging = {"preset": "dft", "train": {"lr": 1.0e12}}
    targets = ["sft", {"preset": "target_sft", "eta": 0.5}, diverging]
    overrides = [*_overrides(tiny_build, tmp_path, "e1", targets, [0, 1], True), "experiment.compare_to=sft"]
    first = experiment_flow(None, overrides)
    assert first["prior"]["forward_passes"] > 0
    assert sorted(first["failed_runs"]) == ["e1-dft-lr1000000000000.0-s0", "e1-dft-lr1000000000000.0-s1"]
    summary = json.loads((tmp_path / "experiments" / "e1" / "summary.json").read_text())
    ok = [r for r in summary["runs"] if r["status"] == "ok"]
    assert len(ok) == 4 and all(r["eval"]["arith"]["problems"] == 6 and len(r["loss_curve"]) == 3 for r in ok)
    failed = [r for r in summary["runs"] if r["status"] == "failed"]
    assert all("diverged" in r["error"] for r in failed)
    assert summary["base"]["arith"]["problems"] == 6
    table = (tmp_path / "experiments" / "e1" / "comparison.md").read_text()
    diverged = "e1-dft-lr1000000000000.0-s0"
    assert f"| {diverged} | 0 | failed: DivergedError: run {diverged} diverged" in table
    assert "| target_sft(eta=0.5) | 2 |" in table and "| base model (untrained) |" in table
    # the interval over problems and seeds, and the paired difference to sft with the seeds won
    pct, pts = r"\d+\.\d%", r"[+-]\d+\.\d"
    row = rf"\| target_sft\(eta=0.5\) \| 2 \| {pct} \[{pct}, {pct}\] \|.*\| {pts} pt \[{pts}, {pts}\] \| [012]/2 \|"
    assert re.search(row, table), table
    assert all(len(r["scores"]["arith"]) == 6 for r in ok)  # per-problem Average@n, for the bootstrap
    assert (tmp_path / "experiments" / "e1" / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "experiments" / "e1" / "figure.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "runs" / "e1-sft-s1" / "eval" / "report.json").exists()
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["experiment-e1"])))
    assert artifacts and "e1-target_sft-eta0.5-s1" in str(artifacts[0].data)
    # the arithmetic every number came from (docs/design.md §7): run.json, the table, the artifact
    arithmetic = json.loads((tmp_path / "runs" / "e1-sft-s0" / "run.json").read_text())["arithmetic"]
    assert arithmetic == cpu_kernels.arithmetic() and arithmetic["kernels"] == "pinned"
    assert set(arithmetic) == {"cpu", "cpu_kind", "aten_isa", "kernels", "torch", "mkl"}
    line = f"Arithmetic: {cpu_kernels.describe(arithmetic)}."
    assert line in table and line in str(artifacts[0].data)
    assert "pinned kernels" in line and cpu_kernels.cpu_kind() in line

    # A new experiment over new targets on the same data and model: no prior forward pass at all.
    second = experiment_flow(
        None, _overrides(tiny_build, tmp_path, "e2", [{"preset": "target_sft", "eta": 0.25}], [0], False)
    )
    assert second["prior"] == {**second["prior"], "key": first["prior"]["key"], "forward_passes": 0}
    assert second["failed_runs"] == []
    table = (tmp_path / "experiments" / "e2" / "comparison.md").read_text()
    assert "reused from the cache (0 prior forward passes)" in table

    # The same experiment again: its runs are finished, so nothing is trained or evaluated again.
    run = tmp_path / "runs" / "e2-target_sft-eta0.25-s0"
    stamps = {p: p.stat().st_mtime_ns for p in (run / "final" / "model.safetensors", run / "eval" / "samples.jsonl")}
    again = experiment_flow(
        None, _overrides(tiny_build, tmp_path, "e2", [{"preset": "target_sft", "eta": 0.25}], [0], False)
    )
    assert again["failed_runs"] == [] and {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_a_teacher_experiment_shows_both_gamma_profiles_and_the_papers_kind_of_figure(
    prefect_server, tiny_build, tmp_path
):
    """experiment.student_profile: priors from a teacher, and the student's own set for its γ profile;
    figure.png: one marker per method and setting with intervals (issue 31 §4)."""
    from flows.experiment import experiment_flow
    from tests.conftest import wide_teacher

    teacher = wide_teacher(tiny_build.model, tmp_path / "teacher", extra=8)
    overrides = [
        *_overrides(tiny_build, tmp_path, "e3", ["dft", "kd"], [0, 1], True),
        f"priors.model_path={teacher}",
        "experiment.student_profile=true",
    ]
    result = experiment_flow(None, overrides)
    assert result["failed_runs"] == [] and result["prior"]["prior_role"] == "teacher"
    student = result["prior"]["student"]
    assert student["prior_role"] == "model" and student["key"] != result["prior"]["key"]
    table = (tmp_path / "experiments" / "e3" / "comparison.md").read_text()
    assert f"The student's own prior set `{student['key']}`" in table
    assert "under a teacher, not the model being trained" in table and "under the model being trained" in table
    assert Path(result["figure"]).read_bytes()[:4] == b"\x89PNG"


def test_choose_takes_the_best_mean_and_breaks_ties_toward_less():
    def run(lr, steps, seed, score):
        train = {"lr": lr, "max_steps": steps}
        label = f"sft[lr={lr}, max_steps={steps}]"
        return {"label": label, "seed": seed, "status": "ok", "train": train, "eval": {"v": {"average_at_n": score}}}

    runs = [run(1e-3, 80, 0, 0.5), run(1e-3, 80, 1, 0.7), run(3e-3, 80, 0, 0.6), run(3e-3, 80, 1, 0.6)]
    runs += [run(1e-3, 160, 0, 0.6), run(1e-3, 160, 1, 0.6)]  # the same mean, more steps: not chosen
    choice = experiment.choose(runs, "v")
    assert choice["chosen"] == {"lr": 1e-3, "max_steps": 80}
    assert [c["average_at_n"] for c in choice["candidates"]] == [[0.5, 0.7], [0.6, 0.6], [0.6, 0.6]]


def test_select_never_reads_the_held_out_problems(prefect_server, tmp_path):
    """`target-sft select` on an embedded world whose held-out and forgetting files are gone: it trains
    plain SFT at every (lr, steps), scores the validation split only, and writes its choice."""
    import dataclasses

    from flows import cli
    from pipeline.common.config import to_dict
    from pipeline.world import builder
    from tests.conftest import TINY

    world = dataclasses.replace(TINY, name="tiny-select")
    build = builder.build(world, tmp_path, progress=False)
    build.sft_heldout.unlink()
    build.forgetting.unlink()
    overrides = [
        f"storage_root={tmp_path}",
        f"world={json.dumps(to_dict(world))}",
        "data.max_length=128",
        "train={batch_size: 4, micro_batch_size: 4, eval_every: 1, eval_examples: 4, checkpoint_every: 2}",
        "eval={n: 1, max_new_tokens: 24}",
        "select={lrs: [0.001, 0.01], max_steps: [2]}",
        "experiment.name=sel",
        "priors.embedded_teacher=false",  # the demo's teacher belongs to its own world, not this one
        "experiment.student_profile=false",
        "eval.forgetting=true",
    ]
    assert cli.main(["select", *(arg for item in overrides for arg in ("--set", item))]) == 0
    selection = json.loads((tmp_path / "experiments" / "sel-select" / "selection.json").read_text())
    assert selection["set"] == "arith-validation" and len(selection["candidates"]) == 2
    assert selection["chosen"] in [c["train"] for c in selection["candidates"]]
    for run in ("sel-select-sft-lr0.001-max_steps2-s0", "sel-select-sft-lr0.01-max_steps2-s0"):
        report = json.loads((tmp_path / "runs" / run / "eval" / "report.json").read_text())
        assert list(report["sets"]) == ["arith-validation"]
        info = json.loads((tmp_path / "runs" / run / "run.json").read_text())
        assert info["config"]["data"]["eval_path"] == str(build.validation)  # the eval loss too
    assert not build.sft_heldout.exists() and not build.forgetting.exists()


def test_selection_of_an_objectives_own_lr_trains_that_objective_under_its_own_name():
    """`select.target`: the second lr protocol of issue 22 (each objective at its own validated lr)."""
    shared = load_config(RunConfig, None, ["experiment.name=w"])
    own = load_config(RunConfig, None, ["experiment.name=w", "select.target={preset: target_sft, eta: 0.5}"])
    validation = EvalSetConfig(name="val", path="val.jsonl")
    for cfg, name, preset in ((shared, "w-select", "sft"), (own, "w-select-target_sft-eta0.5", "target_sft")):
        overrides = stages.selection_overrides(cfg, validation)
        assert f"experiment.name={name}" in overrides
        grid = load_config(RunConfig, None, overrides).experiment
        runs = experiment.expand_grid(grid)
        assert {r.target.preset for r in runs} == {preset} and len(runs) == 6
    with pytest.raises(ConfigError, match=r"select\.target: .*unknown target preset 'nope'"):
        load_config(RunConfig, None, ["select.target=nope"])


def test_runs_of_different_arithmetic_are_marked_not_comparable():
    amd = {
        "cpu": "AMD EPYC",
        "cpu_kind": "AuthenticAMD/avx2",
        "aten_isa": "AVX2",
        "kernels": "pinned",
        "torch": "2.13.0+cpu",
        "mkl": "2024.2",
    }
    intel = {**amd, "cpu": "Intel Xeon", "cpu_kind": "GenuineIntel/avx512"}
    assert (
        experiment.arithmetic_line([{"arithmetic": amd}, {"arithmetic": amd}])
        == f"Arithmetic: {cpu_kernels.describe(amd)}."
    )
    mixed = experiment.arithmetic_line([{"arithmetic": amd}, {"arithmetic": intel}])
    assert mixed.startswith("Arithmetic: MIXED, not comparable digit for digit: AMD EPYC") and "Intel Xeon" in mixed
    assert "not recorded by the runs" in experiment.arithmetic_line([{"arithmetic": None}])
