"""`regenerate` of ShareGPT first turns against two local SmolLM2 servers (HF backend, batched
generation), optionally killing one with SIGKILL a third of the way through.

    python -m benchmarks.bench_regenerate --n 48 --m 64 --kill      # a few minutes on 2 shared cores
    python -m benchmarks.bench_regenerate --smoke                   # tiny model and chats, seconds

Reports generated tokens/s, each server's idle share (time with no request of this job in flight,
seen from the client, between its first and last request), and the accounting: every
conversation written exactly once (or skipped with a reason).
"""

from __future__ import annotations

import argparse
import json
import signal
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.harness import Server, markdown_table, write_results


def first_turns(conversations: Path, n: int, out: Path) -> int:
    rows = []
    with conversations.open(encoding="utf-8") as f:  # not splitlines(): it also splits at U+2028 inside strings
        lines = list(f)
    for line in lines:
        msgs = json.loads(line)["messages"]
        if len(msgs) >= 2 and msgs[0]["role"] == "user" and msgs[1]["role"] == "assistant":
            rows.append({"messages": msgs[:2]})
        if len(rows) == n:
            break
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--n", type=int, default=48, help="ShareGPT first turns")
    ap.add_argument("--m", type=int, default=64, help="max new tokens")
    ap.add_argument("--kill", action="store_true", help="SIGKILL the second server a third of the way through")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from draft_trainer import assets
    from draft_trainer.data.prepare import PrepareConfig, prepare_data
    from draft_trainer.regenerate import RegenerateConfig, regenerate

    work = Path(tempfile.mkdtemp(prefix="bench-regen-"))
    if args.smoke:
        model = assets.build_tiny_model(work / "tiny", "llama")
        src = work / "chats.jsonl"
        src.write_text("".join(json.dumps(c) + "\n" for c in assets.tiny_conversations(24, seed=1)))
        args.n, args.m, name, dtype = 12, 8, "regenerate_smoke", "fp32"
    else:
        model, src, name, dtype = assets.fetch_smollm2(install=False), assets.locate_sharegpt(install=False), \
            "regenerate", "bf16"
    prepare_data(PrepareConfig(model=str(model), inputs=[str(src)], output=str(work / "all"), max_length=1024,
                               min_supervised_tokens=1, skip_bad=True, max_samples=4 * args.n), progress=False)
    n = first_turns(work / "all" / "conversations.jsonl", args.n, work / "first.jsonl")
    prepare_data(PrepareConfig(model=str(model), inputs=[str(work / "first.jsonl")], output=str(work / "ds"),
                               max_length=1024, min_supervised_tokens=1, skip_bad=True), progress=False)
    n = len((work / "ds" / "conversations.jsonl").read_text().splitlines())
    servers = [Server("--model", str(model), "--dtype", dtype, "--max-batch-tokens", "65536", "--max-length", "2048",
                      threads=1) for _ in range(2)]
    out = work / "regen.jsonl"
    cfg = RegenerateConfig(targets=[s.endpoint for s in servers], input=str(work / "ds"), output=str(out),
                           max_new_tokens=args.m, batch_size=16, concurrency=2, progress=False)
    result: dict = {}
    killed_at = None
    t = threading.Thread(target=lambda: result.setdefault("report", regenerate(cfg)), daemon=True)
    try:
        t0 = time.perf_counter()
        t.start()
        while t.is_alive():
            if args.kill and killed_at is None and out.exists() and \
                    len(out.read_text().splitlines()) >= max(1, n // 3):
                servers[1].proc.send_signal(signal.SIGKILL)
                killed_at = time.perf_counter() - t0
            time.sleep(0.05)
        t.join()
    finally:
        for s in servers:
            s.proc.send_signal(signal.SIGKILL)
            s.stop()
    rep = result["report"]
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    accounted = rep["written"] + sum(rep["skipped"].values())
    rows = [{"server": f"s{k}" + (" (killed)" if k == 1 and killed_at else ""), **{
        key: rep["per_server"][s.endpoint][key] for key in ("requests", "prompts", "tokens", "idle_share")}}
        for k, s in enumerate(servers)]
    table = markdown_table(rows, ["server", "requests", "prompts", "tokens", "idle_share"]) + \
        f"\n\n{n} first turns, max {args.m} new tokens, {model.name} {dtype}, 2 servers on this machine: " \
        f"**{rep['tokens_per_s']:.0f} generated tokens/s**, {rep['wall_s']:.0f} s. " + \
        (f"Server s1 killed with SIGKILL at {killed_at:.0f} s. " if killed_at else "") + \
        f"Accounted: {accounted} of {n} ({rep['written']} written, skipped {rep['skipped']}); " \
        f"{len(ids)} lines, {len(set(ids))} distinct ids."
    write_results(name, {"report": rep, "n": n, "m": args.m, "killed_at_s": killed_at,
                         "lines": len(ids), "distinct_ids": len(set(ids))}, table,
                  out_dir=Path(args.out) if args.out else None)
    return 0 if accounted == n and len(ids) == len(set(ids)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
