"""The experiment grid and the selection protocol (`target-sft run`, `target-sft select`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.common.config import Name, PositiveFloat, PositiveInt, Seed
from pipeline.evaluation.config import EvalSetConfig


@dataclass
class ExperimentConfig:
    """An experiment: capture priors once, train a grid of targets over seeds, evaluate, compare."""

    name: Name = "experiment"
    """Folder `<storage>/experiments/<name>/` (table, plot, summary); runs are `<name>-<target>-s<seed>`."""
    targets: list[Any] = field(default_factory=lambda: ["sft", "dft", {"preset": "target_sft", "eta": 0.5}])
    """The grid: presets or `{preset: ..., param: ...}` mappings; a list of values expands to one run
    per value (`{preset: target_sft, eta: [0.25, 0.5, 0.75]}`). A `train:` mapping inside an entry
    sets that run's own train settings (e.g. `{preset: sft, train: {lr: 1.0e-4}}`)."""
    seeds: list[Seed] = field(default_factory=lambda: [0])
    """Every target runs once per seed (train.seed and eval.seed)."""
    compare_to: str | None = None
    """A target label of the grid (e.g. `sft`) that every other target is compared with, paired on
    the same problems and seeds: the difference with its 95% bootstrap interval and the share of
    seeds won. None: no paired column."""
    evaluate_base: bool = True
    """Also evaluate the untrained base model, as the reference row."""
    student_profile: bool = False
    """Where the priors come from a teacher: also capture the student's own prior set (one more pass
    over the data, cached like any set) so the table shows the SFT set's γ profile under the student,
    the model whose γ = p(observed) training uses, beside the teacher's (docs/design.md §10)."""
    schedule: str | None = None
    """Cron string for the served deployment (`target-sft serve`), e.g. `0 3 * * *`."""


@dataclass
class SelectConfig:
    """`target-sft select`: the learning rate and steps, chosen once by plain SFT on a validation split
    (never the held-out problems), then used by every target of the experiment."""

    lrs: list[PositiveFloat] = field(default_factory=lambda: [3e-4, 1e-3, 3e-3])
    """Learning rates tried."""
    max_steps: list[PositiveInt] = field(default_factory=lambda: [80, 160])
    """Step counts tried (each with each learning rate)."""
    seeds: list[Seed] = field(default_factory=lambda: [0])
    """Seeds per candidate; the choice maximises the mean validation Average@n."""
    validation: EvalSetConfig | None = None
    """The validation problems; None: the embedded build's validation split. It also replaces the
    held-out examples of the training-time eval loss."""
    target: Any = "sft"
    """The target the candidates train: plain SFT (the shared settings every target uses), or another
    target (a preset or mapping, as in `experiment.targets`) to choose that objective's own lr
    (DFT's loss is 10-20x smaller than SFT's, so a shared lr can starve it)."""
