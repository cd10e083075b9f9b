"""configs/paper/: every paper setting resolves and passes the dry run, with no model or data needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.common.config import load_config, to_dict
from pipeline.common.errors import ConfigError, TargetError
from pipeline.entry import check, stages
from pipeline.entry.config import RunConfig
from pipeline.experiments import experiment
from pipeline.world import builder

PAPER = Path(__file__).resolve().parent.parent / "configs" / "paper"
MATH_MODELS = ["qwen3-1.7b", "qwen2.5-math-1.5b", "qwen2.5-math-7b"]
SETTINGS = [f"{d}-{m}" for d in ("numina", "openr1") for m in MATH_MODELS] + [
    f"m23k-{m}" for m in ("llama-3.2-3b", "llama-3.1-8b", "qwen2.5-1.5b", "qwen2.5-7b")
]


def test_one_recipe_per_paper_setting():
    assert sorted(p.stem for p in PAPER.glob("*.yaml")) == sorted(SETTINGS)


@pytest.mark.parametrize("setting", SETTINGS)
def test_recipe_dry_run(setting):
    cfg = load_config(RunConfig, PAPER / f"{setting}.yaml")
    plan = check.dry_run(cfg)
    tc = cfg.train
    assert (tc.lr, tc.batch_size, tc.epochs, tc.precision) == (5e-5, 256, 1, "bf16")
    assert cfg.data.max_length == (800 if setting.startswith("m23k") else 3072)
    assert cfg.priors.engine == "vllm" and cfg.eval.engine == "vllm" and cfg.eval.n == 16
    # the papers' harness: Qwen2.5-Math's evaluation at N_SAMPLING=16, TEMPERATURE=1, top_p 1 (issue 22)
    assert (cfg.eval.temperature, cfg.eval.top_p) == (1.0, 1.0)
    if not setting.startswith("m23k"):
        assert [s.name for s in cfg.eval.sets] == ["math500", "aime24", "amc23", "minerva", "olympiadbench"]
    assert all(s.answer_type == ("choice" if setting.startswith("m23k") else "math") for s in cfg.eval.sets)
    big = setting.endswith(("-7b", "-8b"))
    assert (tc.parallel, tc.processes) == (("fsdp", 8) if big else ("ddp", 1))
    assert plan["accumulation_steps"] * tc.micro_batch_size * tc.processes == 256
    assert plan["priors"]["needed"] and {r["target"] for r in plan["runs"]} >= {"sft", "dft", "target_sft(eta=0.5)"}
    assert cfg.eval.max_new_tokens < cfg.eval.max_model_len


WORLDS = Path(__file__).resolve().parent.parent / "configs" / "worlds"


@pytest.mark.parametrize("regime", ["new-format", "clean-data", "teacher", "rare-phrasing"])
def test_regime_dry_run(regime):
    """configs/worlds/: each earlier world differs from the model-weak world (the demo it was written
    beside) only where its comment says."""
    cfg = load_config(RunConfig, WORLDS / f"{regime}.yaml")
    demo = load_config(RunConfig, WORLDS / "model-weak.yaml")
    assert check.dry_run(cfg)["runs"] and cfg.experiment.name == f"regime-{regime}"
    assert (cfg.eval.n, cfg.eval.max_new_tokens, cfg.train.batch_size) == (demo.eval.n, 128, 16) == (2, 128, 16)
    if regime == "new-format":
        bm = cfg.world
        assert (bm.chat_share, bm.new_op_share, bm.sft_new_op, bm.sft_style) == (0.0, 0.0, False, "base")
    else:
        assert (cfg.train.lr, cfg.train.max_steps) == (demo.train.lr, demo.train.max_steps)
        assert cfg.priors.embedded_teacher == (regime == "teacher")
        assert cfg.world.sft_noise_fraction == (0.0 if regime == "clean-data" else 0.3)
        assert cfg.world.own_style_share == (0.02 if regime == "rare-phrasing" else 0.0)


@pytest.mark.parametrize(
    "overrides,error,message",
    [
        (["train.micro_batch_size=7"], ConfigError, "not a multiple of micro_batch_size × processes"),
        (["eval.sets=[]"], ConfigError, "list eval.sets"),
        (["eval.max_new_tokens=5000"], ConfigError, "leaves no room for the prompt"),
        (["experiment.targets=[{preset: target_sft, eta: 1.5}]"], TargetError, "eta"),
    ],
)
def test_dry_run_rejects_impossible_recipes(overrides, error, message):
    cfg = load_config(RunConfig, PAPER / "numina-qwen3-1.7b.yaml", overrides)
    with pytest.raises(error, match=message):
        check.dry_run(cfg)


# --- every recipe, shrunk, through priors, train and eval on CPU -----------------------------------------


def _rows(fmt: str, columns: dict[str, str]) -> list[dict]:
    """SFT rows in the recipe's own format and column names."""
    rows = []
    for i in range(8):
        question, answer = f"What is {i} plus 1?", f"The answer is {i + 1}. #### {i + 1}"
        canonical = {
            "messages": {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]},
            "prompt_completion": {"prompt": question, "completion": answer},
            "question_answer": {"question": question, "answer": answer},
        }[fmt]
        rows.append({columns.get(k, k): v for k, v in canonical.items()} | {"source": "fixture"})
    return rows


def _eval_rows(s, n: int = 4) -> list[dict]:
    """Problems with exactly the columns the recipe's eval set reads (its template's included)."""
    from pipeline.evaluation.evaluate import PLACEHOLDER

    rows = []
    for i in range(n):
        row = {
            s.question_column: f"What is {i} plus 1?",
            s.answer_column: "A" if s.answer_type == "choice" else str(i + 1),
        }
        for name in PLACEHOLDER.findall(s.prompt_template):
            if name not in ("question", s.question_column):
                row[name] = {"A": str(i + 1), "B": str(i + 2)} if name == "options" else f"option {name}"
        rows.append(row)
    return rows


@pytest.mark.parametrize("setting", SETTINGS)
def test_recipe_runs_shrunk_through_priors_train_and_eval(setting, tiny_build, llama3_style, qwen3_style, tmp_path):
    """The recipe as shipped, with its model and data swapped for local fixtures of the same family
    (Llama-3-style and Qwen3-style tokenizers and templates; the embedded one for Qwen2.5) and only
    sizes overridden."""
    import json

    from tests.conftest import hub_snapshot, write_jsonl

    shipped = load_config(RunConfig, PAPER / f"{setting}.yaml")
    data_path = hub_snapshot(tmp_path / "sft", _rows(shipped.data.format, shipped.data.columns))
    sets = []
    for s in shipped.eval.sets:
        path = write_jsonl(tmp_path / f"{s.name}.jsonl", _eval_rows(s))
        sets.append({**{k: getattr(s, k) for k in ("name", "question_column", "answer_column", "answer_type",
                                                     "prompt_template")}, "path": str(path)})  # fmt: skip
    model = llama3_style if "llama" in setting else qwen3_style if "qwen3" in setting else tiny_build.model
    overrides = [
        f"storage_root={tmp_path / 'storage'}",
        f"model.path={model}",
        f"data.path={data_path}",
        f"eval.sets={json.dumps(sets)}",
        "data.max_length=128",
        "priors.engine=hf",
        "priors.dtype=float32",
        "priors.k=8",
        f"priors.model_path={model}",  # the recipe's teacher, laid out as its own family (here: the model)
        "priors.tensor_parallel_size=1",
        "train.batch_size=4",
        "train.micro_batch_size=2",
        "train.epochs=null",
        "train.max_steps=2",
        "train.processes=1",
        "train.parallel=ddp",
        "train.precision=fp32",
        "train.threads=1",
        "eval.engine=hf",
        "eval.dtype=float32",
        "eval.n=2",
        "eval.limit=4",
        "eval.max_new_tokens=8",
        "eval.max_model_len=256",
    ]
    cfg = load_config(RunConfig, PAPER / f"{setting}.yaml", overrides)
    assert (
        cfg.train.target == shipped.train.target
        and cfg.eval.sets[0].prompt_template == shipped.eval.sets[0].prompt_template
    )
    captured = stages.capture_priors(cfg, progress=False)
    final = stages.train(cfg, progress=False)
    report = json.loads(stages.evaluate_run(cfg, progress=False).read_text())
    assert captured.complete and (final / "config.json").exists()
    assert report["overall"]["problems"] == 4 * len(shipped.eval.sets)


@pytest.mark.parametrize("setting", SETTINGS)
def test_every_recipe_names_a_teacher_and_runs_distill(setting):
    """The paper's five rows: SFT, DFT, Distill (both forms) and Target-SFT, with a teacher that is not
    the student (the paper does not publish its teachers: each recipe names the larger sibling)."""
    cfg = load_config(RunConfig, PAPER / f"{setting}.yaml")
    assert cfg.priors.model_path and cfg.priors.model_path != cfg.model.path
    text = (PAPER / f"{setting}.yaml").read_text()
    assert "does not publish its choice" in text
    labels = {r.label for r in experiment.expand_grid(cfg.experiment)}
    assert {"sft", "dft", "kd", "hybrid_kd(lam=0.5)"} <= labels and any(x.startswith("target_sft") for x in labels)
    if any(size in cfg.priors.model_path for size in ("70B", "72B")):
        assert cfg.priors.tensor_parallel_size > 1


def test_check_names_every_missing_path_of_a_shipped_recipe(tmp_path, capsys):
    """`target-sft check` on a recipe as shipped: its model, data and eval files are not on this machine."""
    from pipeline.entry import cli

    recipe = PAPER / "numina-qwen2.5-math-1.5b.yaml"
    assert cli.main(["check", str(recipe), f"--set=storage_root={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    cfg = load_config(RunConfig, recipe)
    for path in [cfg.model.path, cfg.data.path, *(s.path for s in cfg.eval.sets)]:
        assert str(path) in err, path


@pytest.mark.parametrize("family", ["llama3", "qwen3"])
def test_check_passes_on_the_fixture_families(family, llama3_style, qwen3_style, tmp_path, capsys):
    import json

    from pipeline.entry import cli
    from tests.conftest import hub_snapshot, wide_teacher, write_jsonl

    setting = "m23k-llama-3.2-3b" if family == "llama3" else "numina-qwen3-1.7b"
    shipped = load_config(RunConfig, PAPER / f"{setting}.yaml")
    data_path = hub_snapshot(tmp_path / "sft", _rows(shipped.data.format, shipped.data.columns))
    sets = [{**{k: getattr(s, k) for k in ("name", "question_column", "answer_column", "answer_type",
                                            "prompt_template")}, "path": str(write_jsonl(tmp_path / f"{s.name}.jsonl",
                                                                                         _eval_rows(s)))}
            for s in shipped.eval.sets]  # fmt: skip
    model = llama3_style if family == "llama3" else qwen3_style
    teacher = wide_teacher(model, tmp_path / "teacher", extra=32)  # more rows, as the paper's larger siblings have
    overrides = [f"storage_root={tmp_path / 'storage'}", f"model.path={model}", f"data.path={data_path}",
                 f"priors.model_path={teacher}",
                 f"eval.sets={json.dumps(sets)}", "train.parallel=ddp", "train.processes=1"]  # fmt: skip
    code = cli.main(["check", str(PAPER / f"{setting}.yaml"), *(f"--set={o}" for o in overrides)])
    assert code == 0, capsys.readouterr().err


@pytest.mark.parametrize("world", ["model-weak", "model-intermediate", "model-strong"])
def test_the_continuum_worlds_share_one_protocol_and_the_demo_is_the_strong_one(world):
    """The three registered worlds: the same grid, seeds, sets and sampling (the papers' harness)."""
    cfg = load_config(RunConfig, WORLDS / f"{world}.yaml")
    assert check.dry_run(cfg)["runs"] and cfg.experiment.name == world
    assert (cfg.eval.n, cfg.eval.temperature, cfg.eval.top_p, cfg.experiment.seeds) == (2, 1.0, 1.0, [0, 1, 2])
    assert cfg.experiment.targets[:3] == ["sft", "dft", {"preset": "target_sft", "eta": 0.5}]
    demo = load_config(RunConfig, PAPER.parent / "demo.yaml")
    if world == "model-strong":  # `make demo` runs this world with its registered teacher: the same base
        teacher = load_config(RunConfig, WORLDS / "model-strong-teacher.yaml")
        assert builder.build_hash(demo.world) == builder.build_hash(cfg.world)
        assert to_dict(demo.world) == to_dict(teacher.world)
        assert demo.eval.forgetting is False  # the old skill's 300 problems: in the full comparison only
        demo.eval.forgetting = True
        assert {k: v for k, v in to_dict(demo).items() if k != "experiment"} == {
            k: v for k, v in to_dict(teacher).items() if k != "experiment"
        }
        # its rows are the registered experiment's own (the same run names, so each reuses the other's)
        assert demo.experiment.name == teacher.experiment.name
        rows = {r.run_name for r in experiment.expand_grid(demo.experiment)}
        assert rows <= {r.run_name for r in experiment.expand_grid(teacher.experiment)} and len(rows) == 12
