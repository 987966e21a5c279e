"""Serving overhead: tokens/s through the full Flight path (client in this process, server in
another) vs the same HF backend forward run in-process, same shapes and threads.

    python -m benchmarks.bench_serving            # SmolLM2-135M-shaped random Llama, fp32
    python -m benchmarks.bench_serving --smoke    # tiny model, seconds

Both sides run B samples x T tokens per forward pass. The wire side keeps `--inflight`
requests open (as a trainer's dispatcher does) so the server never idles between requests;
the scheduler's token budget is B*T, so it packs exactly the in-process shapes. Each round
runs both sides back to back (order alternating, ABBA), and the figure is the median of the
per-round ratios: on a shared machine the load drifts between rounds far more than within one.
Both processes use the same allocator settings (`common.memory.tune_malloc`) and torch threads.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import threading
import time
from pathlib import Path

import torch

from benchmarks.harness import Server, markdown_table, median, run_parallel, write_results

SMOLLM2_SHAPE = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                     head_dim=64, intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192,
                     rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)


def shaped_model(dest: Path, shape: dict) -> Path:
    """A random Llama with the given shape (plus the tiny tokenizer), cached; timing only."""
    if (dest / "config.json").is_file():
        return dest
    from transformers import AutoModelForCausalLM, LlamaConfig

    from common.files import replace_dir
    from draft_trainer.assets.tiny import build_tiny_tokenizer

    with replace_dir(dest, "bench shaped model") as tmp:
        build_tiny_tokenizer(tmp)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(LlamaConfig(**shape), dtype=torch.bfloat16)
        model.save_pretrained(tmp)
    return dest


def make_requests(n: int, batch: int, seq_len: int, vocab: int, seed: int) -> list[list[list[int]]]:
    rng = random.Random(seed)
    return [[[rng.randrange(vocab) for _ in range(seq_len)] for _ in range(batch)] for _ in range(n)]


def run_inprocess(backend, requests) -> float:
    """The forwards run on a worker thread, as the server's scheduler runs them: on a loaded
    2-core machine, 2-thread OpenMP forwards issued from the main thread measured ~3x slower
    than the same forwards from a worker thread, which would flatter the wire path."""
    out = []

    def work():
        t0 = time.perf_counter()
        for seqs in requests:
            backend.forward(seqs, "hidden")
        out.append(sum(len(s) for r in requests for s in r) / (time.perf_counter() - t0))

    t = threading.Thread(target=work, name="forward")
    t.start()
    t.join()
    return out[0]


def run_wire(clients: list, requests, inflight: int) -> float:
    """`inflight` workers, each with its own persistent client (connections are set up once)."""

    def one(item, state):
        if "client" not in state:
            state["client"] = c = clients.pop()
            state["close"] = [lambda: clients.append(c)]
        i, seqs = item
        n = sum(1 for _ in state["client"].features(list(range(i * 1000, i * 1000 + len(seqs))), seqs))
        assert n == len(seqs)

    dt = run_parallel(one, list(enumerate(requests)), inflight)
    return sum(len(s) for r in requests for s in r) / dt


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="HF model dir (default: a SmolLM2-135M-shaped random Llama)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=4, help="samples per forward pass (B)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sample (T)")
    p.add_argument("--requests", type=int, default=2, help="requests (of B samples) per round and side")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--inflight", type=int, default=2, help="requests the client keeps open")
    p.add_argument("--threads", type=int, default=2, help="torch threads, both sides")
    p.add_argument("--smoke", action="store_true", help="tiny model and sizes: runs in seconds")
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    a = p.parse_args(argv)
    from common.memory import tune_malloc
    from draft_trainer.assets.fetch import cache_dir
    from draft_trainer.assets.tiny import build_tiny_model

    tune_malloc()  # as the server CLI does
    from target_server.backends.hf import HFBackend

    if a.smoke:
        a.batch, a.seq_len, a.requests, a.rounds = 2, 32, 2, 1
        model = build_tiny_model(Path(tempfile.mkdtemp()) / "tiny", "llama")
        model_desc = "tiny random Llama (H=64, 4 layers)"
    elif a.model:
        model, model_desc = Path(a.model), a.model
    else:
        model = shaped_model(cache_dir() / "bench" / "smollm2-shaped-random", SMOLLM2_SHAPE)
        model_desc = "SmolLM2-135M-shaped random Llama (H=576, 30 layers, vocab 49152)"
    torch.set_num_threads(a.threads)
    backend = HFBackend(model, dtype=a.dtype)
    requests = make_requests(a.requests, a.batch, a.seq_len, backend.vocab_size, seed=0)
    server = Server("--model", str(model), "--backend", "hf", "--dtype", a.dtype,
                    "--max-batch-tokens", str(a.batch * a.seq_len), "--max-queue-tokens", str(1 << 22),
                    "--max-request-tokens", str(1 << 22), threads=a.threads)
    from draft_trainer.client.target import TargetClient

    clients = [TargetClient(server.endpoint, timeout_s=600) for _ in range(a.inflight)]
    try:
        # Warm-up both sides (allocator, threads, connections, first-call paths).
        run_inprocess(backend, requests[:1])
        run_wire(clients, requests[: a.inflight], a.inflight)
        inproc, wire = [], []
        for r in range(a.rounds):
            if r % 2 == 0:
                inproc.append(run_inprocess(backend, requests))
                wire.append(run_wire(clients, requests, a.inflight))
            else:
                wire.append(run_wire(clients, requests, a.inflight))
                inproc.append(run_inprocess(backend, requests))
            print(f"round {r}: in-process {inproc[-1]:.0f} tok/s, wire {wire[-1]:.0f} tok/s, "
                  f"ratio {wire[-1] / inproc[-1]:.3f}")
    finally:
        for c in clients:
            c.close()
        server.stop()
    ratios = [w / i for w, i in zip(wire, inproc)]
    ratio = median(ratios)
    fmt = lambda xs: ", ".join(f"{x:.0f}" for x in xs)  # noqa: E731
    rows = [{"path": "in-process backend.forward", "tokens/s (median)": f"{median(inproc):.0f}", "rounds": fmt(inproc)},
            {"path": "full Flight path (client process)", "tokens/s (median)": f"{median(wire):.0f}", "rounds": fmt(wire)},
            {"path": "**ratio wire / in-process** (median of per-round ratios)", "tokens/s (median)": f"**{ratio:.3f}**",
             "rounds": ", ".join(f"{x:.2f}" for x in ratios) + " (target >= 0.9)"}]
    table = "\n".join([
        f"Model: {model_desc}, {a.dtype}; B={a.batch} x T={a.seq_len} per pass, {a.requests} requests/round, "
        f"{a.inflight} in flight, {a.threads} torch threads per side.", "",
        markdown_table(rows, ["path", "tokens/s (median)", "rounds"])])
    data = {"config": vars(a), "model": model_desc, "inprocess_tok_s": inproc, "wire_tok_s": wire,
            "round_ratios": ratios, "ratio": ratio, "ratio_of_medians": median(wire) / median(inproc),
            "target_ratio": 0.9}
    write_results("serving_overhead" + ("_smoke" if a.smoke else ""), data, table, a.out)
    return data


if __name__ == "__main__":
    main()
