"""The README's settings table, generated from `server.settings.Settings` (by `python -m bench.report`):
one row per field with its flag, environment variable, default and description. A field's description
is its `Field(description=...)`, else the comment on its line or the comment block right above it.
"""

from __future__ import annotations

import ast
import inspect
import io
import textwrap
import tokenize
from pathlib import Path
from typing import Any

from pydantic_core import PydanticUndefined

from bench.record import ROOT
from server.settings import Settings


def field_comments(cls: type) -> dict[str, str]:
    """{field name: its comment} from the class's source: the comment block right above the field (up to a
    blank line or code) followed by the comments on the field's own lines."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments = {
        token.start[0]: token.string.lstrip("#").strip()
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT
    }
    found = {}
    (class_node,) = ast.parse(source).body
    for node in class_node.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, line = [], node.lineno - 1
        while line in comments and lines[line - 1].lstrip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        own = [comments[n] for n in range(node.lineno, (node.end_lineno or node.lineno) + 1) if n in comments]
        found[node.target.id] = " ".join(above + own)
    return found


def _default(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, Path):
        return f"`{value.relative_to(ROOT) if value.is_relative_to(ROOT) else value}`"
    if isinstance(value, list):
        return "none" if not value else f"`{','.join(map(str, value))}`"
    return f"`{value}`"


def settings_rows() -> list[tuple[str, str, str, str]]:
    """(name, environment variable, default, description) of every setting, in the class's order."""
    comments = field_comments(Settings)
    rows = []
    for name, field in Settings.model_fields.items():
        default = field.default_factory() if field.default is PydanticUndefined else field.default  # type: ignore[call-arg,misc]
        description = field.description or comments.get(name, "")
        rows.append((name, f"SLEEPSERVE_{name.upper()}", _default(default), description))
    return rows


def settings_table() -> str:
    """The markdown table; a setting without a description is an error (document it in server/settings.py)."""
    rows = settings_rows()
    undocumented = [name for name, *_, description in rows if not description]
    if undocumented:
        raise ValueError(
            f"settings without a description in server/settings.py: {', '.join(undocumented)} "
            "(add a Field description or a comment)"
        )
    lines = ["| flag / environment variable | default | what it does |", "|---|---|---|"]
    for name, env, default, description in rows:
        text = description.replace("|", "\\|")
        lines.append(f"| `--{name.replace('_', '-')}` / `{env}` | {default} | {text} |")
    return "\n".join(lines)
