"""MkDocs hook: the configuration reference is generated from the config dataclasses' field
docstrings at every build (docs/reference/config.md, git-ignored), so it cannot drift from the code."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import re
import textwrap
import typing
from pathlib import Path
from typing import Any

HEADER = """# Configuration reference

Generated from the code at every docs build (`docs/hooks.py`): one table per section of the run
config (`pipeline/entry/config.py`), each field with its type, its default and its docstring. A run
file sets any of them; `--set section.key=value` overrides one on the command line.
"""


def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring: the string literal right after its annotated assignment."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in itertools.pairwise(body):
        named = isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
        if named and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


def type_name(tp: Any) -> str:
    text = str(tp).replace("typing.", "").replace("NoneType", "None")
    for prefix in ("pipeline.", "<class '"):
        while prefix in text:
            start = text.index(prefix)
            end = text.find("'>", start)
            inner = text[start : end if end > 0 else len(text)]
            text = text.replace(inner, inner.rsplit(".", 1)[-1])
            text = text.replace("<class '", "").replace("'>", "")
    text = re.sub(r"Annotated\[([\w.\[\]]+), \w+\([^)]*\)\]", r"\1", text)  # bounds: in the docstring
    return text.replace("|", "\\|")


def default_of(f: dataclasses.Field) -> str:  # type: ignore[type-arg]
    if f.default is not dataclasses.MISSING:
        return f"`{f.default!r}`".replace("|", "\\|")
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return "(section)" if dataclasses.is_dataclass(value) else f"`{value!r}`".replace("|", "\\|")
    return "required"


def section(cls: type, prefix: str) -> list[str]:
    hints = typing.get_type_hints(cls, include_extras=True)
    docs = field_docs(cls)
    title = prefix.rstrip(".") or "run file"
    out = [f"## `{title}`: {cls.__name__}", "", (inspect.getdoc(cls) or "").split("\n\n")[0], ""]
    out += ["| key | type | default | what it does |", "|---|---|---|---|"]
    nested = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        tp = hints[f.name]
        base = typing.get_args(tp)[0] if typing.get_origin(tp) is typing.Annotated else tp
        kinds = [a for a in (typing.get_args(base) or (base,)) if dataclasses.is_dataclass(a)]
        nested += [(k, f"{prefix}{f.name}.") for k in kinds if k is not cls]
        doc = docs.get(f.name, "").replace("|", "\\|")
        out.append(f"| `{prefix}{f.name}` | {type_name(base)} | {default_of(f)} | {doc} |")
    out.append("")
    for kind, sub in nested:
        out += section(kind, sub)
    return out


def reference() -> str:
    from pipeline.entry.config import RunConfig

    return HEADER + "\n" + "\n".join(section(RunConfig, "")) + "\n"


def on_pre_build(config: Any) -> None:
    out = Path(config["docs_dir"]) / "reference" / "config.md"
    out.parent.mkdir(exist_ok=True)
    text = reference()
    if not out.exists() or out.read_text() != text:
        out.write_text(text)
