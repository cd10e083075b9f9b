from __future__ import annotations

import json

import pytest

from pipeline.common.config import load_config
from pipeline.common.errors import ConfigError
from pipeline.entry.config import RunConfig


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  max_length: 128\n  columns: {prompt: instruction}\n")
    cfg = load_config(RunConfig, path, ["data.truncation=drop", "world.lr=1", "model.path=/m"])
    assert cfg.data.max_length == 128
    assert cfg.data.columns == {"prompt": "instruction"}
    assert cfg.data.truncation == "drop"
    assert cfg.world.lr == 1.0 and isinstance(cfg.world.lr, float)
    assert cfg.model.path == "/m"


def test_the_world_sections_former_name_is_read_with_a_note(tmp_path, capsys, monkeypatch):
    """`base_model` was the `world` section's name: users' files and `--set` keys keep working."""
    from pipeline.common import config

    monkeypatch.setattr(config, "_NOTED", set())  # each note is said once per process
    path = tmp_path / "old.yaml"
    path.write_text("base_model:\n  lr: 0.5\n")
    cfg = load_config(RunConfig, path, ["base_model.seed=3"])
    assert cfg.world.lr == 0.5 and cfg.world.seed == 3
    notes = capsys.readouterr().err.splitlines()
    assert len(notes) == 2 and all("now called 'world'" in n for n in notes), notes
    assert load_config(RunConfig, None, ['base_model={"seed": 4}']).world.seed == 4
    path.write_text("base_model:\n  lr: 0.5\nworld:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"has both 'base_model' and 'world'; 'base_model' is the former name"):
        load_config(RunConfig, path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.max_lenght=3"], "unknown config key 'max_lenght' in section 'data'"),
        (["datum.path=x"], "unknown config key 'datum'"),
        (["data.max_length=abc"], "data.max_length: expected int, got str"),
        (["data.truncation=cut"], "data.truncation: 'cut' is not one of"),
        (["data.skip_invalid=3"], "data.skip_invalid: expected bool"),
        (["data.max_length=true"], "data.max_length: expected int, got bool"),
        (["data=3"], "data: expected a mapping"),
        (["novalue"], "must look like key.sub=value"),
    ],
)
def test_bad_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(RunConfig, None, overrides)


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(RunConfig, tmp_path / "nope.yaml")


def test_yaml_exponent_floats_and_required_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 5e-5\neval:\n  sets:\n    - {name: m, path: x.jsonl, answer_type: math}\n")
    cfg = load_config(RunConfig, path)
    assert cfg.train.lr == 5e-5 and cfg.eval.sets[0].answer_type == "math"
    with pytest.raises(ConfigError, match=r"train\.lr: expected float, got str 'fast'"):
        load_config(RunConfig, path, ["train.lr=fast"])
    with pytest.raises(ConfigError, match=r"eval\.sets\[0\]: missing required key 'name'"):
        load_config(RunConfig, None, ["eval.sets=[{path: x}]"])


def test_a_section_override_merges_instead_of_replacing(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 0.01\n  max_steps: 7\n")
    cfg = load_config(RunConfig, path, ["train={batch_size: 8}"])
    assert (cfg.train.lr, cfg.train.max_steps, cfg.train.batch_size) == (0.01, 7, 8)


def test_jsonl_keeps_a_line_separator_inside_a_string(tmp_path):
    """U+2028 is a line break for str.splitlines(), but JSON allows it raw inside a string."""
    from pipeline.data.sources import load_rows

    path = tmp_path / "d.jsonl"
    rows = [{"prompt": "first\u2028still first", "completion": "ok"}, {"prompt": "second", "completion": "ok"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert "\u2028" in path.read_text(encoding="utf-8")
    assert load_rows(path) == rows
