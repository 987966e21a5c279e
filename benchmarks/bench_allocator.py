"""The trainer on glibc vs jemalloc (`SPECRELAY_MALLOC`, common/memory.py): the same `draft-trainer train` run,
the same steps on the same cached features, one process per allocator, both at once (1 torch thread each on the
2 cores, so load and noise fall on both alike).

    # the demo's recipe on the demo's own cached features (a finished demo's runs/demo; any length)
    python -m benchmarks.bench_allocator --demo runs/demo --steps 300
    # synthetic SmolLM2-sized features (a synthetic server fills the cache first, not measured)
    python -m benchmarks.bench_allocator --steps 120
    python -m benchmarks.bench_allocator --smoke      # tiny shapes, seconds: the pipeline works
    # jemalloc returning large allocations' pages at once (its defaults) vs keeping them (`keep_large_pages`)
    python -m benchmarks.bench_allocator --demo runs/demo --steps 300 --pages

Per allocator: tokens per second (steps after the first two, from metrics.jsonl) and per CPU-second, peak RSS
and minor page faults (the process's rusage from wait4), tokens per second by quarter of the run (glibc's heap
slows over a run: docs/notes/issue-20.md), and the largest per-step loss difference between the two (the
allocator must change no number). Needs libjemalloc.so.2 (Debian/Ubuntu: apt-get install libjemalloc2).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_trainer import FULL, SMOKE
from benchmarks.harness import REPO, Server, env, markdown_table, write_results
from benchmarks.parity_handoff import rates_by_part
from common.memory import INSTALL_HINT, find_jemalloc

# the two runs: (label, malloc, trainer settings); --pages compares jemalloc's two page policies instead
SIDES = (("glibc", "glibc", ()), ("jemalloc", "jemalloc", ()))
PAGE_SIDES = (("jemalloc, large pages returned", "jemalloc", ("keep_large_pages=false",)),
              ("jemalloc, large pages kept", "jemalloc", ("keep_large_pages=true",)))
RECIPE = REPO / "draft_trainer" / "configs" / "smollm2_cpu.yaml"


def start(out: Path, overrides: list[str], allocator: str) -> subprocess.Popen:
    options = overrides[:2] if overrides[:1] == ["--config"] else []   # before the KEY=VALUE overrides
    cmd = [sys.executable, "-m", "draft_trainer", "--log-level", "WARNING", "train", *options, f"output_dir={out}",
           "progress=false", "threads=1", *overrides[len(options):]]
    log = open(out.parent / f"{out.name}.log", "w")   # noqa: SIM115 (closed by the child's exit)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                            env={**env(1), "SPECRELAY_MALLOC": allocator})


def finish(proc: subprocess.Popen, out: Path) -> dict:
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"trainer failed ({proc.returncode}):\n{(out.parent / f'{out.name}.log').read_text()[-4000:]}")
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r.get("split", "train") == "train"]
    steady = train[2:] or train
    secs, toks = [r["step_time_s"] for r in steady], [r["tokens"] for r in steady]
    summary = json.loads((out / "summary.json").read_text())
    tokens = sum(r["tokens"] for r in train)
    cpu_s = ru.ru_utime + ru.ru_stime
    return {"allocator": summary["allocator"][0], "steps": len(train), "tokens": tokens,
            "tokens_per_s": sum(toks) / max(sum(secs), 1e-9), "tokens_per_cpu_s": tokens / cpu_s, "cpu_s": cpu_s,
            "sys_share": ru.ru_stime / cpu_s, "minor_faults_per_step": ru.ru_minflt / max(len(train), 1),
            "peak_rss_mb": ru.ru_maxrss / 1024, "tokens_per_s_by_quarter": [round(x) for x in rates_by_part(secs, toks)],
            "losses": [r["loss"] for r in train]}


def demo_overrides(demo: Path) -> list[str]:
    """The demo's recipe, offline on the feature cache a demo run left in DIR/train/features."""
    cache = demo / "train" / "features"
    cfg = demo / "train" / "config.yaml"
    if not (cache / "meta.json").is_file() or not cfg.is_file():
        raise SystemExit(f"--demo {demo}: no feature cache at {cache} (or no {cfg}): run the demo first "
                         "(python -m draft_trainer.demo --output DIR)")
    import yaml

    c = yaml.safe_load(cfg.read_text())
    return ["--config", str(RECIPE), f"data.path={c['data']['path']}", "data.draft_vocab_size=0",
            f"targets.embedded_model={c['targets']['embedded_model']}", f"model.eagle_variant={c['model']['eagle_variant']}",
            f"feature_cache.dir={cache}", "feature_cache.offline=true", "feature_cache.replay=false",
            "optim.schedule=steps", "time_budget_s=0"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", type=Path, default=None, help="a demo's --output: its recipe on its cached features")
    p.add_argument("--steps", type=int, default=120, help="optimizer steps per run")
    p.add_argument("--smoke", action="store_true", help="tiny synthetic shapes (seconds)")
    p.add_argument("--out", type=Path, default=None, help="results directory (default benchmarks/results)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a trainer setting for every run, after the recipe's (e.g. model.method=dflash)")
    p.add_argument("--name", help="results file stem (default: allocator, allocator_demo or allocator_smoke)")
    p.add_argument("--pages", action="store_true",
                   help="compare jemalloc returning the pages of large allocations to the system at once (its "
                        "defaults) with keeping them (trainer setting keep_large_pages), instead of glibc with jemalloc")
    args = p.parse_args(argv)
    if find_jemalloc() is None:
        raise SystemExit(f"bench_allocator: libjemalloc.so.2 not found: {INSTALL_HINT}")
    load_start = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="specrelay-bench-allocator-"))
    try:
        if args.demo:
            source, common = f"demo recipe, cached features of {args.demo}", [*demo_overrides(args.demo), *args.set]
        else:
            d = SMOKE if args.smoke else FULL
            from draft_trainer.assets.tiny import build_synthetic_dataset

            data = build_synthetic_dataset(work / "data", d["samples"], vocab_size=d["V"], min_len=d["min_len"],
                                           max_len=d["max_len"])
            common = [f"data.path={data}", f"data.draft_vocab_size={d['Vd']}", f"model.ttt_steps={d['K']}",
                      f"batch_size={d['batch']}", "optim.lr=1e-4", "epochs=1000", f"feature_cache.dir={work / 'cache'}",
                      *args.set]   # the filling run too: a method's features depend on it (DFlash reads 5 layers)
            server = Server("--backend", "synthetic", "--synthetic-hidden-size", str(d["H"]), "--synthetic-vocab-size",
                            str(d["V"]), "--dtype", "bf16", threads=1)
            try:   # one epoch fills the cache (not measured)
                fill = start(work / "fill", [*common, f"targets.endpoints={server.endpoint}", "epochs=1"], "glibc")
                finish(fill, work / "fill")
            finally:
                server.stop()
            source, common = "synthetic features (cache)", [*common, "feature_cache.offline=true"]
        t0 = time.perf_counter()
        sides = PAGE_SIDES if args.pages else SIDES
        procs = {f"run{i}": start(work / f"run{i}", [*common, f"max_steps={args.steps}", *extra], malloc)
                 for i, (_, malloc, extra) in enumerate(sides)}
        try:
            rows = [{"run": label, **finish(procs[f"run{i}"], work / f"run{i}")} for i, (label, _, _) in enumerate(sides)]
        finally:   # one failed: do not leave the other running
            for proc in procs.values():
                if proc.returncode is None:
                    proc.kill()
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    first, second = rows
    loss_diff = max((abs(a - b) for a, b in zip(first["losses"], second["losses"])), default=0.0)
    vs = "vs_first" if args.pages else "vs_glibc"
    for r in rows:
        r.pop("losses")
        r[f"tokens_per_cpu_s_{vs}"] = r["tokens_per_cpu_s"] / first["tokens_per_cpu_s"]
        r[f"tokens_per_s_{vs}"] = r["tokens_per_s"] / first["tokens_per_s"]
    table = markdown_table(rows, ["run", "allocator", "steps", "tokens", "tokens_per_s", f"tokens_per_s_{vs}",
                                  "tokens_per_cpu_s", f"tokens_per_cpu_s_{vs}", "sys_share",
                                  "minor_faults_per_step", "peak_rss_mb", "tokens_per_s_by_quarter"])
    table += (f"\n\nFeatures: {source}; settings {' '.join(args.set) or 'the recipe'}; {args.steps} steps per run, "
              "both runs at once, 1 thread each; "
              f"largest per-step loss difference {loss_diff:.3g}; load average at start {load_start:.2f}; "
              f"{wall / 60:.1f} min.\n")
    name = args.name or ("allocator_smoke" if args.smoke else ("allocator_demo" if args.demo else "allocator"))
    write_results(name, {"smoke": args.smoke, "source": source, "settings": args.set, "steps": args.steps,
                         "compared": "jemalloc's large pages returned vs kept" if args.pages else "glibc vs jemalloc",
                         "max_loss_diff": loss_diff,
                         "load_avg_start": load_start, "wall_s": wall, "rows": rows}, table, out_dir=args.out)


if __name__ == "__main__":
    main()
