"""Shared plumbing for benchmarks: machine description, results as JSON + a markdown table
(written atomically), process RSS, and starting a target server subprocess."""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from draft_trainer.client.local_server import LocalServer

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def machine() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import pyarrow
    import torch

    return {
        "cpu": cpu or platform.processor(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_avg_1m": os.getloadavg()[0], "python": platform.python_version(), "torch": torch.__version__,
        "pyarrow": pyarrow.__version__, "platform": platform.platform(),
        "note": "shared machine: other jobs ran on the same cores; compare ratios, not absolute numbers",
    }


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(out)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def write_results(name: str, data: dict, table: str, out_dir: Path | None = None) -> Path:
    """benchmarks/results/<name>.json and <name>.md (temp file + os.replace: never half-written)."""
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {"benchmark": name, "machine": machine(), "unix_time": time.time(), **data}
    md = f"# {name}\n\n{table}\n\nMachine: {data['machine']['cpu']}, {data['machine']['cores']} cores, " \
         f"load {data['machine']['load_avg_1m']:.1f}. {data['machine']['note']}.\n"
    for path, text in ((out_dir / f"{name}.json", json.dumps(data, indent=1)), (out_dir / f"{name}.md", md)):
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    print(table)
    print(f"wrote {out_dir / name}.json")
    return out_dir / f"{name}.json"


def load_module_at(rev: str, path: str, name: str):
    """The module at `path` as it was at git revision `rev`, imported under `name` (for side-by-side
    before/after benchmarks in one process; its own imports resolve to this checkout)."""
    import importlib.util
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    src = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=repo, capture_output=True, text=True, check=True).stdout
    tmp = Path(tempfile.mkdtemp()) / f"{name}.py"
    tmp.write_text(src)
    spec = importlib.util.spec_from_file_location(name, tmp)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod          # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def run_parallel(fn: Callable[[object, dict], None], items: list, workers: int) -> float:
    """fn(item, state) over items on `workers` threads (state: per-thread dict; callables in
    state["close"] run at the end); re-raises the first error; returns wall seconds."""
    todo = list(items)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker():
        state: dict = {}
        try:
            while True:
                with lock:
                    if not todo:
                        return
                    item = todo.pop(0)
                fn(item, state)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)
        finally:
            for closer in state.get("close", []):
                closer()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - t0


def rss_kib(pid: int) -> dict[str, int]:
    """Current (VmRSS) and peak (VmHWM) resident memory of a process, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, value = line.split(":", 1)
            out[key] = int(value.split()[0])
    return out


def env(threads: int | None = None) -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    if threads:
        e["OMP_NUM_THREADS"] = str(threads)
    return e


def Server(*args: str, threads: int | None = None, timeout: float = 300.0) -> LocalServer:  # noqa: N802
    """A started local target server (the project's one launcher) with the given `serve` args."""
    return LocalServer([*args, "--log-level", "WARNING"], threads=threads or 0, startup_timeout_s=timeout).start()
