"""Render the results page (docs/benchmarks.md) from benchmarks/results/*.json.

The page: the machines the results were measured on, one summary table of headline figures vs
their targets, the stated runtime of `make bench`, then a section per benchmark with its markdown
table and the command that reproduces it, and the demo's acceptance-length curve.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from benchmarks.harness import REPO, RESULTS
from benchmarks.suite import BENCHMARKS, Bench, BenchmarkResultError, Headline, Result

DOCS_PAGE = REPO / "docs" / "benchmarks.md"
RUN_LOG = "run_all.json"        # per-script wall time of the last run_all runs
DEMO_CURVE = "demo_tau_curve.json"  # copied here by `make demo`: [{"train_tokens": int, "tau": float}, ...]
DEMO_TARGET_TAU = 2.0


def load(results_dir: Path, stem: str, rerun: str) -> Result | None:
    path = Path(results_dir) / f"{stem}.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise BenchmarkResultError(f"{path}: not valid JSON ({e}); rerun it: {rerun}") from e
    if not isinstance(data, dict):
        raise BenchmarkResultError(f"{path}: expected a JSON object; rerun it: {rerun}")
    res = Result(path, data, rerun)
    res.need("machine")
    return res


def _table(path: Path) -> str:
    """The script's markdown without its '# name' title (the section has its own heading)."""
    if not path.is_file():
        return "_(this run wrote no markdown table; see the JSON)_"
    lines = path.read_text().strip().splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    return "\n".join(lines).strip()


def machine_row(stem: str, r: Result) -> str:
    m = r.need("machine")
    load = m.get("load_avg_1m", m.get("load_avg_at_start", ""))
    if isinstance(load, list):
        load = load[0] if load else ""
    load_s = f"{load:.1f}" if isinstance(load, (int, float)) else "not recorded"
    when = time.strftime("%Y-%m-%d", time.gmtime(r.data["unix_time"])) if "unix_time" in r.data else ""
    cores = m.get("cores", m.get("cpus", "?"))
    return (f"| {stem} | {m.get('cpu') or m.get('processor', '?')} | {cores} | {load_s} | {m.get('torch', '')} | "
            f"{m.get('python', '')} | {when} |")


def platform_line(loaded: list[tuple[Bench, Result | None]]) -> list[str]:
    for _, r in loaded:
        m = r.data["machine"] if r else {}
        if m.get("platform"):
            return [f"{m['cores']} cores, no GPU, {m['platform']}, torch {m['torch']}, pyarrow {m.get('pyarrow', '?')}, "
                    f"Python {m['python']}. The load average shows how busy the shared machine was during each run.", ""]
    return []


def _met(h: Headline, smoke: bool) -> str:
    if smoke:
        return "n/a (smoke)"
    return {True: "yes", False: "**no**", None: "—"}[h.met]


def _fmt_s(s: float) -> str:
    return f"{s / 60:.0f} min" if s >= 90 else f"{s:.0f} s"


def runtime_section(results_dir: Path, benches: list[Bench], smoke: bool) -> list[str]:
    path = Path(results_dir) / RUN_LOG
    runs = json.loads(path.read_text()).get("runs", {}) if path.is_file() else {}
    lines = ["| script | time limit | wall time, last run | status | when |", "|---|---:|---:|---|---|"]
    total_limit = total_seen = 0.0
    for b in benches:
        run = runs.get(b.name)
        limit = b.smoke_timeout_s if smoke else b.timeout_s
        total_limit += limit
        if run and bool(run.get("smoke")) == smoke:
            seen, status = run["wall_s"], run["status"]
            when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(run["unix_time"]))
            wall = f"{_fmt_s(seen)} (load {run.get('load_avg_start', 0):.1f})"
        else:
            seen, status, when = (0.0 if smoke else b.expected_s), "not timed by run_all", ""
            wall = "—" if smoke else f"~{_fmt_s(seen)} (earlier runs)"
        total_seen += seen
        lines.append(f"| {' '.join((b.module, *b.args))} | {_fmt_s(limit)} | {wall} | {status} | {when} |")
    cmd = "make bench-smoke" if smoke else "make bench"
    return [f"`{cmd}` runs {len(benches)} scripts one after another. Each is stopped at its time limit, so the "
            f"whole run is bounded by **{_fmt_s(total_limit)}**; it takes about **{_fmt_s(total_seen)}** on the "
            f"machine above (sum of the wall times below; rows not yet timed by `run_all` use the earlier runs' "
            f"duration).", "", *lines]


def demo_section(results_dir: Path) -> tuple[list[str], Headline | None]:
    path = Path(results_dir) / DEMO_CURVE
    if not path.is_file():
        return ["No curve yet: run `make demo` to produce it (it writes `runs/demo/tau_curve.json` and copies it to "
                f"`benchmarks/results/{DEMO_CURVE}`)."], None
    try:
        points = json.loads(path.read_text())
    except ValueError as e:
        raise BenchmarkResultError(f"{path}: not valid JSON ({e}); rerun `make demo`") from e
    if not isinstance(points, list) or not points:
        raise BenchmarkResultError(f"{path}: expected a non-empty list of {{train_tokens, tau}}; rerun `make demo`")
    r = Result(path, {"points": points}, "make demo")
    rows = [(r.need(f"points.{i}.train_tokens"), r.need(f"points.{i}.tau")) for i in range(len(points))]
    lines = ["Acceptance length τ (chain, greedy, K=5) on held-out ShareGPT prompts, SmolLM2-135M-Instruct target, "
             "vs the tokens the draft was trained on (from `make demo`).", "",
             "| training tokens | τ |", "|---:|---:|", *(f"| {t:,} | {tau:.3f} |" for t, tau in rows)]
    last_tokens, last_tau = rows[-1]
    return lines, Headline(f"acceptance length **{last_tau:.2f}** after {last_tokens:,} training tokens (τ "
                           f"{rows[0][1]:.2f} at {rows[0][0]:,})", f">= {DEMO_TARGET_TAU}", last_tau >= DEMO_TARGET_TAU)


def render(results_dir: Path = RESULTS, smoke: bool = False) -> str:
    results_dir = Path(results_dir)
    loaded: list[tuple[Bench, Result | None]] = [
        (b, load(results_dir, b.stem(smoke), b.reproduce_command())) for b in BENCHMARKS]
    machines, summary, sections = [], [], []
    for b, r in loaded:
        if r is None:
            summary.append(f"| {b.title} | not run | | |")
            sections += [f"### {b.title}", "", f"Measures: {b.measures}.", "",
                         f"No result yet (`{b.stem(smoke)}.json`): run `{b.reproduce_command()}`.", ""]
            continue
        machines.append(machine_row(b.stem(smoke), r))
        for h in b.headline(r):
            summary.append(f"| {b.title} | {h.figure} | {h.target} | {_met(h, smoke)} |")
        sections += [f"### {b.title}", "", f"Measures: {b.measures}.", "",
                     f"Reproduce: `{b.reproduce_command()}`" + ("" if b.in_make_bench else " (not part of `make bench`)"),
                     "", _table(results_dir / f"{b.stem(smoke)}.md"), ""]
        for stem, cmd, in_summary in b.extra if not smoke else ():
            extra = load(results_dir, stem, cmd)
            if extra is not None:
                machines.append(machine_row(stem, extra))
                for h in b.headline(extra) if in_summary else ():
                    summary.append(f"| {b.title} (`{stem}`) | {h.figure} | {h.target} | {_met(h, smoke)} |")
                sections += [f"Variant run `{stem}` (`{cmd}`):", "", _table(results_dir / f"{stem}.md"), ""]
    demo_lines, demo_head = demo_section(results_dir)
    summary.append(f"| Acceptance length vs training tokens (demo) | {demo_head.figure if demo_head else 'not run'} | "
                   f"{demo_head.target if demo_head else f'>= {DEMO_TARGET_TAU}'} | "
                   f"{_met(demo_head, smoke) if demo_head else ''} |")
    where = "benchmarks/results" if results_dir.resolve() == RESULTS.resolve() else str(results_dir)
    head = ["# Benchmarks", "",
            f"Generated by `python -m benchmarks.run_all --render-only` from `{where}/*.json`; do not edit by hand.",
            "Every figure is a ratio measured side by side in one run. The machine is shared with other jobs, so "
            "absolute numbers are noisy: compare the ratios (each result records the load average).", ""]
    if smoke:
        head += ["**Smoke results: tiny shapes that prove each script still works. These are not measurements.**", ""]
    bench_list = [b for b in BENCHMARKS if b.in_make_bench]
    page = [*head,
            "Run everything with `make bench` (full sizes, results to `benchmarks/results/`, this page re-rendered) "
            "or one benchmark with `python -m benchmarks.run_all --only NAME` (NAME: "
            f"{', '.join(b.name for b in bench_list)}). CI runs only the smoke mode "
            "(`make bench-smoke`, `tests/integration/test_bench_suite.py`).", "",
            "## Summary", "", "| benchmark | figure measured | target | met? |", "|---|---|---|---|", *summary, "",
            "## Machine", "", *platform_line(loaded), "| result | CPU | cores | load avg (1 min) | torch | python | date |",
            "|---|---|---:|---:|---|---|---|", *machines, "",
            "## Runtime of `make bench`", "", *runtime_section(results_dir, bench_list, smoke), "",
            "## Results", "", *sections,
            "### Acceptance length vs training tokens", "", *demo_lines, ""]
    return "\n".join(page)


def write_page(results_dir: Path = RESULTS, smoke: bool = False, dest: Path | None = None) -> Path:
    """Render and write atomically: docs/benchmarks.md for the repository's results, else
    <results_dir>/benchmarks.md (smoke runs never overwrite the docs page)."""
    results_dir = Path(results_dir)
    if dest is None:
        dest = DOCS_PAGE if results_dir.resolve() == RESULTS.resolve() and not smoke else results_dir / "benchmarks.md"
    text = render(results_dir, smoke)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, dest)
    return dest
