"""The tree shows the data path (docs/design.md §0): the subpackages of `pipeline/` form layers,
and a module imports only from its own layer or those beneath it, with no circle."""

from __future__ import annotations

import ast

from tests.conftest import REPO

LAYERS = ["common", "core", "data", "priors", "training", "evaluation", "experiments", "world", "entry"]
"""Bottom to top: the shared low layer, the maths, then the stages in data-path order, the embedded
world, and the entry layer (CLI, launcher, run config, input resolution)."""

KNOWN_UPWARD = {
    # Debt, to be paid by handing each stage its own section (issue 34, step 2): these stages still take
    # the whole RunConfig and resolve their inputs themselves. The list may only shrink.
    "pipeline.evaluation.evaluate -> pipeline.entry.config",
    "pipeline.evaluation.evaluate -> pipeline.entry.resolve",
    "pipeline.evaluation.evaluate -> pipeline.world.base_model",
    "pipeline.experiments.experiment -> pipeline.entry.config",
    "pipeline.experiments.experiment -> pipeline.entry.resolve",
    "pipeline.priors.capture -> pipeline.entry.config",
    "pipeline.priors.capture -> pipeline.entry.resolve",
    "pipeline.priors.interop -> pipeline.entry.config",
    "pipeline.priors.interop -> pipeline.entry.resolve",
    "pipeline.training.checkpoints -> pipeline.entry.config",
    "pipeline.training.train -> pipeline.entry.config",
    "pipeline.training.train -> pipeline.entry.resolve",
    "pipeline.training.trl_integration -> pipeline.entry.config",
    "pipeline.training.trl_integration -> pipeline.entry.resolve",
}


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
    assert [u for u in upward if u not in KNOWN_UPWARD] == []
    assert sorted(KNOWN_UPWARD - set(upward)) == [], "a known upward import is gone: drop it from KNOWN_UPWARD"


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
