"""The control plane: specrelay.v1.TargetService over gRPC (model info, frozen tensors, generation)."""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable

import grpc

from common import status
from common.contract import FROZEN_TENSOR_NAMES, ModelInfo, parse_tensor_name
from common.errors import SpecRelayError
from common.rpc import target_pb2 as pb
from common.rpc import target_pb2_grpc as pb_grpc
from target_server.backends.base import Backend
from target_server.generation import GenRequest, SamplingParams
from target_server.scheduler import Scheduler, SchedulerError
from target_server.tensors import TensorFile

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 1 << 20
MAX_CHUNK_BYTES = 3 << 20  # stay under gRPC's default 4 MiB message limit
MAX_GENERATE_PROMPTS = 256


class TargetService(pb_grpc.TargetServiceServicer):
    def __init__(self, backend: Backend, info: ModelInfo, scheduler: Scheduler, *,
                 draining: Callable[[], bool] = lambda: False, metrics=None) -> None:
        self.backend = backend
        self.scheduler = scheduler
        self.metrics = metrics
        self.info = info
        self.draining = draining
        self._digests: dict[tuple[str, ...], str] = {}
        self._digest_lock = threading.Lock()

    def GetModelInfo(self, request, context):
        return self.info.to_proto()

    def _tensor_file(self, names: tuple[str, ...]) -> tuple[TensorFile, str]:
        # The tensors are frozen, so the digest is computed once per name set; the file itself is
        # rebuilt per call from the weights (free on CPU), so no multi-GB blob stays in memory.
        tf = TensorFile(self.backend.frozen_tensors(list(names)), metadata={"source": self.info.model_name})
        with self._digest_lock:
            if names not in self._digests:
                self._digests[names] = tf.sha256()
            return tf, self._digests[names]

    def FetchTensors(self, request, context):
        names = tuple(dict.fromkeys(request.names)) or FROZEN_TENSOR_NAMES
        try:
            for n in names:
                parse_tensor_name(n, self.info.num_layers)
        except SpecRelayError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        chunk = request.chunk_bytes or DEFAULT_CHUNK_BYTES
        if not 0 < chunk <= MAX_CHUNK_BYTES:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"chunk_bytes must be in 1..{MAX_CHUNK_BYTES}")
        try:
            tf, digest = self._tensor_file(names)
        except SpecRelayError as e:  # a valid name this backend cannot serve (e.g. layers of the synthetic stand-in)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        for off, data in tf.chunks(chunk):
            if not context.is_active():  # the client went away
                return
            yield pb.TensorChunk(data=data, offset=off, total_bytes=tf.total_bytes, sha256=digest)

    def Generate(self, request, context):
        status_label = "error"
        try:
            prompts = self._generate_prompts(request, context)
            req = GenRequest(
                request_id=uuid.uuid4().hex, client_id=request.client_id or context.peer(), prompts=prompts,
                max_new_tokens=request.max_new_tokens,
                params=SamplingParams(request.temperature, request.top_p or 1.0, request.top_k, request.seed),
                stop_token_ids=frozenset(request.stop_token_ids or self.backend.eos_token_ids()),
                stop_strings=tuple(request.stop), keys=tuple(p.id for p in request.prompts),
                deadline=time.time() + context.time_remaining() if context.time_remaining() else 0.0,
            )
            outs = self._run_generate(req, context)
            status_label = "ok"
            return pb.GenerateResponse(completions=[
                pb.GenerateResponse.Completion(id=p.id, token_ids=o.token_ids, finish_reason=o.finish_reason,
                                               prompt_tokens=len(ids))
                for p, ids, o in zip(request.prompts, prompts, outs)
            ])
        except _Abort as a:
            status_label = a.label
            context.abort(a.code, a.text)
        finally:
            if self.metrics is not None:
                self.metrics.gen_requests.labels(status=status_label).inc()

    def _generate_prompts(self, request, context) -> list[list[int]]:
        """Token ids of every prompt (chat-templated where given as messages), or _Abort(INVALID_ARGUMENT)."""
        bad = lambda text: _Abort(grpc.StatusCode.INVALID_ARGUMENT, text, "invalid")  # noqa: E731
        if self.draining():
            raise _Abort(grpc.StatusCode.UNAVAILABLE, "server is draining; send the request to another server",
                         "unavailable")
        if not request.prompts:
            raise bad("no prompts")
        if len(request.prompts) > MAX_GENERATE_PROMPTS:
            raise bad(f"{len(request.prompts)} prompts in one call; send at most {MAX_GENERATE_PROMPTS}")
        if request.max_new_tokens <= 0:
            raise bad("max_new_tokens must be > 0")
        if request.temperature < 0 or not 0 <= request.top_p <= 1 or request.top_k < 0:
            raise bad("temperature must be >= 0, top_p in [0, 1] and top_k >= 0")
        if not self.scheduler.batched_generation and (request.top_k or request.stop):
            raise bad(f"the {self.backend.name} backend generates one prompt at a time without top_k or stop "
                      "strings; leave them unset")
        if request.stop:
            try:
                self.backend.detokenize([])
            except NotImplementedError as e:
                raise bad(str(e)) from None
        try:
            kwargs = json.loads(request.chat_template_kwargs_json) if request.chat_template_kwargs_json else {}
            if not isinstance(kwargs, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            raise bad(f"chat_template_kwargs_json: {e}") from None
        out, total = [], 0
        for p in request.prompts:
            ids = list(p.token_ids)
            if p.messages_json:
                if ids:
                    raise bad(f"prompt {p.id!r}: give token_ids or messages_json, not both")
                try:
                    ids = self.backend.chat_prompt(json.loads(p.messages_json), kwargs)
                except NotImplementedError as e:
                    raise bad(str(e)) from None
                except Exception as e:  # noqa: BLE001 - a template error is the caller's input
                    raise bad(f"prompt {p.id!r}: cannot render messages_json with the chat template: {e}") from None
            if not ids:
                raise bad(f"prompt {p.id!r} is empty")
            if max(ids) >= self.info.vocab_size or min(ids) < 0:
                raise bad(f"prompt {p.id!r} has token ids outside the vocabulary [0, {self.info.vocab_size})")
            if len(ids) + request.max_new_tokens > self.info.max_length:
                raise bad(f"prompt {p.id!r}: {len(ids)} tokens + max_new_tokens exceeds {self.info.max_length}")
            total += len(ids) + request.max_new_tokens
            out.append(ids)
        if self.info.max_request_tokens and total > self.info.max_request_tokens:
            raise bad(f"{total} prompt + new tokens in one call; split into calls of at most "
                      f"{self.info.max_request_tokens}")
        return out

    def _run_generate(self, req: GenRequest, context) -> list:
        try:
            self.scheduler.submit_generate(req)
        except SchedulerError as e:
            raise _Abort(_GRPC_CODE[e.code], status.message(e.code, str(e), e.retry_after_s), _LABEL[e.code]) from None
        outs: dict[int, object] = {}
        try:
            while len(outs) < len(req.prompts):
                if not context.is_active():  # the caller went away: stop its work
                    raise _Abort(grpc.StatusCode.CANCELLED, "cancelled by the client", "cancelled")
                try:
                    item = req.results.get(timeout=0.2)
                except queue.Empty:
                    continue
                if isinstance(item, SchedulerError):
                    raise _Abort(_GRPC_CODE[item.code], status.message(item.code, str(item), item.retry_after_s),
                                 _LABEL[item.code])
                if isinstance(item, BaseException):
                    raise _Abort(grpc.StatusCode.INTERNAL, f"generation failed: {item}", "error")
                outs[item[0]] = item[1]
        finally:
            if len(outs) < len(req.prompts):
                self.scheduler.cancel_generate(req)
        return [outs[i] for i in range(len(req.prompts))]


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, text: str, label: str) -> None:
        super().__init__(text)
        self.code, self.text, self.label = code, text, label


_GRPC_CODE = {status.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED, status.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
              status.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED, status.INTERNAL: grpc.StatusCode.INTERNAL,
              status.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT}
_LABEL = {status.RESOURCE_EXHAUSTED: "resource_exhausted", status.UNAVAILABLE: "unavailable",
          status.DEADLINE_EXCEEDED: "deadline_exceeded", status.INTERNAL: "error", status.INVALID_ARGUMENT: "invalid"}
