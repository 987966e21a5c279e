"""The data plane: an Arrow Flight server answering FeatureRequest tickets with feature batches.

A DoGet's ticket is a serialised specrelay.v1.FeatureRequest. The request is validated in full
before any work is queued (bad input gets INVALID_ARGUMENT naming the problem; the server and
other clients are unaffected), then handed to the scheduler. Feature rows stream back as they
are computed, packed into record batches of about `batch_bytes`.

Every request ends in exactly one status (metrics `requests_total{status}`), and each of its
samples is counted as served or dropped with that reason (`samples_total{outcome}`). A sample
counts as served once the batch carrying its last chunk has been handed to the transport.
"""

from __future__ import annotations

import logging
import queue
import threading
import uuid
import weakref

import pyarrow as pa
import pyarrow.flight as flight
from google.protobuf.message import DecodeError

from common import status
from common.contract import TEACHER_HIDDEN, TEACHER_NONE, TEACHER_TOPK, ModelInfo, check_feature_spec, teacher_mode_from_pb
from common.errors import ContractError, SchemaError
from common.features import FEATURE_SCHEMA_VERSION, FeatureSchema, FeatureSpec, SampleFeatures, encode_batch, split_rows
from common.rpc import target_pb2 as pb
from target_server.auth import BearerTokenMiddlewareFactory
from target_server.scheduler import DeadlineExceeded, Overloaded, Request, Scheduler, SchedulerError

log = logging.getLogger(__name__)

# Record batches: a sample's features of at least PACK_BYTES go out alone, as one batch encoded
# from the backend's tensor without a copy and decoded by the trainer as a view (samples over
# DEFAULT_BATCH_BYTES are split into chunks); smaller samples are packed together (one copy)
# up to PACK_BYTES, so tiny samples do not pay a batch each. 16 MiB holds 512 tokens at H=4096
# bf16 (~3.6k at H=576). Measured (benchmarks/): packing several samples into 16 MiB batches
# instead cost ~200 MiB more peak RSS under overload; 4 MiB chunks cost a reassembly copy.
DEFAULT_BATCH_BYTES = 16 << 20
PACK_BYTES = 1 << 20
_WAIT_S = 0.5  # how often an idle stream re-checks its deadline
# Each open stream holds a transport thread; the token-bounded queue does not bound their number
# when requests are tiny, so streams are capped too (refused like a full queue).
MAX_OPEN_STREAMS = 256

# Metric status label for each status code.
_STATUS_LABEL = {
    status.INVALID_ARGUMENT: "invalid", status.RESOURCE_EXHAUSTED: "resource_exhausted",
    status.UNAVAILABLE: "unavailable", status.DEADLINE_EXCEEDED: "deadline_exceeded", status.INTERNAL: "error",
}


def decode_request(ticket: bytes) -> pb.FeatureRequest:
    try:
        return pb.FeatureRequest.FromString(ticket)
    except (DecodeError, ValueError, TypeError) as e:
        raise SchemaError(f"ticket is not a specrelay.v1.FeatureRequest ({e}); build it with "
                          "draft_trainer.client.target.TargetClient or the proto") from None


def validate_request(msg: pb.FeatureRequest, info: ModelInfo, max_request_tokens: int) -> Request:
    """Check a decoded FeatureRequest against the served model; SchemaError/ContractError says why."""
    if msg.feature_schema_version != FEATURE_SCHEMA_VERSION:
        raise SchemaError(f"feature schema version {msg.feature_schema_version} requested; this server speaks "
                          f"{FEATURE_SCHEMA_VERSION}: upgrade the older side")
    if not msg.sample_ids:
        raise SchemaError("request has no samples")
    if len(msg.sample_ids) != len(msg.lengths):
        raise SchemaError(f"{len(msg.sample_ids)} sample ids but {len(msg.lengths)} lengths")
    ids = list(msg.token_ids)
    lengths = list(msg.lengths)
    if sum(lengths) != len(ids):
        raise SchemaError(f"lengths sum to {sum(lengths)} but {len(ids)} token ids were sent")
    if len(set(msg.sample_ids)) != len(msg.sample_ids):
        raise SchemaError("duplicate sample ids in one request")
    if len(ids) > max_request_tokens:
        raise SchemaError(f"request has {len(ids)} tokens; this server accepts at most "
                          f"{max_request_tokens} per request (ModelInfo.max_request_tokens): split it")
    for sid, n in zip(msg.sample_ids, lengths):
        if n <= 0:
            raise SchemaError(f"sample {sid} is empty; drop empty samples before requesting features")
        if n > info.max_length:
            raise SchemaError(f"sample {sid} has {n} tokens; the model's max length is {info.max_length}: "
                              "truncate it when preparing the data")
    lo, hi = min(ids), max(ids)
    if lo < 0 or hi >= info.vocab_size:
        raise SchemaError(f"token id out of range [0, {info.vocab_size}): saw {lo if lo < 0 else hi}; "
                          "is the data tokenized with this model's tokenizer?")
    teacher = TEACHER_HIDDEN if msg.teacher_mode == pb.TEACHER_MODE_UNSPECIFIED else teacher_mode_from_pb(msg.teacher_mode)
    if teacher != TEACHER_NONE and teacher not in info.teacher_modes:
        raise ContractError(f"teacher mode {teacher!r} not offered (offers {info.teacher_modes})")
    topk = 0
    if teacher == TEACHER_TOPK:
        if not 0 < msg.topk <= info.max_topk:
            raise SchemaError(f"topk {msg.topk} out of range 1..{info.max_topk} (ModelInfo.max_topk)")
        topk = msg.topk
    # The feature spec: the layers named in the request (default: this server's aux layers).
    try:
        spec = FeatureSpec(tuple(msg.layer_ids) or tuple(info.aux_layer_ids), teacher, topk, dict(msg.tensor_dtypes))
    except SchemaError as e:
        raise SchemaError(f"feature request: {e}") from None
    check_feature_spec(info, spec, where="this server")
    if msg.expect_dtype and msg.expect_dtype != info.dtype:
        raise ContractError(f"client expects {msg.expect_dtype} features but this server sends {info.dtype}; "
                            "start the server with the run's --dtype")
    seqs, pos = [], 0
    for n in lengths:
        seqs.append(ids[pos : pos + n])
        pos += n
    return Request(
        request_id=msg.request_id or uuid.uuid4().hex, client_id=msg.client_id or "anonymous",
        sample_ids=list(msg.sample_ids), seqs=seqs, teacher=teacher, topk=topk, deadline=msg.deadline_unix_s,
        layer_ids=spec.layer_ids, tensor_dtypes=spec.tensor_dtypes,
    )


class _StreamState:
    """Book-keeping of one open stream; `close` runs exactly once (generator end or collection)."""

    def __init__(self, req: Request) -> None:
        self.req = req
        self.served = 0
        self.status = "cancelled"  # until the stream finishes or fails
        self.closed = False


class FeatureFlightServer(flight.FlightServerBase):
    def __init__(self, location: str, scheduler: Scheduler, info: ModelInfo, *, metrics=None,
                 batch_bytes: int = DEFAULT_BATCH_BYTES, max_request_tokens: int = 1 << 20,
                 auth_token: str | None = None, tls_certificates: list[tuple[bytes, bytes]] | None = None) -> None:
        middleware = None
        if auth_token:
            def on_reject(is_feature_request: bool) -> None:
                if metrics is not None:
                    metrics.auth_failures.labels(plane="flight").inc()
                    if is_feature_request:
                        metrics.requests.labels(status="unauthenticated").inc()

            middleware = {"auth": BearerTokenMiddlewareFactory(auth_token, on_reject)}
        super().__init__(location, tls_certificates=tls_certificates, middleware=middleware)
        self.scheduler = scheduler
        self.info = info
        self.metrics = metrics
        self.batch_bytes = batch_bytes
        self.max_request_tokens = max_request_tokens
        self._lock = threading.Lock()
        self._open: set[_StreamState] = set()

    @property
    def open_streams(self) -> int:
        with self._lock:
            return len(self._open)

    def do_get(self, context, ticket):
        n_samples = 0
        try:
            msg = decode_request(ticket.ticket)
            n_samples = len(msg.sample_ids)
            req = validate_request(msg, self.info, self.max_request_tokens)
        except (SchemaError, ContractError) as e:
            self._finish_rejected("invalid", n_samples, f"invalid request: {e}")
            raise status.flight_error(status.INVALID_ARGUMENT, str(e)) from None
        try:
            if self.open_streams >= MAX_OPEN_STREAMS:
                raise Overloaded(f"{MAX_OPEN_STREAMS} feature streams already open; send fewer, larger requests",
                                 retry_after_s=1.0)
            self.scheduler.submit(req)
        except SchedulerError as e:
            label = _STATUS_LABEL.get(e.code, "error")
            self._finish_rejected(label, n_samples, f"request {req.request_id} from {req.client_id} refused: {e}")
            raise status.flight_error(e.code, str(e), e.retry_after_s) from None
        state = _StreamState(req)
        with self._lock:
            self._open.add(state)
        if self.metrics is not None:
            self.metrics.active_streams.inc()
        schema = FeatureSchema(self.info.hidden_size, self.info.dtype, req.teacher, req.topk, req.layer_ids,
                               req.tensor_dtypes)
        gen = self._stream(state, schema)
        # A generator Flight never starts (client gone at once) never runs its `finally`.
        weakref.finalize(gen, self._close, state)
        return flight.GeneratorStream(schema.arrow(), gen)

    def _finish_rejected(self, label: str, n_samples: int, text: str) -> None:
        if self.metrics is not None:
            self.metrics.finish_request(label, 0, n_samples)
        level = logging.DEBUG if label == "resource_exhausted" else logging.INFO
        log.log(level, "%s (%d samples dropped)", text, n_samples)

    def _close(self, state: _StreamState) -> None:
        with self._lock:
            if state.closed:
                return
            state.closed = True
            self._open.discard(state)
        req = state.req
        dropped = self.scheduler.cancel(req)  # stops queued work if the client went away; no-op when complete
        if self.metrics is not None:
            self.metrics.active_streams.dec()
            self.metrics.finish_request(state.status, state.served, len(req.seqs))
        if state.status == "ok":
            log.debug("request %s from %s: %d samples served", req.request_id, req.client_id, state.served)
        elif state.status == "cancelled":  # the client stopped reading (e.g. a trainer's prefetch it no longer needs)
            log.info("request %s from %s cancelled by the client: %d of %d samples sent, %d not computed",
                     req.request_id, req.client_id, state.served, len(req.seqs), dropped)
        else:
            log.info("request %s from %s ended %s: %d of %d samples served, %d dropped (%d unstarted)",
                     req.request_id, req.client_id, state.status, state.served, len(req.seqs),
                     len(req.seqs) - state.served, dropped)

    def _stream(self, state: _StreamState, schema: FeatureSchema):
        req = state.req
        item = 4 if schema.dtype == "float32" else 2
        per_token = schema.aux_width * item + {TEACHER_HIDDEN: schema.hidden_size * item, TEACHER_TOPK: 8 * schema.topk,
                                               TEACHER_NONE: 0}[schema.teacher]
        max_chunk_tokens = max(1, self.batch_bytes // per_token)
        pack_tokens = max(1, min(self.batch_bytes, PACK_BYTES) // per_token)
        pending: list[SampleFeatures] = []
        pending_tokens = pending_done = 0
        remaining = len(req.seqs)

        def sent() -> None:
            # Flight asked for the next batch: the last one is with the transport.
            nonlocal pending, pending_tokens, pending_done
            state.served += pending_done
            self.scheduler.release(req, pending_tokens)
            pending, pending_tokens, pending_done = [], 0, 0

        try:
            while remaining:
                try:
                    item = req.results.get(timeout=0.0 if pending else _WAIT_S)
                except queue.Empty:
                    if pending:  # nothing ready right now: send what we have
                        yield self._emit(schema, pending)
                        sent()
                    elif req.expired():
                        raise DeadlineExceeded(f"request {req.request_id} passed its deadline")
                    continue
                if isinstance(item, BaseException):
                    raise item
                index, cap = item
                remaining -= 1
                row = SampleFeatures(
                    sample_id=req.sample_ids[index], start=0, num_tokens=len(req.seqs[index]), aux_T3H=cap.aux_T3H,
                    teacher_TH=cap.teacher_TH, topk_ids_TK=cap.topk_ids_TK, topk_logprobs_TK=cap.topk_logprobs_TK,
                )
                chunks = split_rows(row, max_chunk_tokens)
                for i, chunk in enumerate(chunks):
                    if chunk.length >= pack_tokens and pending:  # a large chunk goes out alone
                        yield self._emit(schema, pending)
                        sent()
                    pending.append(chunk)
                    pending_tokens += chunk.length
                    pending_done += i == len(chunks) - 1
                    if pending_tokens >= pack_tokens:
                        yield self._emit(schema, pending)
                        sent()
            if pending:
                yield self._emit(schema, pending)
                sent()
            state.status = "ok"
        except SchedulerError as e:
            state.status = _STATUS_LABEL.get(e.code, "error")
            raise status.flight_error(e.code, str(e), e.retry_after_s) from None
        except GeneratorExit:  # the client went away mid-stream
            state.status = "cancelled"
            raise
        except Exception as e:
            state.status = "error"
            log.exception("request %s failed", req.request_id)
            raise status.flight_error(status.INTERNAL, f"{type(e).__name__}: {e}") from None
        finally:
            self._close(state)

    def _emit(self, schema: FeatureSchema, rows: list[SampleFeatures]) -> pa.RecordBatch:
        batch = encode_batch(schema, rows)
        if self.metrics is not None:
            self.metrics.bytes_sent.inc(batch.nbytes)
        return batch
