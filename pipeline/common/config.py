"""The run config's machinery: YAML read strictly, `--set` overrides, typed sections built and
checked field by field (`load_config`), the field types (ranges, names, devices), and the model
section every stage shares. Each stage's own section lives beside the stage (`<stage>/config.py`);
the whole run config (`entry/config.py`) composes them.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, cast, get_args, get_origin

import yaml

from pipeline.common.errors import ConfigError

T = TypeVar("T")


RENAMED = {"base_model": "world"}
"""Top-level sections of the run config under a former name: a file, a `--set` key or a run.json that
uses the old name is read under the new one (`load_config` prints a one-line note)."""


_NOTED: set[str] = set()


def rename_sections(raw: dict[str, Any], what: str, renames: dict[str, str] = RENAMED) -> list[str]:
    """Move sections under a former name (`RENAMED`) to their name now, in place; returns one note per
    section moved. Both names at once is a ConfigError: which one was meant cannot be known."""
    notes = []
    for old, new in renames.items():
        if old not in raw:
            continue
        if new in raw:
            raise ConfigError(f"{what} has both {old!r} and {new!r}; {old!r} is the former name of {new!r}: keep one")
        raw[new] = raw.pop(old)
        notes.append(f"note: {what} uses the section name {old!r}; it is now called {new!r} (read as such)")
    return notes


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


@dataclass(frozen=True)
class Range:
    """A bound on a number: low ≤ x (or low < x when `low_open`) and x ≤ high."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False

    def problem(self, value: float) -> str | None:
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        if not below and (self.high is None or value <= self.high):
            return None
        if self.high is None:
            return f"must be {'>' if self.low_open else '>='} {self.low}"
        return f"must be in {'(' if self.low_open else '['}{self.low}, {self.high}]"


SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")


@dataclass(frozen=True)
class SafeName:
    """One safe path component: letters, digits, `.`, `_`, `-`; not `.` or `..`."""

    def problem(self, value: str) -> str | None:
        if not SAFE_NAME.fullmatch(value) or value in (".", ".."):
            return "a name must be one folder name of letters, digits, '.', '_' and '-' (not '.' or '..')"
        if len(value) > MAX_NAME:
            return f"a name is at most {MAX_NAME} characters (a run's names add suffixes; filesystems stop at 255)"
        return None


MAX_NAME = 120


@dataclass(frozen=True)
class Device:
    """A torch device string that can exist: `auto`, `cpu`, `cuda`, `cuda:N`, `mps`."""

    def problem(self, value: str) -> str | None:
        if value in ("auto", "cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", value):
            return None
        return "not a device; use auto, cpu, cuda or cuda:N"


PositiveInt = Annotated[int, Range(1)]


NonNegativeInt = Annotated[int, Range(0)]


PositiveFloat = Annotated[float, Range(0, low_open=True)]


NonNegativeFloat = Annotated[float, Range(0)]


Fraction = Annotated[float, Range(0, 1)]


OpenFraction = Annotated[float, Range(0, 1, low_open=True)]
"""A share in (0, 1]."""


Name = Annotated[str, SafeName()]


Seed = Annotated[int, Range(0, 2**32 - 1)]
"""A random seed numpy, torch and vLLM all accept."""


DeviceName = Annotated[str, Device()]


@dataclass
class ModelConfig:
    """Which causal LM and tokenizer a stage uses."""

    path: str | None = None
    """Local `from_pretrained` folder. None means the embedded base model (built on demand)."""
    attn_implementation: Literal["sdpa", "eager", "flex_attention", "flash_attention_2"] | None = None
    """Attention kernel for training (transformers' `attn_implementation`); None: the model's default
    (sdpa). flash_attention_2 needs the flash-attn package and a GPU, and suits `train.packing`."""
    trust_remote_code: bool = False
    """Let model folders (this model, the prior model, evaluated models) run their own Python code
    (`auto_map`). Off: such a folder is refused before anything in it is read as code."""


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:  # type: ignore[assignment]
    """Build a `cls` instance from a YAML file and `key.sub=value` overrides.

    Args:
        cls: The dataclass to build.
        path: YAML file; None starts from the defaults.
        overrides: `dotted.key=value` strings; values are parsed as YAML. `section={...}` merges
            into the section instead of replacing it.

    Raises:
        ConfigError: Unreadable file, or every unknown key, wrong type and out-of-range value at
            once, each named.
    """
    raw: dict[str, Any] = {}
    renames = {k: v for k, v in RENAMED.items() if v in {f.name for f in dataclasses.fields(cls)}}  # type: ignore[arg-type]
    notes: list[str] = []
    if path is not None:
        raw = _read_yaml_file(Path(path))
        notes += rename_sections(raw, f"config file {path}", renames)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        head, dot, rest = key.partition(".")
        if head in renames:
            notes.append(f"note: override {item!r} uses the section name {head!r}; it is now called {renames[head]!r}")
            key = renames[head] + dot + rest
        target = raw
        *parents, leaf = key.split(".")
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        parsed = parse_yaml(value, f"override {item!r}")
        if not parents and isinstance(parsed, dict) and isinstance(target.get(leaf), dict):
            parsed = {**target[leaf], **parsed}  # `--set train={lr: 1}` changes lr, not the whole section
        target[leaf] = parsed
    for note in notes:
        if note not in _NOTED:  # a command may load its config more than once: say it once
            _NOTED.add(note)
            print(note, file=sys.stderr)
    errors: list[str] = []
    built = _build(cls, raw, "", errors)
    if not errors and hasattr(built, "problems"):  # checks across fields need every field well-formed
        errors += built.problems()
    if errors:
        raise ConfigError("; ".join(errors))
    return built


MAX_CONFIG_BYTES = 1 << 20


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases (a 700-byte alias bomb expands to gigabytes) and duplicate keys
    (a second `train:` section would silently replace the first)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(f"YAML aliases (*{event.anchor}) are not allowed in configs{event.start_mark}")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        duplicated = sorted({str(k) for k in keys if keys.count(k) > 1})
        if duplicated:
            raise yaml.YAMLError(f"key {duplicated[0]!r} appears twice in one mapping{node.start_mark}")
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, what: str) -> Any:
    """YAML through the strict loader; any YAML problem is a ConfigError naming `what`."""
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} is not valid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise ConfigError(f"{what} nests lists or mappings too deeply to be a config") from None


def _read_yaml_file(path: Path) -> dict[str, Any]:
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {path} is over {MAX_CONFIG_BYTES >> 20} MiB; is it really a config?")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config path {path} is a folder; give a YAML file (see configs/)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text; give a YAML file (see configs/)") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    raw = parse_yaml(text, f"config file {path}") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return raw


def section_problems(cls: type, raw: dict[str, Any], prefix: str) -> list[str]:
    """What `load_config` would refuse in `raw` as a `cls` section (unknown keys, types, ranges)."""
    errors: list[str] = []
    try:
        _build(cls, raw, prefix, errors)
    except ConfigError as e:
        errors.append(str(e))
    return errors


def _build(cls: type[T], raw: Any, prefix: str, errors: list[str]) -> T:
    where = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    names = {f.name for f in fields}
    for key in sorted(set(raw) - names, key=str):
        section = f" in section {where!r}" if prefix else ""
        errors.append(f"unknown config key {key!r}{section}; valid keys: {sorted(names)}")
    for f in fields:
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in raw:
            errors.append(f"{where}: missing required key {f.name!r}")
    kwargs = {}
    for name, value in raw.items():
        if name not in names:
            continue
        try:
            kwargs[name] = coerce(hints[name], value, f"{prefix}{name}", errors)
        except ConfigError as e:
            errors.append(str(e))
    try:
        return cls(**kwargs)
    except TypeError:  # a required key is missing: already reported
        if not errors:
            raise
        return cast(T, None)


def coerce(tp: Any, value: Any, key: str, errors: list[str]) -> Any:
    """Check (and minimally convert) `value` against the annotation `tp`; sections add to `errors`."""
    origin = get_origin(tp)
    if origin is Annotated:
        base, *checks = get_args(tp)
        value = coerce(base, value, key, errors)
        for check in checks:
            problem = check.problem(value)
            if problem:
                raise ConfigError(f"{key}={value!r}: {problem}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str) and hasattr(tp, "SHORTHAND"):
            value = {tp.SHORTHAND: value}
        return _build(tp, value, f"{key}.", errors)  # type: ignore[arg-type]
    if origin in (Union, types.UnionType):
        if value is None and type(None) in get_args(tp):
            return None
        failures = []
        for arg in get_args(tp):
            if arg is type(None):
                continue
            try:
                return coerce(arg, value, key, errors)
            except ConfigError as e:
                failures.append(str(e))
        raise ConfigError(failures[0] if len(failures) == 1 else f"{key}: {value!r} matches no type")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = get_args(tp)
        return {coerce(kt, k, key, errors): coerce(vt, v, f"{key}.{k}", errors) for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (it,) = get_args(tp)
        return [coerce(it, v, f"{key}[{i}]", errors) for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads `5e-5` (no dot) as a string
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{key}: expected {tp.__name__}, got bool {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    if tp is float and not math.isfinite(value):
        raise ConfigError(f"{key}: {value} is not a finite number")
    return value


def flatten(data: dict[str, Any], sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of `section.key` names (`data.columns.prompt`, ...)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, sep, f"{prefix}{key}{sep}"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain data (for saving next to a run)."""
    return dataclasses.asdict(config)
