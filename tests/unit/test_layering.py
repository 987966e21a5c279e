"""The code's shape, checked: imports flow one way and files stay small.

- `common` imports neither side; `target_server` and `draft_trainer` never import each other.
- Inside draft_trainer, the ground floors (data, model, client, methods) never import the
  training loop (`train`), and no module takes part in an import cycle (lazy imports count:
  a cycle hidden in a function body is still a cycle).
- No file of draft_trainer/ is longer than 500 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("common", "target_server", "draft_trainer")
GROUND = ("draft_trainer.data", "draft_trainer.model", "draft_trainer.client", "draft_trainer.methods")
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (REPO / pkg).rglob("*.py"):
            rel = f.relative_to(REPO).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if "rpc" in parts:  # generated protobuf code
                continue
            out[".".join(parts)] = f
    return out


def _imports(path: Path, mods: dict[str, Path]) -> set[str]:
    """Project modules imported anywhere in the file (resolved to the longest known module name)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    out = set()
    for n in names:
        while n and n not in mods:
            n = n.rpartition(".")[0]
        if n:
            out.add(n)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(p, mods) - {m} for m, p in mods.items()}


def test_common_and_the_two_sides_never_import_across():
    bad = [(m, d) for m, deps in _graph().items() for d in deps
           if (m.startswith("common") and not d.startswith("common"))
           or (m.startswith("target_server") and d.startswith("draft_trainer"))
           or (m.startswith("draft_trainer") and d.startswith("target_server"))]
    assert not bad, bad


def test_ground_floors_never_import_the_training_loop():
    bad = [(m, d) for m, deps in _graph().items() if m.startswith(GROUND) for d in deps
           if d.startswith("draft_trainer.train")]
    assert not bad, bad


def test_no_import_cycles_in_draft_trainer():
    g = {m: {d for d in deps if d.startswith("draft_trainer")} for m, deps in _graph().items()
         if m.startswith("draft_trainer")}
    # A package's __init__ counts: a submodule importing its package, which imports it back, is a cycle.
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def strongconnect(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            strongconnect(v)
    assert not cycles, cycles


def test_no_file_over_500_lines_in_draft_trainer():
    long = {str(f.relative_to(REPO)): n for f in (REPO / "draft_trainer").rglob("*.py")
            if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert not long, long
