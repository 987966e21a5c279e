"""Data plane: the synthetic backend's feature stream through the full SpecRelay path, vs a raw
`pyarrow.flight` DoGet of the same record batches (target >= 0.8x), vs a gRPC stream of the
same bytes in protobuf `bytes` messages (target >= 2x).

    python -m benchmarks.bench_dataplane            # H=4096 bf16 (Llama-3-8B-sized features)
    python -m benchmarks.bench_dataplane --smoke

All processes apply `common.memory.tune_malloc()` (as both CLIs do).
- ours: `TargetClient.features` against `target-server --backend synthetic` (cost 0): request
  parsing, scheduling, the synthetic forward, chunking, Arrow encoding, Flight, zero-copy decode
  and sample reassembly.
- raw Flight: a bare FlightServerBase replaying, for every DoGet, the exact record batches our
  server sent for one request (fetched from it once); the client only reads the batches.
- gRPC bytes: a grpcio server streaming those batches' IPC bytes as `TensorChunk.data`
  (protobuf) messages of at most 4 MiB (gRPC's default message limit, and where protobuf
  decoding does best); the client decodes each message and takes a numpy view.
- fp8 (`--fp8`): aux and teacher asked as float8_e4m3 (per-token scales; the server casts, the
  client keeps the e4m3 bytes + scales as Arrow views), side by side with the default wire dtype
  in the same rounds, bytes per token and tokens/s measured to the same point on both:
    rows   the client's delivered samples (TargetClient.features; fp8: Fp8Rows, nothing decoded)
    batch  the trainer's padded fp32 batch built from them (collate: bf16 cast-copied in, fp8
           upcast in that same copy), i.e. where training can start on CPU
  and again with the server's work taken out ("replay": a bare Flight server replays the batches
  our server sent, bf16 or fp8, as a GPU server that casts on its device would; the client decodes,
  reassembles and collates): the trainer side alone. "fp8 decoded" replays fp8 but decodes in the
  client first and then collates (the earlier design: a served-dtype copy, then the batch copy).
`--inflight` requests are open at a time on each path (1: pure per-stream cost; 2: as a
trainer's dispatcher runs it); rounds alternate between the paths; medians reported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

import numpy as np

from benchmarks.harness import REPO, Server, env, markdown_table, median, run_parallel, write_results

GRPC_METHOD = "/specrelay.bench.Bytes/Stream"
GRPC_MESSAGE_BYTES = 4 << 20
GRPC_OPTIONS = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]


FP8_ALL = {"aux": "float8_e4m3", "teacher": "float8_e4m3"}


def feature_ticket(request_index: int, samples: int, seq_len: int, vocab: int, tensor_dtypes=None) -> bytes:
    from common.rpc import target_pb2 as pb

    ids = [(request_index * 7919 + i * 31) % vocab for i in range(samples * seq_len)]
    return pb.FeatureRequest(request_id=f"bench-{request_index}", sample_ids=list(range(samples)), token_ids=ids,
                             lengths=[seq_len] * samples, feature_schema_version=1,
                             client_id="bench", tensor_dtypes=tensor_dtypes or {}).SerializeToString()


def wire_bytes(flight_location: str, ticket: bytes) -> int:
    """Arrow bytes of one request's record batches, as sent (one DoGet, read raw)."""
    import pyarrow.flight as flight

    client = flight.FlightClient(flight_location)
    try:
        return sum(chunk.data.nbytes for chunk in client.do_get(flight.Ticket(ticket)))
    finally:
        client.close()


# ------------------------------------------------------------------ baseline servers (subprocess)

def serve_baselines(source_flight: str, ticket_hex: str, ready_file: str) -> None:
    import grpc
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
    messages = [pb.TensorChunk(data=blob[o : o + GRPC_MESSAGE_BYTES], offset=o, total_bytes=len(blob))
                for blob in blobs for o in range(0, len(blob), GRPC_MESSAGE_BYTES)]

    def stream(_request, _context):
        yield from messages

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=GRPC_OPTIONS)
    handler = grpc.method_handlers_generic_handler("specrelay.bench.Bytes", {
        "Stream": grpc.unary_stream_rpc_method_handler(stream, request_deserializer=None,
                                                       response_serializer=pb.TensorChunk.SerializeToString)})
    server.add_generic_rpc_handlers((handler,))
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    info = {"flight_port": raw.port, "grpc_port": grpc_port, "batches": len(batches), "grpc_messages": len(messages),
            "arrow_bytes": sum(b.nbytes for b in batches), "ipc_bytes": sum(map(len, blobs))}
    tmp = ready_file + ".tmp"
    Path(tmp).write_text(json.dumps(info))
    Path(tmp).replace(ready_file)
    raw.wait()   # not serve(): it can end a call already in flight with no data (tests/unit/test_features.py)


# ------------------------------------------------------------------ clients (this process)

def _deliver(feats: list, to_batch) -> int:
    """Tokens delivered; to_batch True: the trainer's padded fp32 batch (CPU) is built from them
    first; "staged": what leaves the host for an accelerator is built (fp8: the padded e4m3 bytes +
    scales that collate would move and upcast on the device; the move and the upcast are not run)."""
    import torch

    from common.fp8 import Fp8Rows
    from draft_trainer.data.batch import PaddedRows, collate

    if to_batch == "staged" and isinstance(feats[0].aux_T3H, Fp8Rows):
        T = max(f.length for f in feats)
        for xs in ([f.aux_T3H for f in feats], [f.teacher_TH for f in feats]):
            pad = PaddedRows(len(feats), T, xs[0], torch.float32, fp8=True)
            for b, x in enumerate(xs):
                pad.put(b, x)
        return sum(f.length for f in feats)
    if to_batch:
        samples = [(f.sample_id, np.zeros(f.length, np.int64), np.ones(f.length, np.float32)) for f in feats]
        return collate(samples, feats).num_tokens
    return sum(f.length for f in feats)


def run_ours(endpoint: str, reqs: list, inflight: int, tensor_dtypes=(), to_batch: bool = False) -> float:
    from draft_trainer.client.target import TargetClient

    def one(req, state):
        if "client" not in state:
            state["client"] = TargetClient(endpoint, timeout_s=600)
            state["close"] = [state["client"].close]
        sample_ids, seqs = req
        feats = list(state["client"].features(sample_ids, seqs, tensor_dtypes=tensor_dtypes))
        assert _deliver(feats, to_batch) == sum(map(len, seqs))

    return run_parallel(one, reqs, inflight)


def run_replay(location: str, n_requests: int, inflight: int, tokens: int, to_batch: bool,
               keep_fp8: bool = True) -> float:
    """The client side alone: recorded batches (no server work) decoded, reassembled, maybe collated."""
    import pyarrow.flight as flight

    from common.features import SampleAssembler, decode_batch

    def one(_i, state):
        if "fc" not in state:
            state["fc"] = flight.FlightClient(location)
            state["close"] = [state["fc"].close]
        asm, feats = SampleAssembler(), []
        for chunk in state["fc"].do_get(flight.Ticket(b"x")):
            feats += [f for f in map(asm.add, decode_batch(chunk.data, keep_fp8=keep_fp8)) if f is not None]
        assert _deliver(feats, to_batch) == tokens

    return run_parallel(one, list(range(n_requests)), inflight)


def run_raw(location: str, n_requests: int, inflight: int) -> float:
    import pyarrow.flight as flight

    def one(_i, state):
        if "fc" not in state:
            state["fc"] = flight.FlightClient(location)
            state["close"] = [state["fc"].close]
        reader = state["fc"].do_get(flight.Ticket(b"x"))
        while True:
            try:
                reader.read_chunk()
            except StopIteration:
                break

    return run_parallel(one, list(range(n_requests)), inflight)


def run_grpc(port: int, n_requests: int, inflight: int) -> float:
    import grpc

    from common.rpc import target_pb2 as pb

    def one(_i, state):
        if "call" not in state:
            channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS)
            state["call"] = channel.unary_stream(GRPC_METHOD, request_serializer=None,
                                                 response_deserializer=pb.TensorChunk.FromString)
            state["close"] = [channel.close]
        for msg in state["call"](b"", timeout=600):
            np.frombuffer(msg.data, dtype=np.uint8)

    return run_parallel(one, list(range(n_requests)), inflight)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sample")
    p.add_argument("--samples", type=int, default=4, help="samples per request")
    p.add_argument("--requests", type=int, default=16, help="requests per round and path")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--inflight", type=int, default=1, help="requests open at once on each path")
    p.add_argument("--batch-tokens", type=int, default=0, help="server --max-batch-tokens (0 = one request per pass)")
    p.add_argument("--fp8", action="store_true", help="also run ours with aux+teacher as float8_e4m3, side by side")
    p.add_argument("--client-threads", type=int, default=1,
                   help="torch threads in the client process (1: batch copies are memory-bound, and on a shared "
                        "box more threads than free cores slow torch's copies down, which would favour fp8's numpy upcast)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--serve-baselines", nargs=3, metavar=("SOURCE", "TICKET_HEX", "READY"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    load_start = os.getloadavg()[0]
    # Every process here uses the allocator settings the server and trainer CLIs apply, so the
    # paths differ only in what they do, not in how malloc treats their buffers.
    from common.memory import tune_malloc

    tune_malloc()
    if a.serve_baselines:
        serve_baselines(*a.serve_baselines)
        return {}
    import torch

    torch.set_num_threads(a.client_threads)
    if a.smoke:
        a.hidden, a.seq_len, a.samples, a.requests, a.rounds = 256, 64, 2, 2, 1
    vocab = 512
    ours = Server("--backend", "synthetic", "--synthetic-hidden-size", str(a.hidden), "--dtype", a.dtype,
                  "--synthetic-vocab-size", str(vocab), "--max-batch-tokens", str(a.batch_tokens or a.samples * a.seq_len),
                  "--max-request-tokens", str(1 << 22), "--max-queue-tokens", str(1 << 22))
    tmp = Path(tempfile.mkdtemp(prefix="specrelay-bench-"))
    procs = []

    def start_baselines(tag: str, tensor_dtypes=None) -> dict:
        """A subprocess replaying (Flight and gRPC) the batches our server sent for request 0."""
        ready = tmp / f"baselines{tag}.json"
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "benchmarks.bench_dataplane", "--serve-baselines", f"grpc://127.0.0.1:{ours.flight_port}",
             feature_ticket(0, a.samples, a.seq_len, vocab, tensor_dtypes).hex(), str(ready)],
            env=env(), cwd=REPO, stdout=open(tmp / f"baselines{tag}.log", "wb"), stderr=subprocess.STDOUT))
        end = time.monotonic() + 120
        while not ready.is_file():
            if procs[-1].poll() is not None or time.monotonic() > end:
                raise RuntimeError((tmp / f"baselines{tag}.log").read_text()[-3000:])
            time.sleep(0.1)
        return json.loads(ready.read_text())

    try:
        base = start_baselines("")
        raw_loc = f"grpc://127.0.0.1:{base['flight_port']}"
        from common.rpc import target_pb2 as pb

        reqs = []
        for i in range(a.requests):
            msg = pb.FeatureRequest.FromString(feature_ticket(i, a.samples, a.seq_len, vocab))
            ids = list(msg.token_ids)
            reqs.append((list(msg.sample_ids), [ids[j * a.seq_len:(j + 1) * a.seq_len] for j in range(a.samples)]))
        n = a.inflight
        run_ours(ours.endpoint, reqs[:n], n), run_raw(raw_loc, n, n), run_grpc(base["grpc_port"], n, n)  # warm-up
        times = {"ours": [], "raw": [], "grpc": []}
        order = [("ours", lambda: run_ours(ours.endpoint, reqs, n)), ("raw", lambda: run_raw(raw_loc, a.requests, n)),
                 ("grpc", lambda: run_grpc(base["grpc_port"], a.requests, n))]
        tokens_per_request = a.samples * a.seq_len
        if a.fp8:
            src = f"grpc://127.0.0.1:{ours.flight_port}"
            fp8_bytes = wire_bytes(src, feature_ticket(0, a.samples, a.seq_len, vocab, FP8_ALL))
            full_bytes = wire_bytes(src, feature_ticket(0, a.samples, a.seq_len, vocab))
            fp8_loc = f"grpc://127.0.0.1:{start_baselines('_fp8', FP8_ALL)['flight_port']}"
            R = a.requests
            fp8_paths = [
                ("ours_fp8", lambda: run_ours(ours.endpoint, reqs, n, FP8_ALL)),
                ("ours_batch", lambda: run_ours(ours.endpoint, reqs, n, to_batch=True)),
                ("ours_fp8_batch", lambda: run_ours(ours.endpoint, reqs, n, FP8_ALL, to_batch=True)),
                ("replay_rows", lambda: run_replay(raw_loc, R, n, tokens_per_request, False)),
                ("replay_fp8_rows", lambda: run_replay(fp8_loc, R, n, tokens_per_request, False)),
                ("replay_batch", lambda: run_replay(raw_loc, R, n, tokens_per_request, True)),
                ("replay_fp8_batch", lambda: run_replay(fp8_loc, R, n, tokens_per_request, True)),
                ("replay_fp8_decoded_batch", lambda: run_replay(fp8_loc, R, n, tokens_per_request, True, False)),
                ("replay_fp8_staged", lambda: run_replay(fp8_loc, R, n, tokens_per_request, "staged")),
            ]
            order[1:1] = fp8_paths
            times.update({name: [] for name, _ in fp8_paths})
            run_ours(ours.endpoint, reqs[:n], n, FP8_ALL, to_batch=True)   # warm-up
            run_replay(fp8_loc, n, n, tokens_per_request, True)
        for r in range(a.rounds):
            for name, fn in (order if r % 2 == 0 else order[::-1]):
                times[name].append(fn())
            print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()), flush=True)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=30)
        ours.stop()
    nbytes = base["arrow_bytes"] * a.requests
    gbs = {k: [nbytes / t / 1e9 for t in v] for k, v in times.items() if k in ("ours", "raw", "grpc")}  # bf16 bytes
    med = {k: median(v) for k, v in gbs.items()}
    tokens = a.requests * a.samples * a.seq_len
    tps = {k: tokens / median(v) for k, v in times.items()}
    rows = [
        {"path": "SpecRelay (synthetic server, TargetClient)", "GB/s": f"{med['ours']:.2f}",
         "tokens/s": f"{tokens * med['ours'] / (nbytes / 1e9):.0f}", "ratio": "1"},
        {"path": "raw pyarrow.flight DoGet, same batches", "GB/s": f"{med['raw']:.2f}", "tokens/s": "",
         "ratio": f"**{med['ours'] / med['raw']:.2f}x** of raw (target >= 0.8)"},
        {"path": "gRPC stream, protobuf bytes messages", "GB/s": f"{med['grpc']:.2f}", "tokens/s": "",
         "ratio": f"**{med['ours'] / med['grpc']:.2f}x** faster (target >= 2)"},
    ]
    extra = {}
    if a.fp8:
        per_tok = {"bf16": full_bytes / tokens_per_request, "fp8": fp8_bytes / tokens_per_request}
        rows[0]["bytes/token"] = f"{per_tok['bf16']:.0f}"
        rows[0]["path"] += ", to rows"
        pairs = [("ours", "ours_fp8", "SpecRelay, to delivered rows"),
                 ("ours_batch", "ours_fp8_batch", "SpecRelay, to the padded fp32 batch"),
                 ("replay_rows", "replay_fp8_rows", "client side alone (replayed batches), to rows"),
                 ("replay_batch", "replay_fp8_batch", "client side alone (replayed batches), to the batch"),
                 ("replay_batch", "replay_fp8_decoded_batch", "client side alone, fp8 decoded then collated"),
                 ("replay_batch", "replay_fp8_staged", "client side alone, fp8 staged for an accelerator "
                                                       "(padded bytes + scales; move and device upcast not run)")]
        ratios, fp8_rows = {}, []
        for full, fp8, what in pairs:
            ratios[fp8] = tps[fp8] / tps[full]
            if full != "ours" and fp8 not in ("replay_fp8_decoded_batch", "replay_fp8_staged"):
                fp8_rows.append({"path": f"{what}, {a.dtype}", "tokens/s": f"{tps[full]:.0f}",
                                 "bytes/token": f"{per_tok['bf16']:.0f}", "ratio": "1"})
            fp8_rows.append({"path": f"{what}, aux+teacher float8_e4m3", "tokens/s": f"{tps[fp8]:.0f}",
                             "bytes/token": f"{per_tok['fp8']:.0f}",
                             "ratio": f"**{ratios[fp8]:.2f}x** tokens/s of {a.dtype} (target >= 1.8), "
                                      f"{per_tok['fp8'] / per_tok['bf16']:.2f}x bytes"})
        rows[1:1] = fp8_rows
        extra = {"bytes_per_token": per_tok, "tokens_per_s": tps, "fp8_tokens_ratio": ratios["ours_fp8"],
                 "fp8_ratios": ratios, "load_avg_start": load_start}
    desc = (f"H={a.hidden} {a.dtype}, {a.samples} samples x {a.seq_len} tokens per request "
            f"({base['arrow_bytes'] / 2**20:.1f} MiB in {base['batches']} record batches / {base['grpc_messages']} gRPC "
            f"messages), {a.requests} requests "
            f"per round, {a.rounds} rounds, {a.inflight} request(s) open at a time on each path, client and servers "
            "on the same host (loopback).")
    table = desc + "\n\n" + markdown_table(rows, ["path", "GB/s", "tokens/s"] + (["bytes/token"] if a.fp8 else []) + ["ratio"])
    data = {"config": vars(a), "bytes_per_round": nbytes, "seconds": times, "gb_per_s": gbs, "median_gb_per_s": med,
            "ratio_vs_raw_flight": med["ours"] / med["raw"], "ratio_vs_grpc_bytes": med["ours"] / med["grpc"],
            "targets": {"vs_raw_flight": 0.8, "vs_grpc_bytes": 2.0}, "batches_per_request": base["batches"], **extra}
    name = "dataplane" + (f"_inflight{a.inflight}" if a.inflight != 1 else "") + ("_fp8" if a.fp8 else "") + \
        ("_smoke" if a.smoke else "")
    write_results(name, data, table, a.out)
    return data


if __name__ == "__main__":
    main()
