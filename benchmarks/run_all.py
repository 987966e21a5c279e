"""Run the CPU benchmark suite, one script after another, then render the results page.

    python -m benchmarks.run_all                  # make bench: full sizes -> benchmarks/results, docs/benchmarks.md
    python -m benchmarks.run_all --smoke --out D  # make bench-smoke / CI: tiny sizes, D/*.json + D/benchmarks.md
    python -m benchmarks.run_all --only pool,trainer
    python -m benchmarks.run_all --render-only    # re-render docs/benchmarks.md from the existing JSON

Each script runs as its own subprocess (its own session, so a timeout stops the servers it
started too) and writes its JSON + markdown; its wall time is recorded in <out>/run_all.json.
A failing or timed-out script is reported and the others still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.harness import REPO, RESULTS, env
from benchmarks.report import RUN_LOG, write_page
from benchmarks.suite import Bench, select
from common.errors import SpecRelayError


def run_one(b: Bench, out_dir: Path, smoke: bool) -> dict:
    cmd = [sys.executable, *b.command(out_dir, smoke)[1:]]
    limit = b.smoke_timeout_s if smoke else b.timeout_s
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), start_new_session=True)
    try:
        code = proc.wait(timeout=limit)
        status = "ok" if code == 0 else f"failed (exit {code})"
    except subprocess.TimeoutExpired:
        _stop_group(proc)
        code, status = None, f"timed out after {limit:.0f} s"
    return {"smoke": smoke, "status": status, "returncode": code, "wall_s": round(time.perf_counter() - t0, 1),
            "timeout_s": limit, "load_avg_start": load0, "load_avg_end": os.getloadavg()[0],
            "unix_time": time.time(), "command": " ".join(b.command(None, smoke))}


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the script's process group (it and the servers it started), then SIGKILL."""
    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def record(out_dir: Path, name: str, run: dict) -> None:
    """Merge one script's run into <out>/run_all.json (atomically), keeping the others' entries."""
    path = out_dir / RUN_LOG
    log = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    log["runs"][name] = run
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(log, indent=1))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes (seconds per script): proves each still works")
    p.add_argument("--only", default="", help="comma-separated benchmark names (default: all of make bench)")
    p.add_argument("--out", type=Path, default=None,
                   help="results directory (default benchmarks/results; the page then goes to docs/benchmarks.md, "
                        "else to OUT/benchmarks.md)")
    p.add_argument("--render-only", action="store_true", help="only re-render the page from the existing JSON")
    a = p.parse_args(argv)
    out_dir = Path(a.out or RESULTS).resolve()
    try:
        benches = select(a.only)
    except SpecRelayError as e:
        p.error(str(e))
    failed: list[str] = []
    if not a.render_only:
        out_dir.mkdir(parents=True, exist_ok=True)
        total = sum(b.smoke_timeout_s if a.smoke else b.timeout_s for b in benches)
        print(f"run_all: {len(benches)} benchmark(s){' (smoke)' if a.smoke else ''} -> {out_dir}; "
              f"bounded by {total / 60:.0f} min of time limits", flush=True)
        t0 = time.perf_counter()
        for i, b in enumerate(benches, 1):
            print(f"\n[{i}/{len(benches)}] {b.name}: {' '.join(b.command(out_dir, a.smoke))}", flush=True)
            run = run_one(b, out_dir, a.smoke)
            record(out_dir, b.name, run)
            print(f"[{i}/{len(benches)}] {b.name}: {run['status']} in {run['wall_s']:.1f} s", flush=True)
            if run["status"] != "ok":
                failed.append(f"{b.name} ({run['status']})")
        print(f"\nrun_all: {len(benches) - len(failed)}/{len(benches)} ok in {time.perf_counter() - t0:.0f} s")
    try:
        page = write_page(out_dir, a.smoke)
    except SpecRelayError as e:
        print(f"run_all: could not render the results page: {e}", file=sys.stderr)
        return 1
    print(f"run_all: wrote {page}")
    if failed:
        print(f"run_all: FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
