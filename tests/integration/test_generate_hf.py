"""Generation through the scheduler on the HF backend (real tiny Llama): batched KV-cached
decoding with rows joining and leaving between steps equals transformers' own `generate`."""

from __future__ import annotations

import json
import time

import pytest
import torch

from common import status
from common.rpc import target_pb2 as pb
from draft_trainer.client.target import TargetClient
from target_server.backends.hf import HFBackend
from target_server.backends.hf_decode import HFDecoder
from target_server.generation import GenRequest, SamplingParams
from target_server.metrics import ServerMetrics
from target_server.scheduler import Overloaded, Scheduler
from target_server.server import ServerConfig, TargetServer
from tests.support.gen import collect, wait_generated

PROMPTS = [[5, 17, 42, 99, 3], [1, 2, 3], list(range(3, 40)), [7] * 11, [300, 2, 9, 81, 64, 5, 5, 1]]


@pytest.fixture(scope="module")
def backend(tiny_llama):
    return HFBackend(tiny_llama)


def reference(model, prompt: list[int], n: int) -> list[int]:
    """transformers' generate on the prompt alone (no padding): the exact reference."""
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_greedy_equals_transformers_generate_with_ragged_prompts_joining_mid_decode(backend):
    metrics = ServerMetrics()
    s = Scheduler(backend, max_batch_tokens=4096, max_queue_tokens=1 << 20, metrics=metrics)
    s.start()
    try:
        first = GenRequest("a", "c1", PROMPTS[:3], max_new_tokens=24)
        s.submit_generate(first)
        # The second request arrives while the first decodes: its rows join the running batch,
        # and the short 6-token answers leave it before the others finish.
        wait_generated(metrics, 6, timeout=60)
        second = GenRequest("b", "c2", PROMPTS[3:], max_new_tokens=6)
        s.submit_generate(second)
        a, b = collect(first), collect(second)
    finally:
        s.stop()
    for i, p in enumerate(PROMPTS[:3]):
        assert a[i].token_ids == reference(backend.model, p, 24), i
        assert a[i].finish_reason == "length"
    for i, p in enumerate(PROMPTS[3:]):
        assert b[i].token_ids == reference(backend.model, p, 6), i
    assert metrics.gen_tokens._value.get() == 3 * 24 + 2 * 6
    sizes = {s.name: s.value for m in metrics.gen_batch_size.collect() for s in m.samples}
    assert sizes["specrelay_target_generate_batch_size_sum"] > sizes["specrelay_target_generate_batch_size_count"]


def test_the_kv_cache_gauge_counts_the_decode_batch_and_falls_to_zero_after_it(backend):
    metrics = ServerMetrics()
    s = Scheduler(backend, max_batch_tokens=4096, max_queue_tokens=1 << 20, metrics=metrics)
    s.start()
    try:
        r = GenRequest("k", "c", PROMPTS[:2], max_new_tokens=300)
        s.submit_generate(r)
        wait_generated(metrics, 8, timeout=60)
        during = metrics.gen_kv_bytes._value.get()  # ~290 decode steps of the batch are still to come
        collect(r)
    finally:
        s.stop()
    cfg = backend.model.config
    per_column = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    # Two rows at >= 8 columns each, at least; at most the decoder's row and column capacity (8 x 64 at first).
    assert 2 * 8 * per_column <= during <= 8 * 64 * per_column, (during, per_column)
    assert metrics.gen_kv_bytes._value.get() == 0  # the batch emptied: its storage was released


def test_admission_bounds_rows_times_the_longest_reservation_on_the_padded_hf_cache(backend, monkeypatch):
    """HFDecoder gives every row the longest row's columns, so the batch budget bounds rows x the
    longest reservation: beside a 90-token prompt (reservation 100) a 200-token budget runs 2 rows,
    not the 7 that a sum of reservations would let in (100 + 6 x 15)."""
    shapes = []  # (rows, columns attended) of every decode step

    class ShapeLog(HFDecoder):
        def step(self, tokens):
            out = super().step(tokens)
            shapes.append((self.rows, self._L))
            return out

    monkeypatch.setattr(backend, "decoder", lambda: ShapeLog(backend.model, backend.device, backend._lock))
    long, shorts = list(range(3, 93)), [[7, 8 + i, 9, 10, 11] for i in range(8)]
    s = Scheduler(backend, max_batch_tokens=200, max_queue_tokens=1 << 20)
    s.start()
    try:
        r = GenRequest("w", "c", [long] + shorts, max_new_tokens=10)
        s.submit_generate(r)
        outs = collect(r)
    finally:
        s.stop()
    assert max(rows * cols for rows, cols in shapes) <= 200, shapes
    assert max(rows for rows, _ in shapes) == 7  # the 7 shorts left once the long row is done: 7 x 15 fit
    for i, p in enumerate([long] + shorts):
        assert outs[i].token_ids == reference(backend.model, p, 10), i


def test_stop_tokens_stop_strings_and_sampling_seeds(backend):
    s = Scheduler(backend, max_batch_tokens=4096, max_queue_tokens=1 << 20)
    s.start()
    try:
        ref = reference(backend.model, PROMPTS[0], 12)
        stop_tok = ref[4]
        r = GenRequest("s", "c", [PROMPTS[0]], 12, stop_token_ids=frozenset({stop_tok}))
        s.submit_generate(r)
        (c,) = collect(r).values()
        assert c.finish_reason == "stop" and c.token_ids == ref[: ref.index(stop_tok) + 1]
        text = backend.detokenize(ref[5:7])
        r = GenRequest("t", "c", [PROMPTS[0]], 12, stop_strings=(text,))
        s.submit_generate(r)
        (c,) = collect(r).values()
        assert c.finish_reason == "stop" and text in backend.detokenize(c.token_ids)
        assert len(c.token_ids) <= 7
        # Sampling: the same seed gives the same sample whatever it is batched with.
        hot = SamplingParams(temperature=1.5, top_p=0.95, top_k=50, seed=7)
        alone = GenRequest("x", "c", [PROMPTS[1]], 10, params=hot)
        s.submit_generate(alone)
        crowd = GenRequest("y", "c", [PROMPTS[1], PROMPTS[2], PROMPTS[3]], 10, params=hot)
        s.submit_generate(crowd)
        other = GenRequest("z", "c", [PROMPTS[1]], 10, params=SamplingParams(temperature=1.5, seed=8))
        s.submit_generate(other)
        a, b, o = collect(alone)[0].token_ids, collect(crowd)[0].token_ids, collect(other)[0].token_ids
        assert a == b
        assert a != o and a != reference(backend.model, PROMPTS[1], 10)
    finally:
        s.stop()


def test_queue_bound_refuses_with_a_retry_hint(backend):
    s = Scheduler(backend, max_batch_tokens=4096, max_queue_tokens=100)  # worker not started: the queue fills
    s.submit_generate(GenRequest("a", "c", [[1] * 10], 60))
    with pytest.raises(Overloaded) as ei:
        s.submit_generate(GenRequest("b", "c", [[1] * 10], 60))
    assert ei.value.retry_after_s > 0 and ei.value.code == status.RESOURCE_EXHAUSTED
    s.stop()


def test_generate_over_the_wire_with_chat_messages_and_template_kwargs(tiny_llama, tmp_path):
    server = TargetServer(ServerConfig(model=str(tiny_llama), grpc_port=0, flight_port=0)).start()
    client = TargetClient(f"127.0.0.1:{server.grpc_port}")
    try:
        tok = server.backend.tokenizer
        msgs = [{"role": "user", "content": "hello there"}]
        ids = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                  add_special_tokens=False)["input_ids"]
        by_ids = client.generate([("p", ids)], max_new_tokens=8, stop_token_ids=[-1])
        by_msgs = client.generate_messages([("p", msgs)], max_new_tokens=8, stop_token_ids=[-1],
                                           chat_template_kwargs={"enable_thinking": False})
        assert by_ids == by_msgs and len(by_ids[0][1]) == 8
        with pytest.raises(Exception, match="INVALID_ARGUMENT.*chat_template_kwargs_json"):
            client._stub.Generate(pb.GenerateRequest(prompts=[{"id": "p", "messages_json": json.dumps(msgs)}],
                                                     max_new_tokens=2, chat_template_kwargs_json="[1]"))
    finally:
        client.close()
        server.shutdown(drain=False)


def test_generate_refused_over_the_wire_when_the_queue_is_full():
    """RESOURCE_EXHAUSTED with a retry hint, as the data plane does (synthetic backend: 10 ms a step).
    The batch budget (1000) runs one 903-token sequence (~9 s); a second waits in the queue (bound
    1000); a third does not fit in the queue. Shutting down ends the first two."""
    import threading

    server = TargetServer(ServerConfig(backend="synthetic", synthetic_cost_per_token_us=10000, grpc_port=0,
                                       flight_port=0, max_batch_tokens=1000, max_queue_tokens=1000,
                                       max_request_tokens=1000, max_length=1000)).start()
    client = TargetClient(f"127.0.0.1:{server.grpc_port}")
    try:
        errors = []

        def call(n):
            try:
                client.generate([(n, [1, 2, 3])], max_new_tokens=900)
            except Exception as e:  # noqa: BLE001 - the shutdown ends them
                errors.append(str(e))

        calls = [threading.Thread(target=call, args=(n,)) for n in ("a", "b")]
        calls[0].start()
        end = time.monotonic() + 30
        while not server.scheduler._loop.running and time.monotonic() < end:
            time.sleep(0.005)
        calls[1].start()
        while server.scheduler.queued_tokens < 903 and time.monotonic() < end:
            time.sleep(0.005)
        with pytest.raises(Exception) as ei:
            client.generate([("c", [1, 2, 3])], max_new_tokens=900)
        c = status.classify(ei.value)
        assert c.code == status.RESOURCE_EXHAUSTED and c.retry_after_s is not None, ei.value
    finally:
        server.shutdown(drain=False)
        for t in calls:
            t.join(60)
        client.close()
    assert len(errors) == 2 and all("UNAVAILABLE" in e for e in errors), errors
