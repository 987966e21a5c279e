"""`regenerate` of ShareGPT first turns against two local SmolLM2 servers (HF backend, batched
generation), optionally killing one with SIGKILL a third of the way through.

    python -m benchmarks.bench_regenerate --n 48 --m 64 --kill      # a few minutes on 2 shared cores
    python -m benchmarks.bench_regenerate --smoke                   # tiny model and chats, seconds
    python -m benchmarks.bench_regenerate --n 128 --m 128 --sizes 8x2,16x4,8x8   # request sizing sweep

Reports generated tokens/s, each server's idle share (time with no request of this job in flight,
seen from the client, between its first and last request), and the accounting: every
conversation written exactly once (or skipped with a reason).

`--sizes BxC,...` runs the same job once per request sizing (B prompts per request, C requests in
flight per server), in turn on the same two servers, and reports tokens/s and each server's mean
decode batch (rows per decode step, from its Prometheus metrics) per sizing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from benchmarks.harness import Server, markdown_table, write_results
from common.hardware import pick_dtype



def batch_rows(server) -> tuple[float, float]:
    """(sum, count) of the server's decode-batch-size histogram (rows per decode step)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    vals = {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines()
                                     if line.startswith("specrelay_target_generate_batch_size_"))}
    return vals.get("specrelay_target_generate_batch_size_sum", 0.0), \
        vals.get("specrelay_target_generate_batch_size_count", 0.0)


def sweep(servers, base_cfg, sizes: list[tuple[int, int]], work: Path, n: int) -> list[dict]:
    """The job once per (batch_size, concurrency), each into its own output file."""
    import dataclasses

    from draft_trainer.regenerate import regenerate

    rows = []
    for b, c in sizes:
        before = [batch_rows(s) for s in servers]
        out = work / f"regen_{len(rows)}_{b}x{c}.jsonl"
        rep = regenerate(dataclasses.replace(base_cfg, output=str(out), batch_size=b, concurrency=c))
        after = [batch_rows(s) for s in servers]
        mean = [(a[0] - b0[0]) / max(a[1] - b0[1], 1) for a, b0 in zip(after, before)]
        rows.append({"sizing": f"{b} x {c}", "rows_in_flight_per_server": b * c, "written": rep["written"],
                     "tokens_per_s": rep["tokens_per_s"], "wall_s": rep["wall_s"],
                     "mean_decode_batch": "/".join(f"{x:.1f}" for x in mean),
                     "idle_share": "/".join(str(v["idle_share"]) for v in rep["per_server"].values())})
        if rep["written"] + sum(rep["skipped"].values()) != n:
            raise SystemExit(f"sizing {b}x{c}: {rep['written']} written + {rep['skipped']} skipped != {n}")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--n", type=int, default=48, help="ShareGPT first turns")
    ap.add_argument("--m", type=int, default=64, help="max new tokens")
    ap.add_argument("--kill", action="store_true", help="SIGKILL the second server a third of the way through")
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per request")
    ap.add_argument("--concurrency", type=int, default=2, help="requests in flight per server")
    ap.add_argument("--sizes", default=None, help="sweep request sizings, e.g. 8x2,16x4 (no --kill)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    sizes = [tuple(int(x) for x in v.split("x")) for v in args.sizes.split(",")] if args.sizes else None
    if sizes and args.kill:
        raise SystemExit("--sizes and --kill: pick one")
    from draft_trainer import assets
    from draft_trainer.data.prepare import PrepareConfig, prepare_data
    from draft_trainer.onpolicy import first_turns
    from draft_trainer.regenerate import RegenerateConfig, regenerate

    work = Path(tempfile.mkdtemp(prefix="bench-regen-"))
    if args.smoke:
        model = assets.build_tiny_model(work / "tiny", "llama")
        src = work / "chats.jsonl"
        src.write_text("".join(json.dumps(c) + "\n" for c in assets.tiny_conversations(24, seed=1)))
        args.n, args.m, name, dtype = 12, 8, "regenerate_smoke", "fp32"
    else:
        model, src, name, dtype = assets.fetch_smollm2(install=False), assets.locate_sharegpt(install=False), \
            "regenerate", pick_dtype("auto")
    prepare_data(PrepareConfig(model=str(model), inputs=[str(src)], output=str(work / "all"), max_length=1024,
                               min_supervised_tokens=1, skip_bad=True, max_samples=4 * args.n), progress=False)
    n = first_turns(work / "all" / "conversations.jsonl", args.n, work / "first.jsonl")
    prepare_data(PrepareConfig(model=str(model), inputs=[str(work / "first.jsonl")], output=str(work / "ds"),
                               max_length=1024, min_supervised_tokens=1, skip_bad=True), progress=False)
    n = (work / "ds" / "conversations.jsonl").read_text(encoding="utf-8").count("\n")
    metrics = ["--metrics-port", "0"] if sizes else []
    servers = [Server("--model", str(model), "--dtype", dtype, "--max-batch-tokens", "65536", "--max-length", "2048",
                      *metrics, threads=1) for _ in range(2)]
    out = work / "regen.jsonl"
    cfg = RegenerateConfig(targets=[s.endpoint for s in servers], input=str(work / "ds"), output=str(out),
                           max_new_tokens=args.m, batch_size=args.batch_size, concurrency=args.concurrency,
                           progress=False)
    if sizes:
        try:
            load0 = os.getloadavg()
            rows = sweep(servers, cfg, sizes, work, n)
            load1 = os.getloadavg()
        finally:
            for s in servers:
                s.stop()
        table = markdown_table(rows, list(rows[0])) + \
            f"\n\n{n} ShareGPT first turns per sizing, max {args.m} new tokens, {model.name} {dtype}, 2 servers " \
            f"(1 torch thread each, --max-batch-tokens 65536), sizings run in turn on the same servers. " \
            f"mean_decode_batch: rows per decode step on s0/s1. Load average (1/5/15 min) before " \
            f"{'/'.join(f'{x:.1f}' for x in load0)}, after {'/'.join(f'{x:.1f}' for x in load1)}."
        write_results(name + "_sizing", {"n": n, "m": args.m, "sizes": rows, "load_before": load0,
                                         "load_after": load1}, table, out_dir=Path(args.out) if args.out else None)
        return 0
    result: dict = {}
    killed_at = None
    t = threading.Thread(target=lambda: result.setdefault("report", regenerate(cfg)), daemon=True)
    try:
        t0 = time.perf_counter()
        t.start()
        while t.is_alive():
            if args.kill and killed_at is None and out.exists() and \
                    out.read_text(encoding="utf-8").count("\n") >= max(1, n // 3):
                servers[1].proc.send_signal(signal.SIGKILL)
                killed_at = time.perf_counter() - t0
            time.sleep(0.05)
        t.join()
    finally:
        for s in servers:
            s.proc.send_signal(signal.SIGKILL)
            s.stop()
    rep = result["report"]
    ids = [json.loads(line)["id"] for line in out.read_text(encoding="utf-8").split("\n") if line.strip()]
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
