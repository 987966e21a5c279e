"""The Arrow feature schema of the data plane and its zero-copy torch codec.

Legend (shapes):  T tokens of one sample, N tokens of one record batch (sum of T),
H target hidden size, L number of captured target layers (the feature spec's layer ids),
K top-k width. `aux_T3H` is [T, L*H]: the name is EAGLE-3's (L = 3), the width is the spec's.

What a server sends is named by a `FeatureSpec` the trainer chooses (its draft method's needs):
which decoder layers' outputs (any list, the last layer allowed: its output before the final
norm), and the teacher: none, the final normed hidden state, or top-k log-probs.

One record batch row is one *chunk* of one sample (a long sample may span several rows, in
order, so record batches stay bounded (the server's batch size) even at H=8192):

    sample_id   int64
    start       int32          index of the chunk's first token within the sample
    num_tokens  int32          total tokens of the sample (chunks are complete at start+len == num_tokens)
    aux         list<fixed_size_list<E, L*H>>  outputs of the spec's layers, concatenated, [t, L*H]
    teacher     list<fixed_size_list<E, H>>    final normed hidden state, [t, H]   (teacher=hidden)
    topk_ids    list<fixed_size_list<int32, K>>                                   (teacher=topk)
    topk_logprobs list<fixed_size_list<float32, K>>                               (teacher=topk)

E is the storage type of the wire dtype: uint16 for bfloat16/float16 (Arrow has no bfloat16),
float32 for float32. A tensor the spec asks as float8_e4m3 (`tensor_dtypes`, aux or teacher) is
sent as e4m3 bytes (E = uint8) plus a column `<name>_scale` of float32 [t, G] (one scale per token
and captured layer; common/fp8.py): the server casts; `decode_batch` upcasts back to the wire dtype
in one pass into one new tensor, or, with keep_fp8 (the trainer's client), hands out `Fp8Rows`:
the bytes and scales as views of the Arrow buffers, upcast once where the batch is built. Schema metadata carries `specrelay.schema_version`, `specrelay.dtype`,
`specrelay.hidden_size`, `specrelay.teacher`, `specrelay.layer_ids`, `specrelay.tensor_dtypes` (absent in streams and caches
written before feature specs: those carry three layers).

Decoding never copies: the fixed-size-list child buffer of a column is one contiguous
[N, width] array; `torch.frombuffer` over the Arrow buffer gives a tensor whose data pointer is
the buffer's address (tests check this), and per-row tensors are slices of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from common.errors import SchemaError
from common.fp8 import FP8_E4M3, TENSOR_WIRE_DTYPES, Fp8Rows, dequantize_e4m3, quantize_e4m3

FEATURE_SCHEMA_VERSION = 1

_META_VERSION = b"specrelay.schema_version"
_META_DTYPE = b"specrelay.dtype"
_META_HIDDEN = b"specrelay.hidden_size"
_META_TEACHER = b"specrelay.teacher"
_META_TOPK = b"specrelay.topk"
_META_LAYERS = b"specrelay.layer_ids"
_META_TENSOR_DTYPES = b"specrelay.tensor_dtypes"

TEACHER_MODES = ("none", "hidden", "topk")
FEATURE_TENSORS = ("aux", "teacher")  # the float tensors whose wire dtype a spec may choose


def normalize_tensor_dtypes(value) -> tuple[tuple[str, str], ...]:
    """{name: dtype} / [(name, dtype)] / "aux=float8_e4m3,teacher=..." -> sorted pairs, checked."""
    if isinstance(value, str):
        value = [kv.split("=", 1) for kv in value.split(",") if kv]
    pairs = sorted((str(k), str(v)) for k, v in (value.items() if isinstance(value, dict) else value))
    for name, dtype in pairs:
        if name not in FEATURE_TENSORS:
            raise SchemaError(f"feature spec: tensor {name!r} has no choosable dtype; use one of {FEATURE_TENSORS}")
        if dtype not in TENSOR_WIRE_DTYPES:
            raise SchemaError(f"feature spec: wire dtype {dtype!r} for {name} is not one of {TENSOR_WIRE_DTYPES} "
                              "(leave the tensor out to get the server's dtype)")
    if len({k for k, _ in pairs}) != len(pairs):
        raise SchemaError(f"feature spec: a tensor is named twice in {pairs}")
    return tuple(pairs)
LEGACY_NUM_LAYERS = 3  # streams/caches without specrelay.layer_ids (EAGLE-3's three layers)


@dataclass(frozen=True)
class FeatureSpec:
    """The named features a draft method asks the target for (chosen at the handshake).

    `layer_ids` are 0-indexed decoder layers whose *outputs* are captured, concatenated in this
    order (the last layer's output is taken before the final norm; the normed one is
    teacher="hidden"). Teacher: "none", "hidden" (final normed hidden state [T, H]) or "topk"
    (top-`topk` target log-probs). Servers check a spec against their model at the handshake
    (common.contract.check_feature_spec) and refuse what they cannot capture.
    `tensor_dtypes`: per tensor ("aux", "teacher"), a wire dtype other than the server's
    ("float8_e4m3": e4m3 with a per-token scale, half of bf16's bytes); absent = server's dtype.
    """

    layer_ids: tuple[int, ...]
    teacher: str = "hidden"
    topk: int = 0
    tensor_dtypes: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_ids", tuple(int(i) for i in self.layer_ids))
        object.__setattr__(self, "tensor_dtypes", normalize_tensor_dtypes(self.tensor_dtypes))
        if self.teacher != "hidden" and "teacher" in dict(self.tensor_dtypes):
            raise SchemaError(f"feature spec: a teacher wire dtype needs teacher=hidden (teacher is {self.teacher})")
        if self.teacher not in TEACHER_MODES:
            raise SchemaError(f"feature spec: teacher {self.teacher!r} is not one of {TEACHER_MODES}")
        if not self.layer_ids:
            raise SchemaError("feature spec: at least one layer id is needed")
        if len(set(self.layer_ids)) != len(self.layer_ids):
            raise SchemaError(f"feature spec: layer ids {list(self.layer_ids)} repeat a layer")
        if self.teacher == "topk" and self.topk <= 0:
            raise SchemaError("feature spec: teacher=topk needs topk > 0")

    def __str__(self) -> str:
        t = f"topk{self.topk}" if self.teacher == "topk" else self.teacher
        wire = "".join(f", {k} as {v}" for k, v in self.tensor_dtypes)
        return f"layers {list(self.layer_ids)}, teacher {t}{wire}"

WIRE_DTYPES: dict[str, tuple[torch.dtype, pa.DataType]] = {
    "bfloat16": (torch.bfloat16, pa.uint16()),
    "float16": (torch.float16, pa.uint16()),
    "float32": (torch.float32, pa.float32()),
}
_TORCH_TO_WIRE = {v[0]: k for k, v in WIRE_DTYPES.items()}


def wire_dtype_name(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, str):
        aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
        name = aliases.get(dtype, dtype)
        if name not in WIRE_DTYPES:
            raise SchemaError(f"unsupported wire dtype {dtype!r}; use one of {list(WIRE_DTYPES)}")
        return name
    if dtype not in _TORCH_TO_WIRE:
        raise SchemaError(f"unsupported wire dtype {dtype}; use one of {list(WIRE_DTYPES)}")
    return _TORCH_TO_WIRE[dtype]


def _storage_np_dtype(storage: pa.DataType) -> np.dtype:
    return np.dtype(storage.to_pandas_dtype())


@dataclass(frozen=True)
class FeatureSchema:
    hidden_size: int
    dtype: str  # wire dtype name
    teacher: str = "hidden"  # "none" | "hidden" | "topk"
    topk: int = 0
    layer_ids: tuple[int, ...] = ()  # empty: a stream from before feature specs (three layers)
    tensor_dtypes: tuple[tuple[str, str], ...] = ()  # e.g. (("aux", "float8_e4m3"),): sent as e4m3 + scales

    def __post_init__(self) -> None:
        object.__setattr__(self, "tensor_dtypes", normalize_tensor_dtypes(self.tensor_dtypes))

    @classmethod
    def for_spec(cls, spec: FeatureSpec, hidden_size: int, dtype: str) -> "FeatureSchema":
        return cls(hidden_size, dtype, spec.teacher, spec.topk, tuple(spec.layer_ids), spec.tensor_dtypes)

    def is_fp8(self, name: str) -> bool:
        return dict(self.tensor_dtypes).get(name) == FP8_E4M3

    def _float_fields(self, name: str, width: int, storage: pa.DataType) -> list[pa.Field]:
        if not self.is_fp8(name):
            return [pa.field(name, pa.list_(pa.list_(storage, width)), nullable=False)]
        return [pa.field(name, pa.list_(pa.list_(pa.uint8(), width)), nullable=False),
                pa.field(f"{name}_scale", pa.list_(pa.list_(pa.float32(), width // self.hidden_size)), nullable=False)]

    @property
    def aux_width(self) -> int:
        return (len(self.layer_ids) or LEGACY_NUM_LAYERS) * self.hidden_size

    def arrow(self) -> pa.Schema:
        storage = WIRE_DTYPES[self.dtype][1]
        H = self.hidden_size
        fields = [
            pa.field("sample_id", pa.int64(), nullable=False),
            pa.field("start", pa.int32(), nullable=False),
            pa.field("num_tokens", pa.int32(), nullable=False),
            *self._float_fields("aux", self.aux_width, storage),
        ]
        if self.teacher == "none":
            pass
        elif self.teacher == "hidden":
            fields += self._float_fields("teacher", H, storage)
        elif self.teacher == "topk":
            fields.append(pa.field("topk_ids", pa.list_(pa.list_(pa.int32(), self.topk)), nullable=False))
            fields.append(pa.field("topk_logprobs", pa.list_(pa.list_(pa.float32(), self.topk)), nullable=False))
        else:
            raise SchemaError(f"unknown teacher mode {self.teacher!r}")
        meta = {
            _META_VERSION: str(FEATURE_SCHEMA_VERSION).encode(),
            _META_DTYPE: self.dtype.encode(),
            _META_HIDDEN: str(H).encode(),
            _META_TEACHER: self.teacher.encode(),
            _META_TOPK: str(self.topk).encode(),
        }
        if self.layer_ids:
            meta[_META_LAYERS] = ",".join(map(str, self.layer_ids)).encode()
        if self.tensor_dtypes:
            meta[_META_TENSOR_DTYPES] = ",".join(f"{k}={v}" for k, v in self.tensor_dtypes).encode()
        return pa.schema(fields, metadata=meta)

    @classmethod
    def from_arrow(cls, schema: pa.Schema) -> "FeatureSchema":
        meta = schema.metadata or {}
        try:
            version = int(meta[_META_VERSION])
        except (KeyError, ValueError):
            raise SchemaError("feature batch has no specrelay.schema_version metadata: not a SpecRelay feature stream") from None
        if version != FEATURE_SCHEMA_VERSION:
            raise SchemaError(
                f"feature schema version {version} from the server, but this trainer speaks version "
                f"{FEATURE_SCHEMA_VERSION}: upgrade the older side"
            )
        out = cls(
            hidden_size=int(meta[_META_HIDDEN]),
            dtype=meta[_META_DTYPE].decode(),
            teacher=meta[_META_TEACHER].decode(),
            topk=int(meta.get(_META_TOPK, b"0")),
            layer_ids=tuple(int(x) for x in meta.get(_META_LAYERS, b"").decode().split(",") if x),
            tensor_dtypes=meta.get(_META_TENSOR_DTYPES, b"").decode(),
        )
        if not out.arrow().equals(schema, check_metadata=False):
            raise SchemaError(f"feature batch schema does not match its metadata:\n{schema}")
        return out


@dataclass
class SampleFeatures:
    """Features for one sample (or one chunk of it). Tensors may be views of Arrow buffers; aux and
    teacher may be `Fp8Rows` (fp8 on the wire, kept as it arrived: `upcast()` for tensors)."""

    sample_id: int
    start: int
    num_tokens: int
    aux_T3H: torch.Tensor | Fp8Rows
    teacher_TH: torch.Tensor | Fp8Rows | None = None
    topk_ids_TK: torch.Tensor | None = None
    topk_logprobs_TK: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.aux_T3H.shape[0]

    def upcast(self) -> "SampleFeatures":
        """The same features with any Fp8Rows decoded into the served dtype (self if there are none)."""
        if not isinstance(self.aux_T3H, Fp8Rows) and not isinstance(self.teacher_TH, Fp8Rows):
            return self
        up = lambda x: x.upcast() if isinstance(x, Fp8Rows) else x  # noqa: E731
        return SampleFeatures(self.sample_id, self.start, self.num_tokens, up(self.aux_T3H), up(self.teacher_TH),
                              self.topk_ids_TK, self.topk_logprobs_TK)


def concat_rows(ts: list[torch.Tensor]) -> torch.Tensor:
    """Join [t_i, W] blocks (or Fp8Rows) along dim 0; a single block is returned as-is (no copy).

    The copy goes through numpy, single-threaded, on purpose: it is memory-bound, so torch's
    intra-op threads gain nothing, and when it runs on a data-plane thread next to a busy model
    (server) or training step (trainer) they oversubscribe the cores; on the loaded 2-core test
    machine torch.cat of 12 MiB took ~60 ms with 2 threads and ~1.6 ms single-threaded.
    """
    if len(ts) == 1:
        return ts[0]
    if isinstance(ts[0], Fp8Rows):
        return Fp8Rows.cat(ts)
    dtype = ts[0].dtype
    store = torch.int16 if dtype in (torch.bfloat16, torch.float16) else dtype  # numpy has no bfloat16
    joined = np.concatenate([t.detach().to("cpu").contiguous().view(store).numpy() for t in ts])
    return torch.from_numpy(joined).view(dtype)


def _tensor_to_storage_np(x: torch.Tensor, dtype_name: str) -> np.ndarray:
    torch_dtype, storage = WIRE_DTYPES[dtype_name]
    x = x.detach().to(device="cpu", dtype=torch_dtype).contiguous()
    if storage == pa.uint16():
        x = x.view(torch.uint16) if hasattr(torch, "uint16") else x.view(torch.int16)
    return x.numpy().reshape(-1)


def _nested_list(flat: np.ndarray, width: int, lengths: list[int], storage: pa.DataType) -> pa.Array:
    inner = pa.FixedSizeListArray.from_arrays(pa.array(flat.view(_storage_np_dtype(storage)), type=storage), width)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), inner)


def _float_columns(schema: FeatureSchema, name: str, x_NW: torch.Tensor | Fp8Rows, lengths: list[int]) -> list[pa.Array]:
    """The Arrow column(s) of one float tensor: in the wire dtype, or e4m3 bytes + per-token scales.
    Fp8Rows (features a client kept as they arrived) go out as they are, or upcast once."""
    W = x_NW.shape[1]
    if isinstance(x_NW, Fp8Rows) and not schema.is_fp8(name):
        x_NW = x_NW.upcast()
    if schema.is_fp8(name):
        if isinstance(x_NW, Fp8Rows):
            q_NW, scale_NG = x_NW.q_NW.contiguous(), x_NW.scale_NG.contiguous()
        else:
            q_NW, scale_NG = quantize_e4m3(x_NW, schema.hidden_size)
        return [_nested_list(q_NW.numpy().reshape(-1), W, lengths, pa.uint8()),
                _nested_list(scale_NG.numpy().reshape(-1), scale_NG.shape[1], lengths, pa.float32())]
    storage = WIRE_DTYPES[schema.dtype][1]
    return [_nested_list(_tensor_to_storage_np(x_NW, schema.dtype), W, lengths, storage)]


def encode_batch(schema: FeatureSchema, rows: list[SampleFeatures]) -> pa.RecordBatch:
    """Build one record batch from sample chunks (server side; one copy into Arrow memory)."""
    if not rows:
        raise SchemaError("cannot encode an empty feature batch")
    H = schema.hidden_size
    lengths = [r.length for r in rows]
    W = schema.aux_width
    for r in rows:
        if r.aux_T3H.ndim != 2 or r.aux_T3H.shape[1] != W:
            raise SchemaError(f"sample {r.sample_id}: aux must be [T, {W}], got {tuple(r.aux_T3H.shape)}")
    arrays = [
        pa.array([r.sample_id for r in rows], pa.int64()),
        pa.array([r.start for r in rows], pa.int32()),
        pa.array([r.num_tokens for r in rows], pa.int32()),
        *_float_columns(schema, "aux", concat_rows([r.aux_T3H for r in rows]), lengths),
    ]
    if schema.teacher == "hidden":
        for r in rows:
            if r.teacher_TH is None or tuple(r.teacher_TH.shape) != (r.length, H):
                got = None if r.teacher_TH is None else tuple(r.teacher_TH.shape)
                raise SchemaError(f"sample {r.sample_id}: teacher must be [{r.length}, {H}], got {got}")
        arrays += _float_columns(schema, "teacher", concat_rows([r.teacher_TH for r in rows]), lengths)
    elif schema.teacher == "topk":
        K = schema.topk
        ids = concat_rows([r.topk_ids_TK for r in rows]).to(torch.int32).contiguous().numpy().reshape(-1)
        lps = concat_rows([r.topk_logprobs_TK for r in rows]).to(torch.float32).contiguous().numpy().reshape(-1)
        arrays.append(_nested_list(ids, K, lengths, pa.int32()))
        arrays.append(_nested_list(lps, K, lengths, pa.float32()))
    return pa.RecordBatch.from_arrays(arrays, schema=schema.arrow())


def _column_tensor(col: pa.Array, width: int, torch_dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray]:
    """Zero-copy: list<fixed_size_list<E,width>> column -> ([N, width] tensor view, row offsets)."""
    if col.null_count:
        raise SchemaError("feature column has nulls")
    inner = col.values  # FixedSizeListArray child of the whole (unsliced) column
    values = inner.values
    buf = values.buffers()[1]
    itemsize = values.type.bit_width // 8
    first = (inner.offset * width + values.offset)
    n_rows = len(inner)
    count = n_rows * width
    if count == 0:
        flat = torch.empty(0, dtype=torch_dtype)
    else:
        # numpy reads Arrow's (read-only) buffer protocol without copying; torch shares numpy's memory.
        arr = np.frombuffer(buf, dtype=_storage_np_dtype(values.type), count=count, offset=first * itemsize)
        flat = torch.from_numpy(arr).view(torch_dtype)
    offsets = np.frombuffer(col.buffers()[1], dtype=np.int32, count=len(col) + 1, offset=col.offset * 4)
    # Offsets index the whole child array (`col.values` ignores a slice's offset), so keep them absolute.
    return flat.view(n_rows, width), offsets


def _float_column(batch: pa.RecordBatch, schema: FeatureSchema, name: str, width: int,
                  torch_dtype: torch.dtype, keep_fp8: bool) -> tuple[torch.Tensor | Fp8Rows, np.ndarray]:
    """A float tensor column as [N, width] in the wire dtype: a view of the Arrow buffer, or (fp8)
    one upcast of the e4m3 bytes (read in place) times their scales, or (keep_fp8) both as views."""
    if not schema.is_fp8(name):
        return _column_tensor(batch.column(name), width, torch_dtype)
    q_NW, offs = _column_tensor(batch.column(name), width, torch.uint8)
    scale_NG, _ = _column_tensor(batch.column(f"{name}_scale"), width // schema.hidden_size, torch.float32)
    if keep_fp8:
        return Fp8Rows(q_NW, scale_NG, torch_dtype), offs
    return dequantize_e4m3(q_NW, scale_NG, torch_dtype), offs


def decode_batch(batch: pa.RecordBatch, keep_fp8: bool = False) -> list[SampleFeatures]:
    """Record batch -> per-row SampleFeatures whose tensors are views of the Arrow buffers.

    The tensors share memory with `batch` (keep the batch alive, or copy, before mutating).
    fp8 columns are upcast to the wire dtype (one new tensor per column), or with `keep_fp8`
    kept as `Fp8Rows` views of the bytes and scales (nothing copied: the trainer upcasts them
    into its batch, see draft_trainer/data/batch.py).
    """
    schema = FeatureSchema.from_arrow(batch.schema)
    torch_dtype = WIRE_DTYPES[schema.dtype][0]
    H = schema.hidden_size
    import warnings

    with warnings.catch_warnings():
        # from_numpy warns that Arrow buffers are read-only; we never write through these views.
        warnings.simplefilter("ignore", UserWarning)
        aux, offs = _float_column(batch, schema, "aux", schema.aux_width, torch_dtype, keep_fp8)
        cols = {}
        if schema.teacher == "hidden":
            cols["teacher_TH"], _ = _float_column(batch, schema, "teacher", H, torch_dtype, keep_fp8)
        elif schema.teacher == "topk":
            cols["topk_ids_TK"], _ = _column_tensor(batch.column("topk_ids"), schema.topk, torch.int32)
            cols["topk_logprobs_TK"], _ = _column_tensor(batch.column("topk_logprobs"), schema.topk, torch.float32)
    ids = batch.column("sample_id").to_numpy()
    starts = batch.column("start").to_numpy()
    totals = batch.column("num_tokens").to_numpy()
    out = []
    for i in range(batch.num_rows):
        a, b = int(offs[i]), int(offs[i + 1])
        out.append(SampleFeatures(
            sample_id=int(ids[i]), start=int(starts[i]), num_tokens=int(totals[i]), aux_T3H=aux[a:b],
            **{k: v[a:b] for k, v in cols.items()},
        ))
    return out


def split_rows(row: SampleFeatures, max_tokens: int) -> list[SampleFeatures]:
    """Split one sample's features into chunks of at most max_tokens rows (views, no copy)."""
    if row.length <= max_tokens:
        return [row]
    out = []
    for s in range(0, row.length, max_tokens):
        e = min(s + max_tokens, row.length)
        out.append(SampleFeatures(
            sample_id=row.sample_id, start=row.start + s, num_tokens=row.num_tokens, aux_T3H=row.aux_T3H[s:e],
            teacher_TH=None if row.teacher_TH is None else row.teacher_TH[s:e],
            topk_ids_TK=None if row.topk_ids_TK is None else row.topk_ids_TK[s:e],
            topk_logprobs_TK=None if row.topk_logprobs_TK is None else row.topk_logprobs_TK[s:e],
        ))
    return out


class SampleAssembler:
    """Joins the chunks of each sample, in order, as they arrive from a stream.

    A sample that arrived in one chunk is returned as-is (still a zero-copy view); a sample that
    spanned several chunks is concatenated once.
    """

    def __init__(self) -> None:
        self._parts: dict[int, list[SampleFeatures]] = {}
        self._have: dict[int, int] = {}

    def add(self, row: SampleFeatures) -> SampleFeatures | None:
        have = self._have.get(row.sample_id, 0)
        if row.start != have:
            raise SchemaError(f"sample {row.sample_id}: chunk starts at token {row.start}, expected {have}")
        if row.start == 0 and row.length == row.num_tokens:
            return row
        self._parts.setdefault(row.sample_id, []).append(row)
        self._have[row.sample_id] = have + row.length
        if self._have[row.sample_id] < row.num_tokens:
            return None
        parts = self._parts.pop(row.sample_id)
        del self._have[row.sample_id]

        def cat(name: str) -> torch.Tensor | None:
            ts = [getattr(p, name) for p in parts]
            return None if ts[0] is None else concat_rows(ts)

        return SampleFeatures(
            sample_id=row.sample_id, start=0, num_tokens=row.num_tokens, aux_T3H=cat("aux_T3H"),
            teacher_TH=cat("teacher_TH"), topk_ids_TK=cat("topk_ids_TK"), topk_logprobs_TK=cat("topk_logprobs_TK"),
        )

    @property
    def pending(self) -> list[int]:
        return list(self._parts)
