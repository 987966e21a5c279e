"""The control plane: specrelay.v1.TargetService over gRPC (model info, frozen tensors, generation)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import grpc

from common.contract import ModelInfo
from common.rpc import target_pb2 as pb
from common.rpc import target_pb2_grpc as pb_grpc
from target_server.backends.base import FROZEN_TENSOR_NAMES, Backend
from target_server.tensors import TensorFile

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 1 << 20
MAX_CHUNK_BYTES = 3 << 20  # stay under gRPC's default 4 MiB message limit
MAX_GENERATE_PROMPTS = 256


class TargetService(pb_grpc.TargetServiceServicer):
    def __init__(self, backend: Backend, info: ModelInfo, *, draining: Callable[[], bool] = lambda: False) -> None:
        self.backend = backend
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
        unknown = [n for n in names if n not in FROZEN_TENSOR_NAMES]
        if unknown:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"unknown tensor names {unknown}; available: {list(FROZEN_TENSOR_NAMES)}")
        chunk = request.chunk_bytes or DEFAULT_CHUNK_BYTES
        if not 0 < chunk <= MAX_CHUNK_BYTES:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"chunk_bytes must be in 1..{MAX_CHUNK_BYTES}")
        tf, digest = self._tensor_file(names)
        for off, data in tf.chunks(chunk):
            if not context.is_active():  # the client went away
                return
            yield pb.TensorChunk(data=data, offset=off, total_bytes=tf.total_bytes, sha256=digest)

    def Generate(self, request, context):
        if self.draining():
            context.abort(grpc.StatusCode.UNAVAILABLE, "server is draining; send the request to another server")
        if not request.prompts:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no prompts")
        if len(request.prompts) > MAX_GENERATE_PROMPTS:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{len(request.prompts)} prompts in one call; send at most {MAX_GENERATE_PROMPTS}")
        if request.max_new_tokens <= 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens must be > 0")
        if request.temperature < 0 or not 0 <= request.top_p <= 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "temperature must be >= 0 and top_p in [0, 1]")
        total = 0
        for p in request.prompts:
            if not p.token_ids:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"prompt {p.id!r} is empty")
            if max(p.token_ids) >= self.info.vocab_size or min(p.token_ids) < 0:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"prompt {p.id!r} has token ids outside the vocabulary [0, {self.info.vocab_size})")
            if len(p.token_ids) + request.max_new_tokens > self.info.max_length:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"prompt {p.id!r}: {len(p.token_ids)} tokens + max_new_tokens exceeds {self.info.max_length}")
            total += len(p.token_ids) + request.max_new_tokens
        if self.info.max_request_tokens and total > self.info.max_request_tokens:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{total} prompt + new tokens in one call; split into calls of at most "
                          f"{self.info.max_request_tokens}")
        try:
            outs = self.backend.generate(
                [list(p.token_ids) for p in request.prompts], request.max_new_tokens, request.temperature,
                request.top_p, request.seed, list(request.stop_token_ids),
            )
        except NotImplementedError as e:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, str(e))
        except Exception as e:  # a failing generation fails this call, not the server
            log.exception("Generate failed")
            context.abort(grpc.StatusCode.INTERNAL, f"generation failed: {type(e).__name__}: {e}")
        return pb.GenerateResponse(completions=[
            pb.GenerateResponse.Completion(id=p.id, token_ids=o.token_ids, finish_reason=o.finish_reason)
            for p, o in zip(request.prompts, outs)
        ])
