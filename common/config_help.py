"""Every key of a config dataclass with its type, default and the comment beside it in the source,
for `--help`-style listings (`draft-trainer train --list-keys`). The comments are the docs: a field
documented where it is declared is documented here too."""

from __future__ import annotations

import dataclasses
import inspect
import io
import textwrap
import tokenize
import typing
from dataclasses import dataclass
from typing import Any


@dataclass
class KeyDoc:
    key: str        # dotted, as given on the command line (optim.lr)
    type: str
    default: Any
    comment: str    # the field's trailing comment and its continuation lines ('' if none)


def _field_comments(cls: type) -> dict[str, str]:
    """{field name: comment}: the comment on a field's line plus the continuation lines below it."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, list[str]] = {}
    current = None
    line_has_code: set[int] = set()
    tokens = list(tokenize.generate_tokens(io.StringIO(src).readline))
    for tok in tokens:
        if tok.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            line_has_code.add(tok.start[0])
    field_line: dict[int, str] = {}
    for tok, nxt in zip(tokens, tokens[1:]):
        if tok.type == tokenize.NAME and tok.string in names and nxt.string == ":" and tok.start[1] == 4:
            field_line[tok.start[0]] = tok.string
    for tok in tokens:
        line = tok.start[0]
        if line in field_line:
            current = field_line[line]
        elif line in line_has_code:
            current = None
        # A comment on the field's line, or on a line of its own indented past the fields (a
        # continuation); one at the fields' indentation heads the next block instead.
        if tok.type == tokenize.COMMENT and current is not None and (line in field_line or tok.start[1] > 4):
            out.setdefault(current, []).append(tok.string.lstrip("#").strip())
    return {k: " ".join(v) for k, v in out.items()}


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def describe_keys(cls: type, prefix: str = "") -> list[KeyDoc]:
    """Every leaf key of dataclass `cls` (nested dataclasses flattened to dotted keys), in declaration order."""
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    out: list[KeyDoc] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += describe_keys(tp, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        out.append(KeyDoc(prefix + f.name, _type_name(tp), default, comments.get(f.name, "")))
    return out


def format_keys(docs: list[KeyDoc], width: int = 100) -> str:
    """One key per block: `key (type, default X)` then its comment, wrapped and indented."""
    lines = []
    for d in docs:
        default = '""' if d.default == "" else d.default
        lines.append(f"  {d.key} ({d.type}, default {default})")
        if d.comment:
            lines += textwrap.wrap(d.comment, width=width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)
