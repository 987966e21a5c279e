"""SGLang backend vs HF backend: feature tokens/s through the wire, start-up time, memory.

Both target servers run as real processes on 127.0.0.1 with the same model, dtype and CPU; a
client streams the same requests to each, interleaved per request (A B A B ...) so background
load hits both alike; tokens/s is the median over requests (min and max in the JSON). Start-up = process launch -> ready file (imports, weight loading, engine).
Memory = peak RSS (VmHWM) of the server process plus its children.

    bash tests/sglang_lane/setup.sh      # the SGLang CPU venv
    PYTHONPATH=tests/sglang_lane/stubs:. SGLANG_USE_CPU_ENGINE=1 \\
        .venv-sglang/bin/python benchmarks/bench_sglang_backend.py [--smoke] [--model DIR]

Writes benchmarks/results/bench_sglang_backend_<dtype>.json (+ .md) and prints the markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from draft_trainer.client.target import TargetClient  # noqa: E402
from tests.support.procs import start_server  # noqa: E402


def peak_rss_mb(pid: int) -> float:
    """VmHWM of a process and its live children, in MiB (Linux /proc)."""
    def hwm(p: int) -> int:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    total = hwm(pid)
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split() if Path(f"/proc/{pid}/task/{pid}/children").exists() else []:
        total += hwm(int(child))
    return total / 1024


def machine() -> dict:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "note": "shared machine: other jobs may run on the same cores; compare the ratio, not absolutes"}


def workload(vocab: int, n_req: int, per_req: int, seq_len: int) -> list[list[list[int]]]:
    return [[[(r * 7919 + s * 104729 + t * 31) % (vocab - 3) + 3 for t in range(seq_len)] for s in range(per_req)]
            for r in range(n_req)]


def run(args) -> dict:
    import torch

    if args.smoke:
        from draft_trainer.assets.tiny import build_tiny_model

        model = build_tiny_model(Path(tempfile.mkdtemp()) / "tiny-llama", "llama")
        n_req, per_req, seq_len, rounds = 2, 2, 64, 1
    else:
        if args.model:
            model = Path(args.model)
        else:
            from draft_trainer.assets.fetch import fetch_smollm2

            model = fetch_smollm2()
        n_req, per_req, seq_len, rounds = args.requests, args.per_request, args.seq_len, args.rounds
    tmp = Path(tempfile.mkdtemp(prefix="bench-sglang-"))
    common = ["--model", str(model), "--dtype", args.dtype, "--max-batch-tokens", str(per_req * seq_len)]
    servers, startup = {}, {}
    try:
        for name in ("hf", "sglang"):
            t0 = time.perf_counter()
            servers[name] = start_server(tmp, *common, "--backend", name, name=name, timeout=600)
            startup[name] = time.perf_counter() - t0
        clients = {n: TargetClient(s.endpoint, timeout_s=600) for n, s in servers.items()}
        info = clients["hf"].model_info()
        reqs = workload(info.vocab_size, n_req, per_req, seq_len)
        tokens = {n: 0 for n in servers}
        rates: dict[str, list[float]] = {n: [] for n in servers}
        for n, c in clients.items():  # warm-up: first-call costs out of the measurement
            list(c.features([0], [reqs[0][0][:16]]))
        for _ in range(rounds):
            for seqs in reqs:
                for n, c in clients.items():  # interleaved per request: A B A B, so load hits both alike
                    t0 = time.perf_counter()
                    got = list(c.features(list(range(len(seqs))), seqs))
                    dt = time.perf_counter() - t0
                    ntok = sum(f.length for f in got)
                    assert ntok == sum(len(s) for s in seqs)
                    tokens[n] += ntok
                    rates[n].append(ntok / dt)
        rows = {n: {"startup_s": round(startup[n], 2), "tokens_per_s": round(statistics.median(rates[n]), 1),
                    "tokens_per_s_min_max": [round(min(rates[n]), 1), round(max(rates[n]), 1)],
                    "peak_rss_mb": round(peak_rss_mb(servers[n].proc.pid), 1), "tokens": tokens[n]}
                for n in servers}
        for c in clients.values():
            c.close()
    finally:
        for s in servers.values():
            s.stop()
    from importlib.metadata import version

    return {
        "benchmark": "bench_sglang_backend", "smoke": args.smoke, "model": model.name, "dtype": args.dtype,
        "requests_per_round": n_req, "sequences_per_request": per_req, "seq_len": seq_len, "rounds": rounds,
        "sglang": version("sglang"), "machine": machine(), "threads": torch.get_num_threads(), "results": rows,
        "ratio_sglang_over_hf_tokens_per_s": round(rows["sglang"]["tokens_per_s"] / rows["hf"]["tokens_per_s"], 3),
    }


def markdown(res: dict) -> str:
    lines = [f"SGLang vs HF backend, {res['model']} {res['dtype']}, {res['sequences_per_request']} x {res['seq_len']} "
             f"tokens per request, {res['machine']['cores']} cores ({res['machine']['cpu']}), SGLang {res['sglang']}",
             "", "| backend | tokens/s (wire, median) | min-max | start-up s | peak RSS MiB |", "|---|---|---|---|---|"]
    for n, r in res["results"].items():
        lo, hi = r["tokens_per_s_min_max"]
        lines.append(f"| {n} | {r['tokens_per_s']} | {lo}-{hi} | {r['startup_s']} | {r['peak_rss_mb']} |")
    lines.append(f"\nsglang/hf tokens/s ratio: {res['ratio_sglang_over_hf_tokens_per_s']} ({res['machine']['note']})")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model, a few requests (seconds)")
    p.add_argument("--model", default="", help="HF model directory (default: SmolLM2-135M-Instruct from the cache)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--per-request", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)
    res = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "bench_sglang_backend" + ("_smoke" if args.smoke else f"_{args.dtype}")
    tmp = out / f"{name}.json.tmp"
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, out / f"{name}.json")
    md = markdown(res)
    (out / f"{name}.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
