"""The tree shows the data path (docs/design.md §5): the subpackages of `pipeline/` form layers,
and a module imports only from its own layer or those beneath it, with no circle."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

from tests.conftest import REPO, tiny_args

LAYERS = ["common", "core", "data", "priors", "training", "evaluation", "experiments", "world", "entry"]
"""Bottom to top: the shared low layer, the maths, then the stages in data-path order, the embedded
world, and the entry layer (CLI, launcher, run config, input resolution)."""


def _imports() -> dict[str, set[str]]:
    """Module → the pipeline modules it imports (at any depth: a function-level import counts)."""
    graph: dict[str, set[str]] = {}
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("pipeline"))
        graph[name] = found
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 2 else -1


def test_every_module_lives_in_a_layer():
    loose = [p.name for p in (REPO / "pipeline").glob("*.py") if p.name != "__init__.py"]
    assert loose == [], f"modules outside the layer subpackages: {loose}"
    assert sorted(p.name for p in (REPO / "pipeline").iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(
        LAYERS
    )


def test_no_module_imports_from_a_layer_above_its_own():
    upward = sorted(f"{m} -> {d}" for m, deps in _imports().items() for d in deps if _layer(d) > _layer(m))
    assert upward == []


def test_only_the_entry_layer_sees_the_whole_run_config():
    """Each stage takes its own section (docs/design.md §5): the whole RunConfig is the entry layer's."""
    seen = sorted(
        str(p.relative_to(REPO))
        for p in (REPO / "pipeline").rglob("*.py")
        if p.parent.name != "entry" and "RunConfig" in p.read_text()
    )
    assert seen == []


def test_the_import_graph_has_no_circle():
    graph = {m: {d for d in deps if d.count(".") >= 2} for m, deps in _imports().items()}
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == 1:
                return [*path, module, dep]
            if dep not in state and (circle := visit(dep, [*path, module])):
                return circle
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            assert (circle := visit(module, [])) is None, " -> ".join(circle)


TRAIN_WITHOUT_A_KEY = """
import importlib.util, json, sys
from flows import cli
from pipeline.common.devices import vllm_available
assert importlib.util.find_spec("vllm") is not None and vllm_available()  # installed: an import would show
code = cli.main(["train", *sys.argv[1:]])
print(json.dumps({"code": code, "vllm": sorted(m for m in sys.modules if m.split(".")[0] == "vllm")}))
"""


def test_training_without_a_prior_key_computes_it_without_importing_vllm(tiny_build, tmp_path):
    """With train.prior_key unset, training computes the key of the set it needs from the config
    (priors.engine=auto names vLLM, which is installed here). It never imports vLLM for that: the set
    is missing here, so the run stops at one line, after the key was computed."""
    argv = [f"--set={a}" for a in tiny_args(tiny_build, tmp_path, "priors.engine=auto", "train.target=target_sft")]
    done = subprocess.run(
        [sys.executable, "-c", TRAIN_WITHOUT_A_KEY, str(REPO / "configs" / "worlds" / "model-strong.yaml"), *argv],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"code": 2, "vllm": []}, done.stderr[-2000:]
    assert "target-sft priors" in done.stderr, done.stderr[-2000:]  # the set it needs is named, not found


def test_no_function_is_over_80_lines():
    """A stage reads top to bottom; past 80 lines a function is several steps that want names."""
    long = []
    for path in sorted([*(REPO / "pipeline").rglob("*.py"), *(REPO / "flows").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert long == []


def test_no_module_shadows_the_standard_library():
    """`pipeline/gc.py` once shadowed `gc` for readers of `train.py`: one name per thing."""
    names = {p.stem for p in (REPO / "pipeline").rglob("*.py")} | {p.name for p in (REPO / "pipeline").iterdir()}
    assert sorted(names & set(sys.stdlib_module_names)) == []
