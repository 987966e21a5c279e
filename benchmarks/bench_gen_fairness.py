"""Fairness between feature traffic and generation on one server: feature-request latency with a
regeneration-like job running vs without it (synthetic backend: simulated device time per token,
so the figure is about scheduling, not the model).

    python -m benchmarks.bench_gen_fairness            # ~1 min
    python -m benchmarks.bench_gen_fairness --smoke

A trainer-like client sends feature requests one after another (R samples x T tokens); a
generator keeps `--gen-inflight` Generate calls of P prompts x M new tokens open. Phases run
alone / with generation / alone again; the figure is p50 latency with / without (target <= 2x).
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

from benchmarks.harness import markdown_table, median, write_results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--requests", type=int, default=20, help="feature requests per phase")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--cost-us", type=float, default=100.0, help="simulated device time per token")
    ap.add_argument("--gen-prompts", type=int, default=32)
    ap.add_argument("--gen-new", type=int, default=256)
    ap.add_argument("--gen-inflight", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.requests, args.gen_new, args.gen_prompts, name = 4, 32, 8, "gen_fairness_smoke"
    else:
        name = "gen_fairness"
    from draft_trainer.client.target import TargetClient
    from target_server.server import ServerConfig, TargetServer

    server = TargetServer(ServerConfig(backend="synthetic", synthetic_cost_per_token_us=args.cost_us, grpc_port=0,
                                       flight_port=0, max_batch_tokens=1 << 16, max_queue_tokens=1 << 20,
                                       max_request_tokens=1 << 20)).start()
    trainer = TargetClient(f"127.0.0.1:{server.grpc_port}", client_id="trainer")
    seqs = [[(i * 7 + k) % 500 + 1 for k in range(args.tokens)] for i in range(args.samples)]

    def phase() -> list[float]:
        lat = []
        for _ in range(args.requests):
            t0 = time.perf_counter()
            n = sum(1 for _ in trainer.features(list(range(args.samples)), seqs))
            assert n == args.samples
            lat.append(time.perf_counter() - t0)
        return lat

    stop = threading.Event()
    generated = [0]

    def generator() -> None:
        c = TargetClient(f"127.0.0.1:{server.grpc_port}", client_id="regen")
        prompts = [(str(i), [i % 500 + 1, 2, 3, 4]) for i in range(args.gen_prompts)]
        while not stop.is_set():
            outs = c.generate(prompts, max_new_tokens=args.gen_new, stop_token_ids=[-1])
            generated[0] += sum(len(t) for _, t, _ in outs)
        c.close()

    try:
        phase()[:1]  # warm-up
        alone = phase()
        threads = [threading.Thread(target=generator, daemon=True) for _ in range(args.gen_inflight)]
        for t in threads:
            t.start()
        time.sleep(0.5)  # the decode batch is running
        t0 = time.perf_counter()
        g0 = generated[0]
        busy = phase()
        gen_rate = (generated[0] - g0) / (time.perf_counter() - t0)
        stop.set()
        for t in threads:
            t.join(120)
        alone2 = phase()
    finally:
        trainer.close()
        server.shutdown(drain=False)
    base = median(alone + alone2)
    rows = [{"phase": "features alone", "p50_ms": 1000 * base, "max_ms": 1000 * max(alone + alone2)},
            {"phase": "features + generation", "p50_ms": 1000 * median(busy), "max_ms": 1000 * max(busy)}]
    ratio = median(busy) / base
    table = markdown_table(rows, ["phase", "p50_ms", "max_ms"]) + \
        f"\n\nfeature p50 latency with generation / without: **{ratio:.2f}x** (target <= 2x); generation kept " \
        f"{gen_rate:.0f} tokens/s meanwhile. Synthetic backend, {args.cost_us:.0f} us/token; feature requests " \
        f"{args.samples} x {args.tokens} tokens; generation {args.gen_inflight} calls x {args.gen_prompts} prompts x " \
        f"{args.gen_new} new tokens in flight."
    write_results(name, {"alone_s": alone + alone2, "busy_s": busy, "ratio_p50": ratio, "gen_tokens_per_s": gen_rate,
                         "sizes": vars(args)}, table, out_dir=Path(args.out) if args.out else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
