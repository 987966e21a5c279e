"""The control plane: specrelay.v1.TargetService over gRPC (model info, frozen tensors, generation)."""

from __future__ import annotations

import hashlib
import logging

import grpc
from safetensors.torch import save as safetensors_save

from common.contract import ModelInfo
from common.rpc import target_pb2 as pb
from common.rpc import target_pb2_grpc as pb_grpc
from target_server.backends.base import FROZEN_TENSOR_NAMES, Backend

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 1 << 20
MAX_CHUNK_BYTES = 3 << 20  # stay under gRPC's default 4 MiB message limit


class TargetService(pb_grpc.TargetServiceServicer):
    def __init__(self, backend: Backend, info: ModelInfo) -> None:
        self.backend = backend
        self.info = info
        self._tensor_cache: dict[tuple[str, ...], tuple[bytes, str]] = {}

    def GetModelInfo(self, request, context):
        return self.info.to_proto()

    def _tensor_file(self, names: tuple[str, ...]) -> tuple[bytes, str]:
        if names not in self._tensor_cache:
            tensors = self.backend.frozen_tensors(list(names))
            blob = safetensors_save(tensors, metadata={"source": self.info.model_name})
            self._tensor_cache[names] = (blob, hashlib.sha256(blob).hexdigest())
        return self._tensor_cache[names]

    def FetchTensors(self, request, context):
        names = tuple(request.names) or FROZEN_TENSOR_NAMES
        unknown = [n for n in names if n not in FROZEN_TENSOR_NAMES]
        if unknown:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"unknown tensor names {unknown}; available: {list(FROZEN_TENSOR_NAMES)}")
        chunk = request.chunk_bytes or DEFAULT_CHUNK_BYTES
        if not 0 < chunk <= MAX_CHUNK_BYTES:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"chunk_bytes must be in 1..{MAX_CHUNK_BYTES}")
        blob, digest = self._tensor_file(names)
        for off in range(0, len(blob), chunk):
            yield pb.TensorChunk(data=blob[off : off + chunk], offset=off, total_bytes=len(blob), sha256=digest)

    def Generate(self, request, context):
        if not request.prompts:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no prompts")
        if request.max_new_tokens <= 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens must be > 0")
        for p in request.prompts:
            if not p.token_ids:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"prompt {p.id!r} is empty")
            if max(p.token_ids) >= self.info.vocab_size or min(p.token_ids) < 0:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"prompt {p.id!r} has token ids outside the vocabulary")
            if len(p.token_ids) + request.max_new_tokens > self.info.max_length:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"prompt {p.id!r}: {len(p.token_ids)} tokens + max_new_tokens exceeds {self.info.max_length}")
        try:
            outs = self.backend.generate(
                [list(p.token_ids) for p in request.prompts], request.max_new_tokens, request.temperature,
                request.top_p, request.seed, list(request.stop_token_ids),
            )
        except NotImplementedError as e:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, str(e))
        return pb.GenerateResponse(completions=[
            pb.GenerateResponse.Completion(id=p.id, token_ids=o.token_ids, finish_reason=o.finish_reason)
            for p, o in zip(request.prompts, outs)
        ])
