"""The data plane: an Arrow Flight server answering FeatureRequest tickets with feature batches.

A DoGet's ticket is a serialised specrelay.v1.FeatureRequest. The request is validated in full
before any work is queued (bad input gets INVALID_ARGUMENT naming the problem; the server and
other clients are unaffected), then handed to the scheduler. Feature rows stream back as they
are computed, packed into record batches of about `batch_bytes`.
"""

from __future__ import annotations

import logging
import queue
import time
import uuid

import pyarrow as pa
import pyarrow.flight as flight
from google.protobuf.message import DecodeError

from common.contract import TEACHER_HIDDEN, TEACHER_TOPK, ModelInfo, teacher_mode_from_pb
from common.errors import ContractError, SchemaError
from common import status
from common.features import FEATURE_SCHEMA_VERSION, FeatureSchema, SampleFeatures, encode_batch, split_rows
from common.rpc import target_pb2 as pb
from target_server.scheduler import DeadlineExceeded, Draining, Overloaded, Request, Scheduler

log = logging.getLogger(__name__)

DEFAULT_BATCH_BYTES = 4 << 20  # a few MiB per record batch: large enough to amortise, small enough not to page-fault


def parse_request(ticket: bytes, info: ModelInfo, max_request_tokens: int) -> Request:
    """Decode and validate a FeatureRequest; raises SchemaError/ContractError with a clear message."""
    try:
        msg = pb.FeatureRequest.FromString(ticket)
    except DecodeError as e:
        raise SchemaError(f"ticket is not a specrelay.v1.FeatureRequest ({e})") from None
    if msg.feature_schema_version != FEATURE_SCHEMA_VERSION:
        raise SchemaError(f"feature schema version {msg.feature_schema_version} requested; this server speaks "
                          f"{FEATURE_SCHEMA_VERSION}")
    if not msg.sample_ids:
        raise SchemaError("request has no samples")
    if len(msg.sample_ids) != len(msg.lengths):
        raise SchemaError(f"{len(msg.sample_ids)} sample ids but {len(msg.lengths)} lengths")
    if sum(msg.lengths) != len(msg.token_ids):
        raise SchemaError(f"lengths sum to {sum(msg.lengths)} but {len(msg.token_ids)} token ids were sent")
    if len(set(msg.sample_ids)) != len(msg.sample_ids):
        raise SchemaError("duplicate sample ids in one request")
    if len(msg.token_ids) > max_request_tokens:
        raise SchemaError(f"request has {len(msg.token_ids)} tokens; this server accepts at most "
                          f"{max_request_tokens} per request: split it")
    for sid, n in zip(msg.sample_ids, msg.lengths):
        if n <= 0:
            raise SchemaError(f"sample {sid} is empty")
        if n > info.max_length:
            raise SchemaError(f"sample {sid} has {n} tokens; the model's max length is {info.max_length}")
    if msg.token_ids:
        lo, hi = min(msg.token_ids), max(msg.token_ids)
        if lo < 0 or hi >= info.vocab_size:
            raise SchemaError(f"token id out of range [0, {info.vocab_size}): saw {lo if lo < 0 else hi}; "
                              "is the data tokenized with this model's tokenizer?")
    teacher = TEACHER_HIDDEN if msg.teacher_mode == pb.TEACHER_MODE_UNSPECIFIED else teacher_mode_from_pb(msg.teacher_mode)
    if teacher not in info.teacher_modes:
        raise ContractError(f"teacher mode {teacher!r} not offered (offers {info.teacher_modes})")
    topk = 0
    if teacher == TEACHER_TOPK:
        if not 0 < msg.topk <= info.max_topk:
            raise SchemaError(f"topk {msg.topk} out of range 1..{info.max_topk}")
        topk = msg.topk
    if msg.expect_dtype and msg.expect_dtype != info.dtype:
        raise ContractError(f"client expects {msg.expect_dtype} features but this server sends {info.dtype}")
    seqs, pos = [], 0
    ids = list(msg.token_ids)
    for n in msg.lengths:
        seqs.append(ids[pos : pos + n])
        pos += n
    return Request(
        request_id=msg.request_id or uuid.uuid4().hex, client_id=msg.client_id or "anonymous",
        sample_ids=list(msg.sample_ids), seqs=seqs, teacher=teacher, topk=topk, deadline=msg.deadline_unix_s,
    )


class FeatureFlightServer(flight.FlightServerBase):
    def __init__(self, location: str, scheduler: Scheduler, info: ModelInfo, *, metrics=None,
                 batch_bytes: int = DEFAULT_BATCH_BYTES, max_request_tokens: int = 1 << 20, **kwargs) -> None:
        super().__init__(location, **kwargs)
        self.scheduler = scheduler
        self.info = info
        self.metrics = metrics
        self.batch_bytes = batch_bytes
        self.max_request_tokens = max_request_tokens

    def _count(self, status: str) -> None:
        if self.metrics is not None:
            self.metrics.requests.labels(status=status).inc()

    def do_get(self, context, ticket):
        try:
            req = parse_request(ticket.ticket, self.info, self.max_request_tokens)
        except (SchemaError, ContractError) as e:
            self._count("invalid")
            raise flight.FlightServerError(status.message(status.INVALID_ARGUMENT, str(e))) from None
        try:
            self.scheduler.submit(req)
        except Overloaded as e:
            self._count("resource_exhausted")
            raise flight.FlightUnavailableError(str(e)) from None
        except Draining as e:
            self._count("draining")
            raise flight.FlightUnavailableError(status.message(status.UNAVAILABLE, str(e))) from None
        schema = FeatureSchema(self.info.hidden_size, self.info.dtype, req.teacher, req.topk)
        return flight.GeneratorStream(schema.arrow(), self._stream(req, schema))

    def _stream(self, req: Request, schema: FeatureSchema):
        per_token = (4 * schema.hidden_size) * (2 if schema.dtype != "float32" else 4)
        max_chunk_tokens = max(1, self.batch_bytes // per_token)
        pending: list[SampleFeatures] = []
        pending_tokens = 0
        remaining = len(req.seqs)
        status = "ok"
        if self.metrics is not None:
            self.metrics.active_streams.inc()
        try:
            while remaining:
                try:
                    item = req.results.get(timeout=0.0 if pending else 1.0)
                except queue.Empty:
                    if pending:  # nothing ready right now: send what we have
                        yield self._emit(schema, pending)
                        pending, pending_tokens = [], 0
                    elif req.expired(time.time()):
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
                for chunk in split_rows(row, max_chunk_tokens):
                    pending.append(chunk)
                    pending_tokens += chunk.length
                    if pending_tokens >= max_chunk_tokens:
                        yield self._emit(schema, pending)
                        pending, pending_tokens = [], 0
            if pending:
                yield self._emit(schema, pending)
        except DeadlineExceeded as e:
            status = "deadline_exceeded"
            raise flight.FlightTimedOutError(status.message(status.DEADLINE_EXCEEDED, str(e))) from None
        except GeneratorExit:
            status = "cancelled"
            raise
        except Exception as e:
            status = "error"
            log.exception("request %s failed", req.request_id)
            raise flight.FlightInternalError(status.message(status.INTERNAL, f"{type(e).__name__}: {e}")) from None
        finally:
            req.cancel()  # no-op when complete; stops queued work if the client went away
            self._count(status)
            if self.metrics is not None:
                self.metrics.active_streams.dec()

    def _emit(self, schema: FeatureSchema, rows: list[SampleFeatures]) -> pa.RecordBatch:
        batch = encode_batch(schema, rows)
        if self.metrics is not None:
            self.metrics.bytes_sent.inc(batch.nbytes)
        return batch
