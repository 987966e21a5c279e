"""Frozen target tensors as a safetensors file streamed in chunks, never built as one big copy.

The file is a header (8-byte little-endian length + JSON) followed by each tensor's raw bytes;
`chunks()` slices it on the fly from the tensors' own memory, so serving lm_head of a large
model costs one chunk of extra memory, not the whole file. The sha256 of the file is computed
once per set of names (the tensors are frozen) and sent with every chunk.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator

import torch

_SAFETENSORS_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _raw(t: torch.Tensor) -> memoryview:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


class TensorFile:
    def __init__(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        header: dict = {"__metadata__": dict(metadata or {})}
        self._parts: list[memoryview] = []
        offset = 0
        for name in sorted(tensors):
            t = tensors[name]
            if t.dtype not in _SAFETENSORS_DTYPES:
                raise TypeError(f"tensor {name}: dtype {t.dtype} has no safetensors code")
            raw = _raw(t)
            header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                            "data_offsets": [offset, offset + raw.nbytes]}
            self._parts.append(raw)
            offset += raw.nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-(8 + len(text)) % 8)  # the data section starts 8-byte aligned
        self._parts.insert(0, memoryview(struct.pack("<Q", len(text)) + text))
        self.total_bytes = sum(p.nbytes for p in self._parts)

    def chunks(self, chunk_bytes: int) -> Iterator[tuple[int, bytes]]:
        """(offset, bytes) pieces of at most `chunk_bytes`, in order, covering the whole file."""
        buf = bytearray()
        offset = 0
        for part in self._parts:
            pos = 0
            while pos < part.nbytes:
                take = min(chunk_bytes - len(buf), part.nbytes - pos)
                buf += part[pos : pos + take]
                pos += take
                if len(buf) == chunk_bytes:
                    yield offset, bytes(buf)
                    offset += len(buf)
                    buf.clear()
        if buf:
            yield offset, bytes(buf)

    def sha256(self) -> str:
        h = hashlib.sha256()
        for part in self._parts:
            h.update(part)
        return h.hexdigest()
