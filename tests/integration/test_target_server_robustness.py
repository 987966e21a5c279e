"""Bad input never kills the server: concurrent good and bad clients against one real HF server.

Each bad client gets a clear status for its own request; the good clients, running at the
same time, get every sample, equal to the model's features; afterwards the server is healthy,
nothing is queued or open, and every sample is accounted for in the metrics.
"""

from __future__ import annotations

import random
import socket
import threading
import time
import urllib.request

import pyarrow as pa
import pyarrow.flight as flight
import pytest
import torch

from common import status
from common.rpc import target_pb2 as pb
from draft_trainer.client.target import TargetClient
from target_server.backends.hf import HFBackend
from tests.support.procs import start_server

MAX_LEN = 64
ROUNDS = 4
VANISH_SAMPLES = 64


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("robust"), "--model", str(tiny_llama), "--backend", "hf",
                       "--max-length", str(MAX_LEN), "--max-batch-tokens", "128", "--max-topk", "8",
                       "--metrics-port", "0", "--log-level", "INFO")
    yield srv
    srv.stop()


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {n: float(v) for n, _, v in (ln.rpartition(" ") for ln in text.splitlines() if ln and ln[0] != "#")}


def ticket(**kw) -> flight.Ticket:
    fields = dict(sample_ids=[1], token_ids=[1, 2, 3], lengths=[3], feature_schema_version=1, client_id="bad")
    fields.update(kw)
    return flight.Ticket(pb.FeatureRequest(**fields).SerializeToString())


BAD_TICKETS = {
    "empty sample": (ticket(sample_ids=[1, 2], token_ids=[1, 2], lengths=[2, 0]), "is empty"),
    "id >= vocab": (ticket(token_ids=[1, 10**6, 3]), "out of range"),
    "negative id": (ticket(token_ids=[1, -5, 3]), "out of range"),
    "too long": (ticket(token_ids=[1] * (MAX_LEN + 1), lengths=[MAX_LEN + 1]), "max length"),
    "schema version": (ticket(feature_schema_version=99), "schema version"),
    "wrong dtype": (ticket(expect_dtype="bfloat16"), "expects bfloat16"),
    "lengths mismatch": (ticket(lengths=[5]), "lengths sum"),
    "no samples": (ticket(sample_ids=[], token_ids=[], lengths=[]), "no samples"),
    "duplicate ids": (ticket(sample_ids=[4, 4], lengths=[1, 2]), "duplicate"),
    "topk too large": (ticket(teacher_mode=pb.TEACHER_MODE_TOPK, topk=1000), "topk"),
    "unknown teacher": (ticket(teacher_mode=7), "teacher mode"),
    "garbage bytes": (flight.Ticket(random.Random(0).randbytes(64)), ""),
    "empty ticket": (flight.Ticket(b""), "schema version"),
}


def run_bad(location: str, failures: list, counts: dict) -> None:
    fc = flight.FlightClient(location)
    try:
        for _ in range(ROUNDS):
            for name, (t, text) in BAD_TICKETS.items():
                try:
                    fc.do_get(t, options=flight.FlightCallOptions(timeout=60)).read_all()
                    failures.append(f"{name}: accepted")
                except flight.FlightError as e:
                    c = status.classify(e)
                    if c.code != status.INVALID_ARGUMENT or c.retryable or text not in str(e):
                        failures.append(f"{name}: {c.code} {e}")
                counts["invalid"] += 1
            # Past its deadline: DEADLINE_EXCEEDED, retryable elsewhere.
            try:
                fc.do_get(ticket(deadline_unix_s=time.time() - 5)).read_all()
                failures.append("expired: accepted")
            except flight.FlightError as e:
                if status.classify(e).code != status.DEADLINE_EXCEEDED:
                    failures.append(f"expired: {e}")
            # Methods the server does not offer, with junk.
            for call in (lambda: list(fc.list_flights()), lambda: list(fc.do_action(flight.Action("x", b"\x00")))):
                try:
                    call()
                except (flight.FlightError, pa.ArrowException, NotImplementedError):
                    pass
            try:
                writer, _ = fc.do_put(flight.FlightDescriptor.for_path("x"), pa.schema([("a", pa.int8())]))
                writer.write_batch(pa.record_batch([pa.array([1], pa.int8())], names=["a"]))
                writer.close()
            except (flight.FlightError, pa.ArrowException, NotImplementedError):
                pass
    finally:
        fc.close()


def run_vanishing(location: str, failures: list) -> None:
    """Opens a large request (64 samples, ~32 forward passes), reads one batch, and disconnects."""
    for r in range(ROUNDS):
        fc = flight.FlightClient(location)
        try:
            t = ticket(sample_ids=list(range(VANISH_SAMPLES)),
                       token_ids=[(r * 7 + i) % 300 + 1 for i in range(VANISH_SAMPLES * MAX_LEN)],
                       lengths=[MAX_LEN] * VANISH_SAMPLES, client_id=f"vanish{r}")
            reader = fc.do_get(t)
            reader.read_chunk()
        except Exception as e:  # noqa: BLE001
            failures.append(f"vanish: {e}")
        finally:
            fc.close()


def run_raw_garbage(host: str, ports: list[int]) -> None:
    """Not even gRPC: random bytes on both ports."""
    rng = random.Random(1)
    for _ in range(ROUNDS):
        for port in ports:
            with socket.create_connection((host, port), timeout=10) as s:
                s.sendall(rng.randbytes(4096))
                try:
                    s.recv(100)
                except OSError:
                    pass


def run_good(endpoint: str, idx: int, results: dict, failures: list) -> None:
    client = TargetClient(endpoint, client_id=f"good{idx}", timeout_s=60)
    rng = random.Random(100 + idx)
    try:
        for r in range(ROUNDS):
            seqs = [[rng.randrange(1, 500) for _ in range(rng.randrange(1, MAX_LEN + 1))] for _ in range(3)]
            ids = [idx * 1000 + r * 10 + j for j in range(3)]
            got = {f.sample_id: f for f in client.features(ids, seqs, deadline_s=120)}
            if sorted(got) != ids:
                failures.append(f"good{idx}: got {sorted(got)} want {ids}")
            for sid, s in zip(ids, seqs):
                results[sid] = (s, got[sid].aux_T3H.clone(), got[sid].teacher_TH.clone())
    except Exception as e:  # noqa: BLE001
        failures.append(f"good{idx}: {type(e).__name__}: {e}")
    finally:
        client.close()


def test_concurrent_good_and_bad_clients(server, tiny_llama):
    loc = f"grpc://127.0.0.1:{server.flight_port}"
    failures: list[str] = []
    results: dict = {}
    counts = {"invalid": 0}
    threads = [threading.Thread(target=run_good, args=(server.endpoint, i, results, failures)) for i in range(3)]
    threads += [threading.Thread(target=run_bad, args=(loc, failures, counts)),
                threading.Thread(target=run_vanishing, args=(loc, failures)),
                threading.Thread(target=run_raw_garbage, args=("127.0.0.1", [server.grpc_port, server.flight_port]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert not failures, "\n".join(failures)

    # Good clients got the model's features (their samples were packed with others': ~1e-6).
    be = HFBackend(tiny_llama, dtype="fp32", max_length=MAX_LEN)
    assert len(results) == 3 * ROUNDS * 3
    for sid, (seq, aux, teacher) in results.items():
        (ref,) = be.forward([seq], "hidden")
        torch.testing.assert_close(aux, ref.aux_T3H, rtol=0, atol=1e-5)
        torch.testing.assert_close(teacher, ref.teacher_TH, rtol=0, atol=1e-5)

    # The server is alive and idle, and every sample is accounted for.
    client = TargetClient(server.endpoint)
    assert client.healthy()
    assert len(list(client.features([1], [[1, 2]]))) == 1
    client.close()
    accepted = 3 * ROUNDS + 1 + ROUNDS  # good requests, the probe, the vanishing ones
    P = "specrelay_target_"
    end = time.monotonic() + 60
    while True:
        m = scrape(server.metrics_port)
        finished = m[P + 'requests_total{status="ok"}'] + m[P + 'requests_total{status="cancelled"}']
        if m[P + "active_streams"] == 0 and m[P + "queue_tokens"] == 0 and m[P + "held_tokens"] == 0 \
                and finished == accepted:
            break
        assert time.monotonic() < end, {k: v for k, v in m.items() if "requests" in k or "streams" in k}
        time.sleep(0.2)
    # A vanishing client usually leaves mid-stream (cancelled); one the server outran ends ok.
    cancelled_requests = m[P + 'requests_total{status="cancelled"}']
    assert 1 <= cancelled_requests <= ROUNDS
    assert m[P + 'requests_total{status="invalid"}'] == counts["invalid"]
    assert m[P + 'requests_total{status="deadline_exceeded"}'] == ROUNDS
    served = m[P + 'samples_total{outcome="served"}']
    cancelled = m[P + 'samples_total{outcome="cancelled"}']
    assert cancelled >= 1
    assert served + cancelled == 3 * ROUNDS * 3 + 1 + VANISH_SAMPLES * ROUNDS
    assert "Traceback" not in server.log(), server.log()[-4000:]
