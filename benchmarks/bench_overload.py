"""Overload: 8 concurrent clients offering 4x the server's queue budget at once.

    python -m benchmarks.bench_overload
    python -m benchmarks.bench_overload --smoke

A synthetic server with a simulated device cost per token and `--max-queue-tokens Q`; each of
the 8 clients keeps requests of Q/2 tokens open (4Q offered in total), and like a trainer backs
off by the server's retry hint on RESOURCE_EXHAUSTED and tries again, until it has its samples.
Reported: server RSS idle vs peak (VmHWM), refusals, other errors (must be 0), the server
still healthy at the end, throughput.
"""

from __future__ import annotations

import argparse
import threading
import time

from benchmarks.harness import Server, markdown_table, rss_kib, write_results


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--queue-tokens", type=int, default=16384, help="server --max-queue-tokens (Q)")
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--cost-us", type=float, default=50.0, help="simulated device time per token")
    p.add_argument("--requests-per-client", type=int, default=6)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.smoke:
        a.queue_tokens, a.batch_tokens, a.seq_len, a.hidden, a.requests_per_client = 1024, 256, 64, 64, 2
    from common import status
    from draft_trainer.client.target import TargetClient

    per_request = a.queue_tokens // 2  # 8 clients x Q/2 = 4Q offered at once
    samples = max(1, per_request // a.seq_len)
    server = Server("--backend", "synthetic", "--synthetic-hidden-size", str(a.hidden), "--dtype", "bf16",
                    "--synthetic-cost-per-token-us", str(a.cost_us), "--max-queue-tokens", str(a.queue_tokens),
                    "--max-batch-tokens", str(a.batch_tokens), "--max-request-tokens", str(a.queue_tokens))
    probe = TargetClient(server.endpoint)
    # Idle: after one small request has warmed every path.
    list(probe.features([0], [[1] * a.seq_len]))
    time.sleep(0.5)
    idle = rss_kib(server.proc.pid)
    lock = threading.Lock()
    stats = {"resource_exhausted": 0, "other_errors": [], "samples": 0, "tokens": 0, "max_retry_hint_s": 0.0}
    peak_rss = [idle["VmRSS"]]
    stop_sampling = threading.Event()

    def sample_rss():
        while not stop_sampling.is_set():
            try:
                peak_rss.append(rss_kib(server.proc.pid)["VmRSS"])
            except OSError:
                return
            time.sleep(0.05)

    def client_loop(c: int):
        client = TargetClient(server.endpoint, client_id=f"client{c}", timeout_s=120)
        try:
            for r in range(a.requests_per_client):
                seqs = [[(c * 131 + r * 17 + i * 7 + t) % 500 + 1 for t in range(a.seq_len)] for i in range(samples)]
                ids = list(range(samples))
                while True:
                    try:
                        got = sum(1 for _ in client.features(ids, seqs, deadline_s=300))
                        with lock:
                            stats["samples"] += got
                            stats["tokens"] += got * a.seq_len
                        break
                    except Exception as e:  # noqa: BLE001 - classified below
                        cl = status.classify(e)
                        with lock:
                            if cl.code == status.RESOURCE_EXHAUSTED:
                                stats["resource_exhausted"] += 1
                                stats["max_retry_hint_s"] = max(stats["max_retry_hint_s"], cl.retry_after_s or 0)
                            else:
                                stats["other_errors"].append(f"{cl.code}: {cl.detail[:200]}")
                                return
                        time.sleep(min(cl.retry_after_s or 0.1, 2.0))
        finally:
            client.close()

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    stop_sampling.set()
    peak = rss_kib(server.proc.pid)
    healthy = probe.healthy() and server.alive()
    probe.close()
    code = server.stop()
    offered_bytes = a.queue_tokens * 4 * a.hidden * 2  # the queue budget, as bf16 features
    rows = [
        {"measure": "server RSS idle (MiB)", "value": f"{idle['VmRSS'] / 1024:.0f}"},
        {"measure": "server RSS peak, VmHWM (MiB)", "value": f"{peak['VmHWM'] / 1024:.0f}"},
        {"measure": "peak - idle (MiB)", "value": f"{(peak['VmHWM'] - idle['VmRSS']) / 1024:.0f}"},
        {"measure": "features of one full queue, bf16 (MiB, for scale)", "value": f"{offered_bytes / 2**20:.0f}"},
        {"measure": "RESOURCE_EXHAUSTED refusals", "value": str(stats["resource_exhausted"])},
        {"measure": "largest retry hint (s)", "value": f"{stats['max_retry_hint_s']:.2f}"},
        {"measure": "other errors", "value": str(len(stats["other_errors"]))},
        {"measure": "samples delivered / expected", "value": f"{stats['samples']} / {a.clients * a.requests_per_client * samples}"},
        {"measure": "throughput (tokens/s)", "value": f"{stats['tokens'] / wall:.0f}"},
        {"measure": "server alive and SERVING at the end", "value": str(healthy)},
        {"measure": "server exit status after SIGTERM", "value": str(code)},
    ]
    desc = (f"{a.clients} clients x requests of {samples} x {a.seq_len} tokens (Q/2), Q = --max-queue-tokens "
            f"{a.queue_tokens}: {a.clients * samples * a.seq_len / a.queue_tokens:.0f}x the queue budget offered at "
            f"once; synthetic H={a.hidden} bf16 at {a.cost_us:g} us/token, --max-batch-tokens {a.batch_tokens}.")
    table = desc + "\n\n" + markdown_table(rows, ["measure", "value"])
    data = {"config": vars(a), "idle_rss_kib": idle["VmRSS"], "peak_rss_kib": peak["VmHWM"],
            "sampled_peak_rss_kib": max(peak_rss), "resource_exhausted": stats["resource_exhausted"],
            "other_errors": stats["other_errors"], "samples": stats["samples"],
            "expected_samples": a.clients * a.requests_per_client * samples, "wall_s": wall,
            "healthy_at_end": healthy, "exit_status": code}
    write_results("overload" + ("_smoke" if a.smoke else ""), data, table, a.out)
    return data


if __name__ == "__main__":
    main()
