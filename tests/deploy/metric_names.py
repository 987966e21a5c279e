"""Metric names: those the code defines (prometheus_client constructors, found by reading the
source) and those PromQL in the rules and the dashboard references."""

from __future__ import annotations

import ast
import re
from pathlib import Path

KINDS = {"Counter", "Gauge", "Histogram", "Summary", "Info", "Enum"}
# Exposition names per metric type (prometheus_client: a Counter "x" or "x_total" exposes x_total;
# the *_created series are turned off in common/metrics.py).
SUFFIXES = {"Counter": ["_total"], "Gauge": [""], "Histogram": ["_bucket", "_sum", "_count"],
            "Summary": ["", "_sum", "_count"], "Info": ["_info"], "Enum": [""]}


def _str_value(node, consts: dict[str, str]) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name):
        return consts.get(node.id)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        a, b = _str_value(node.left, consts), _str_value(node.right, consts)
        return a + b if a is not None and b is not None else None
    if isinstance(node, ast.JoinedStr):
        parts = [_str_value(v.value if isinstance(v, ast.FormattedValue) else v, consts) for v in node.values]
        return "".join(parts) if all(p is not None for p in parts) else None
    return None


def _labels(call: ast.Call) -> tuple[str, ...]:
    node = call.args[2] if len(call.args) > 2 else next((k.value for k in call.keywords if k.arg == "labelnames"), None)
    if isinstance(node, (ast.List, ast.Tuple)):
        return tuple(e.value for e in node.elts if isinstance(e, ast.Constant))
    return ()


def defined_with_labels(roots: list[Path]) -> dict[str, tuple[str, tuple[str, ...]]]:
    """{base metric name: (type, label names)} for every prometheus_client metric constructed under `roots`."""
    found: dict[str, tuple[str, tuple[str, ...]]] = {}
    for root in roots:
        for path in root.rglob("*.py"):
            tree = ast.parse(path.read_text(), str(path))
            consts = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
                      and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)
                      for t in n.targets if isinstance(t, ast.Name)}
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call) or not node.args:
                    continue
                fn = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
                if fn in KINDS:
                    name = _str_value(node.args[0], consts)
                    if name and name.startswith("specrelay_"):
                        found[name] = (fn, _labels(node))
    return found


def defined_in_source(roots: list[Path]) -> dict[str, str]:
    """{base metric name: type} for every prometheus_client metric constructed under `roots`."""
    return {n: kind for n, (kind, _labels) in defined_with_labels(roots).items()}


def exposition_names(defined: dict[str, str]) -> set[str]:
    out = set()
    for name, kind in defined.items():
        base = name[: -len("_total")] if kind == "Counter" and name.endswith("_total") else name
        out |= {base + s for s in SUFFIXES[kind]}
    return out


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_IDENT = re.compile(r"(?<![\w:.$])([a-zA-Z_:][a-zA-Z0-9_:]*)")
_FUNCS_AND_WORDS = {
    "sum", "avg", "min", "max", "count", "rate", "irate", "increase", "histogram_quantile", "by", "without", "on",
    "ignoring", "group_left", "group_right", "and", "or", "unless", "absent", "changes", "delta", "deriv", "topk",
    "bottomk", "label_replace", "clamp_min", "clamp_max", "vector", "scalar", "time", "offset", "bool", "le",
    "instance", "job", "status", "reason", "endpoint", "position", "outcome", "plane", "e", "Inf", "NaN", "inf",
}


def referenced_in_promql(expr: str) -> set[str]:
    """Metric and recording-rule names in a PromQL expression (labels, functions, strings dropped)."""
    expr = _STRINGS.sub('""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)          # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)         # range selectors
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\$\{?\w+\}?", "", expr)        # Grafana variables ($__rate_interval, ${ds})
    names = set()
    for m in _IDENT.finditer(expr):
        word = m.group(1)
        following = expr[m.end():].lstrip()
        if word in _FUNCS_AND_WORDS or following.startswith("("):
            continue
        if re.fullmatch(r"[0-9.]+[smhdwy]?", word):
            continue
        names.add(word)
    return names
