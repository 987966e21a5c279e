"""Data plane: the synthetic backend's feature stream through the full SpecRelay path, vs a raw
`pyarrow.flight` DoGet of the same record batches (target >= 0.8x), vs a gRPC stream of the
same bytes in protobuf `bytes` messages (target >= 2x).

    python -m benchmarks.bench_dataplane            # H=4096 bf16 (Llama-3-8B-sized features)
    python -m benchmarks.bench_dataplane --smoke

- ours: `TargetClient.features` against `target-server --backend synthetic` (cost 0): request
  parsing, scheduling, the synthetic forward, chunking, Arrow encoding, Flight, zero-copy decode
  and sample reassembly.
- raw Flight: a bare FlightServerBase replaying, for every DoGet, the exact record batches our
  server sent for one request (fetched from it once); the client only reads the batches.
- gRPC bytes: a grpcio server streaming those batches' IPC bytes as `TensorChunk.data`
  (protobuf) messages; the client decodes each message and takes a numpy view.
One request at a time on each path; rounds alternate between the paths; medians reported.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

import numpy as np

from benchmarks.harness import REPO, Server, env, markdown_table, median, write_results

GRPC_METHOD = "/specrelay.bench.Bytes/Stream"
GRPC_OPTIONS = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]


def feature_ticket(request_index: int, samples: int, seq_len: int, vocab: int) -> bytes:
    from common.rpc import target_pb2 as pb

    ids = [(request_index * 7919 + i * 31) % vocab for i in range(samples * seq_len)]
    return pb.FeatureRequest(request_id=f"bench-{request_index}", sample_ids=list(range(samples)), token_ids=ids,
                             lengths=[seq_len] * samples, feature_schema_version=1,
                             client_id="bench").SerializeToString()


# ------------------------------------------------------------------ baseline servers (subprocess)

def serve_baselines(source_flight: str, ticket_hex: str, ready_file: str) -> None:
    import grpc
    import pyarrow as pa
    import pyarrow.flight as flight

    from common.rpc import target_pb2 as pb

    src = flight.FlightClient(source_flight)
    reader = src.do_get(flight.Ticket(bytes.fromhex(ticket_hex)))
    schema = reader.schema
    batches = []
    while True:
        try:
            batches.append(reader.read_chunk().data)
        except StopIteration:
            break
    src.close()

    class Raw(flight.FlightServerBase):
        def do_get(self, context, ticket):
            return flight.GeneratorStream(schema, iter(batches))

    raw = Raw("grpc://127.0.0.1:0")
    blobs = [b.serialize().to_pybytes() for b in batches]
    messages = [pb.TensorChunk(data=blob, offset=i, total_bytes=len(blob)) for i, blob in enumerate(blobs)]

    def stream(_request, _context):
        yield from messages

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=GRPC_OPTIONS)
    handler = grpc.method_handlers_generic_handler("specrelay.bench.Bytes", {
        "Stream": grpc.unary_stream_rpc_method_handler(stream, request_deserializer=None,
                                                       response_serializer=pb.TensorChunk.SerializeToString)})
    server.add_generic_rpc_handlers((handler,))
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    info = {"flight_port": raw.port, "grpc_port": grpc_port, "batches": len(batches),
            "arrow_bytes": sum(b.nbytes for b in batches), "ipc_bytes": sum(map(len, blobs))}
    tmp = ready_file + ".tmp"
    Path(tmp).write_text(json.dumps(info))
    Path(tmp).replace(ready_file)
    raw.serve()


# ------------------------------------------------------------------ clients (this process)

def run_ours(client, tickets_args) -> float:
    t0 = time.perf_counter()
    for sample_ids, seqs in tickets_args:
        n = 0
        for f in client.features(sample_ids, seqs):
            n += f.aux_T3H.shape[0]
        assert n == sum(map(len, seqs))
    return time.perf_counter() - t0


def run_raw(location: str, n_requests: int) -> float:
    import pyarrow.flight as flight

    fc = flight.FlightClient(location)
    t0 = time.perf_counter()
    for _ in range(n_requests):
        reader = fc.do_get(flight.Ticket(b"x"))
        while True:
            try:
                reader.read_chunk()
            except StopIteration:
                break
    dt = time.perf_counter() - t0
    fc.close()
    return dt


def run_grpc(port: int, n_requests: int) -> float:
    import grpc

    from common.rpc import target_pb2 as pb

    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS)
    call = channel.unary_stream(GRPC_METHOD, request_serializer=None, response_deserializer=pb.TensorChunk.FromString)
    t0 = time.perf_counter()
    for _ in range(n_requests):
        for msg in call(b"", timeout=600):
            np.frombuffer(msg.data, dtype=np.uint8)
    dt = time.perf_counter() - t0
    channel.close()
    return dt


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sample")
    p.add_argument("--samples", type=int, default=4, help="samples per request")
    p.add_argument("--requests", type=int, default=16, help="requests per round and path")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--serve-baselines", nargs=3, metavar=("SOURCE", "TICKET_HEX", "READY"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.serve_baselines:
        serve_baselines(*a.serve_baselines)
        return {}
    if a.smoke:
        a.hidden, a.seq_len, a.samples, a.requests, a.rounds = 256, 64, 2, 2, 1
    from draft_trainer.client.target import TargetClient

    vocab = 512
    ours = Server("--backend", "synthetic", "--synthetic-hidden-size", str(a.hidden), "--dtype", a.dtype,
                  "--synthetic-vocab-size", str(vocab), "--max-batch-tokens", str(a.samples * a.seq_len),
                  "--max-request-tokens", str(1 << 22), "--max-queue-tokens", str(1 << 22))
    tmp = Path(tempfile.mkdtemp(prefix="specrelay-bench-"))
    ready = tmp / "baselines.json"
    baselines = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.bench_dataplane", "--serve-baselines",
         f"grpc://127.0.0.1:{ours.flight_port}", feature_ticket(0, a.samples, a.seq_len, vocab).hex(), str(ready)],
        env=env(), cwd=REPO, stdout=open(tmp / "baselines.log", "wb"), stderr=subprocess.STDOUT)
    client = TargetClient(ours.endpoint, timeout_s=600)
    try:
        end = time.monotonic() + 120
        while not ready.is_file():
            if baselines.poll() is not None or time.monotonic() > end:
                raise RuntimeError((tmp / "baselines.log").read_text()[-3000:])
            time.sleep(0.1)
        base = json.loads(ready.read_text())
        raw_loc = f"grpc://127.0.0.1:{base['flight_port']}"
        from common.rpc import target_pb2 as pb

        reqs = []
        for i in range(a.requests):
            msg = pb.FeatureRequest.FromString(feature_ticket(i, a.samples, a.seq_len, vocab))
            ids = list(msg.token_ids)
            reqs.append((list(msg.sample_ids), [ids[j * a.seq_len:(j + 1) * a.seq_len] for j in range(a.samples)]))
        run_ours(client, reqs[:1]), run_raw(raw_loc, 1), run_grpc(base["grpc_port"], 1)  # warm-up
        times = {"ours": [], "raw": [], "grpc": []}
        for r in range(a.rounds):
            order = [("ours", lambda: run_ours(client, reqs)), ("raw", lambda: run_raw(raw_loc, a.requests)),
                     ("grpc", lambda: run_grpc(base["grpc_port"], a.requests))]
            for name, fn in (order if r % 2 == 0 else order[::-1]):
                times[name].append(fn())
            print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()))
    finally:
        client.close()
        baselines.kill()
        baselines.wait(timeout=30)
        ours.stop()
    nbytes = base["arrow_bytes"] * a.requests
    gbs = {k: [nbytes / t / 1e9 for t in v] for k, v in times.items()}
    med = {k: median(v) for k, v in gbs.items()}
    tokens = a.requests * a.samples * a.seq_len
    rows = [
        {"path": "SpecRelay (synthetic server, TargetClient)", "GB/s": f"{med['ours']:.2f}",
         "tokens/s": f"{tokens * med['ours'] / (nbytes / 1e9):.0f}", "ratio": "1"},
        {"path": "raw pyarrow.flight DoGet, same batches", "GB/s": f"{med['raw']:.2f}", "tokens/s": "",
         "ratio": f"**{med['ours'] / med['raw']:.2f}x** of raw (target >= 0.8)"},
        {"path": "gRPC stream, protobuf bytes messages", "GB/s": f"{med['grpc']:.2f}", "tokens/s": "",
         "ratio": f"**{med['ours'] / med['grpc']:.2f}x** faster (target >= 2)"},
    ]
    desc = (f"H={a.hidden} {a.dtype}, {a.samples} samples x {a.seq_len} tokens per request "
            f"({base['arrow_bytes'] / 2**20:.1f} MiB in {base['batches']} record batches), {a.requests} requests "
            f"per round, {a.rounds} rounds, one request at a time, client and servers on the same host (loopback).")
    table = desc + "\n\n" + markdown_table(rows, ["path", "GB/s", "tokens/s", "ratio"])
    data = {"config": vars(a), "bytes_per_round": nbytes, "seconds": times, "gb_per_s": gbs, "median_gb_per_s": med,
            "ratio_vs_raw_flight": med["ours"] / med["raw"], "ratio_vs_grpc_bytes": med["ours"] / med["grpc"],
            "targets": {"vs_raw_flight": 0.8, "vs_grpc_bytes": 2.0}, "batches_per_request": base["batches"]}
    write_results("dataplane" + ("_smoke" if a.smoke else ""), data, table, a.out)
    return data


if __name__ == "__main__":
    main()
