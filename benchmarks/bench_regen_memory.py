"""The demo's regeneration servers, this checkout against another revision: each server's peak RSS,
generated tokens/s, and whether both wrote the same answers.

    python -m benchmarks.bench_regen_memory --compare-rev 216799e --n 128 --repeats 2   # ~10 min on 2 cores
    python -m benchmarks.bench_regen_memory --compare-rev 49fb791 --n 250 --max-batch-tokens 32768,16384
    python -m benchmarks.bench_regen_memory --smoke                                   # tiny model, a minute

The job is the demo's on-policy regeneration (`draft_trainer/onpolicy.py`): two single-threaded HF servers
with that revision's `REGEN_MAX_BATCH_TOKENS` (65536 where it has none; this tree's can be replaced by a
list, one variant each), requests of 32 prompts, 2 in flight per server, greedy answers of at most --m
tokens to the first turns of ShareGPT chats. The variants run one after the other, alternating (this tree,
the other, this tree, ...), each in a fresh process whose servers import that tree's code (the other
revision is checked out in a temporary `git worktree`). Peak RSS is each server's VmHWM, read just before
it is stopped.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve()


def worker(tree: str, model: str, data: str, out: str, m: int, dtype: str, max_batch_tokens: str) -> dict:
    """One regeneration with servers started from `tree` (first on sys.path, so LocalServer runs its code)."""
    sys.path.insert(0, tree)
    from benchmarks.harness import Server, rss_kib
    from draft_trainer.regenerate import RegenerateConfig, regenerate

    servers = [Server("--model", model, "--dtype", dtype, "--max-batch-tokens", max_batch_tokens, "--max-length",
                      "4096", threads=1) for _ in range(2)]
    try:
        rep = regenerate(RegenerateConfig(targets=[s.endpoint for s in servers], input=data, output=out,
                                          max_new_tokens=m, batch_size=32, concurrency=2, progress=False))
        peaks = [rss_kib(s.proc.pid)["VmHWM"] // 1024 for s in servers]
    finally:
        for s in servers:
            s.stop()
    return {"written": rep["written"], "tokens": rep["tokens_generated"], "tokens_per_s": rep["tokens_per_s"],
            "wall_s": rep["wall_s"], "peak_rss_mb": peaks}


def regen_budget(tree: Path) -> int:
    """The revision's regeneration batch budget (65536 before it was a named setting)."""
    m = re.search(r"^REGEN_MAX_BATCH_TOKENS = (\d+)", (tree / "draft_trainer" / "onpolicy.py").read_text(), re.M)
    return int(m.group(1)) if m else 65536


def answers(path: Path) -> dict[str, str]:
    return {r["id"]: json.dumps(r["messages"]) for r in map(json.loads, path.read_text().splitlines())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--compare-rev", default="HEAD", help="the other revision (default HEAD: this tree's commit)")
    ap.add_argument("--n", type=int, default=128, help="ShareGPT first turns")
    ap.add_argument("--m", type=int, default=128, help="max new tokens (the demo's)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-batch-tokens", default=None,
                    help="this tree's server budget(s), comma-separated, one variant each (default: its own setting)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--name", default=None)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--worker", nargs=7,
                    metavar=("TREE", "MODEL", "DATA", "OUT", "M", "DTYPE", "MAX_BATCH_TOKENS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        tree, model, data, out, m, dtype, mbt = args.worker
        print(json.dumps(worker(tree, model, data, out, int(m), dtype, mbt)))
        return 0

    from benchmarks.harness import REPO, markdown_table, write_results
    from common.hardware import pick_dtype
    from draft_trainer import assets
    from draft_trainer.data.prepare import PrepareConfig, prepare_data
    from draft_trainer.onpolicy import first_turns

    work = Path(tempfile.mkdtemp(prefix="bench-regen-mem-"))
    if args.smoke:
        model = assets.build_tiny_model(work / "tiny", "llama")
        src = work / "chats.jsonl"
        src.write_text("".join(json.dumps(c) + "\n" for c in assets.tiny_conversations(24, seed=1)))
        args.n, args.m, args.repeats, dtype = 12, 8, 1, "fp32"
    else:
        model, src, dtype = assets.fetch_smollm2(install=False), assets.locate_sharegpt(install=False), pick_dtype("auto")
    # The demo's prompts: first turns of chats prepared at its length, tokenized as onpolicy.py does.
    prepare_data(PrepareConfig(model=str(model), inputs=[str(src)], output=str(work / "all"), max_length=512,
                               min_supervised_tokens=1, skip_bad=True, max_samples=4 * args.n), progress=False)
    first_turns(work / "all" / "conversations.jsonl", args.n, work / "first.jsonl")
    prepare_data(PrepareConfig(model=str(model), inputs=[str(work / "first.jsonl")], output=str(work / "ds"),
                               max_length=2048, min_supervised_tokens=1, skip_bad=True), progress=False)
    other = work / "other_tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(other), args.compare_rev], cwd=REPO, check=True,
                   capture_output=True)
    rev = subprocess.run(["git", "rev-parse", "--short", args.compare_rev], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout.strip()
    mine = [int(x) for x in args.max_batch_tokens.split(",")] if args.max_batch_tokens else [regen_budget(REPO)]
    theirs = regen_budget(other)
    variants = [(f"this tree, {b}", REPO, b) for b in mine] + [(f"at {rev}, {theirs}", other, theirs)]
    runs: list[dict] = []
    try:
        for rep in range(args.repeats):
            for label, tree, budget in variants:
                out = work / f"regen_{len(runs)}.jsonl"
                proc = subprocess.run([sys.executable, str(HERE), "--worker", str(tree), str(model), str(work / "ds"),
                                       str(out), str(args.m), dtype, str(budget)], capture_output=True, text=True,
                                      cwd=tree)
                if proc.returncode:
                    raise SystemExit(f"{label}: worker failed\n{proc.stderr[-3000:]}")
                runs.append({"variant": label, "repeat": rep + 1, **json.loads(proc.stdout.strip().splitlines()[-1]),
                             "out": out})
                print(runs[-1], flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(other)], cwd=REPO, capture_output=True)
    reference = answers(runs[0]["out"])
    for r in runs:
        r["same_answers"] = answers(r.pop("out")) == reference
        r["peak_rss_mb"] = "/".join(map(str, r["peak_rss_mb"]))
    table = markdown_table(runs, ["variant", "repeat", "written", "tokens", "tokens_per_s", "wall_s", "peak_rss_mb",
                                  "same_answers"])
    table += (f"\n\n{args.n} ShareGPT first turns, at most {args.m} new tokens, {Path(model).name} in {dtype}, two "
              f"single-threaded servers (--max-batch-tokens after the variant's name), 32 prompts per request, "
              f"2 in flight per server: the demo's regeneration. Variants alternate, one at a time; peak_rss_mb: each server's VmHWM.")
    write_results(args.name or ("regen_memory_smoke" if args.smoke else "regen_memory"),
                  {"compare_rev": rev, "n": args.n, "m": args.m, "dtype": dtype, "runs": runs}, table,
                  out_dir=Path(args.out) if args.out else None)
    return 0 if all(r["same_answers"] for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
