"""The ModelInfo contract between target servers and trainers, and its compatibility check.

A trainer calls GetModelInfo on every server before training. All servers in a pool must agree
with each other and with the run on every field in `MUST_AGREE`; a mismatch is a
ContractError that names the field and both values, raised before any training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from common.errors import ContractError
from common.features import FeatureSpec
from common.rpc import target_pb2 as pb

SERVER_VERSION = "0.1.0"

TEACHER_HIDDEN = "hidden"
TEACHER_TOPK = "topk"
TEACHER_NONE = "none"
_TEACHER_TO_PB = {TEACHER_HIDDEN: pb.TEACHER_MODE_HIDDEN, TEACHER_TOPK: pb.TEACHER_MODE_TOPK,
                  TEACHER_NONE: pb.TEACHER_MODE_NONE}
_PB_TO_TEACHER = {v: k for k, v in _TEACHER_TO_PB.items()}


def teacher_mode_to_pb(mode: str) -> int:
    try:
        return _TEACHER_TO_PB[mode]
    except KeyError:
        raise ContractError(f"unknown teacher mode {mode!r}; use one of {list(_TEACHER_TO_PB)}") from None


def teacher_mode_from_pb(value: int) -> str:
    try:
        return _PB_TO_TEACHER[value]
    except KeyError:
        raise ContractError(f"unknown teacher mode enum value {value}") from None


def default_aux_layers(num_layers: int) -> list[int]:
    """EAGLE-3's default: outputs of 0-indexed decoder layers [1, L//2 - 1, L - 4]."""
    if num_layers < 8:  # below 8, [1, L//2 - 1, L - 4] repeats a layer (L = 5, 6) or is not increasing
        # Tiny test models: keep three distinct, capturable layers (never the last one, whose
        # output is only available after the final norm in some engines).
        return sorted({0, max(0, num_layers // 2 - 1), max(0, num_layers - 2)})
    return [1, num_layers // 2 - 1, num_layers - 4]


def parse_aux_layers(spec: str | list[int], num_layers: int) -> list[int]:
    """`auto` or `i,j,k` -> validated list of layer ids (ContractError on bad input)."""
    if isinstance(spec, str):
        if spec.strip() == "auto":
            return default_aux_layers(num_layers)
        try:
            ids = [int(x) for x in spec.split(",") if x.strip()]
        except ValueError:
            raise ContractError(f"--aux-layers {spec!r}: expected 'auto' or comma-separated integers like 1,14,26") from None
    else:
        ids = list(spec)
    if len(ids) != 3:
        raise ContractError(f"aux layers {ids}: EAGLE-3 needs exactly three layer ids")
    for i in ids:
        if not 0 <= i < num_layers - 1:
            raise ContractError(
                f"aux layer {i} is out of range for a {num_layers}-layer model: use 0..{num_layers - 2} "
                "(the last layer's output is the teacher, not an aux feature)"
            )
    if len(set(ids)) != 3:
        raise ContractError(f"aux layers {ids} must be distinct")
    return ids


# FetchTensors names. Every trainer needs the first three; decoder-layer weights
# ("layers.<i>.<suffix>", e.g. "layers.27.self_attn.q_proj") serve draft initialisation from a
# target layer (draft_trainer/model/init.py). Suffixes are HF Llama-family module paths.
FROZEN_TENSOR_NAMES = ("embed_tokens", "lm_head", "final_norm")
LAYER_TENSOR_SUFFIXES = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                         "self_attn.o_proj", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj",
                         "mlp.down_proj")


def layer_tensor_name(layer: int, suffix: str) -> str:
    return f"layers.{layer}.{suffix}"


def parse_tensor_name(name: str, num_layers: int) -> tuple[int, str] | None:
    """None for a frozen tensor name, (layer, suffix) for a decoder-layer weight; ContractError otherwise."""
    if name in FROZEN_TENSOR_NAMES:
        return None
    head, _, rest = name.partition(".")
    idx, _, suffix = rest.partition(".")
    if head == "layers" and idx.isdigit() and suffix in LAYER_TENSOR_SUFFIXES:
        if int(idx) >= num_layers:
            raise ContractError(f"tensor {name!r}: layer {idx} out of range (the model has {num_layers} layers)")
        return int(idx), suffix
    raise ContractError(f"unknown tensor name {name!r}; available: {list(FROZEN_TENSOR_NAMES)} and "
                        f"layers.<0..{num_layers - 1}>.<{'|'.join(LAYER_TENSOR_SUFFIXES)}>")


@dataclass
class ModelInfo:
    """Python mirror of specrelay.v1.ModelInfo (see proto/specrelay/v1/target.proto)."""

    architecture: str
    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    aux_layer_ids: list[int]
    dtype: str
    max_length: int
    tokenizer_fingerprint: str
    chat_template: str = ""
    teacher_modes: list[str] = field(default_factory=lambda: [TEACHER_HIDDEN])
    max_topk: int = 0
    hf_config_json: str = "{}"
    backend: str = ""
    model_name: str = ""
    server_version: str = SERVER_VERSION
    feature_schema_version: int = 1
    flight_port: int = 0
    max_batch_tokens: int = 0
    max_request_tokens: int = 0
    max_capture_layer: int = 0     # highest layer id a request may name; 0 = only aux_layer_ids (older servers)

    @property
    def hf_config(self) -> dict[str, Any]:
        return json.loads(self.hf_config_json or "{}")

    def to_proto(self) -> pb.ModelInfo:
        d = dataclasses.asdict(self)
        d["teacher_modes"] = [teacher_mode_to_pb(m) for m in self.teacher_modes]
        return pb.ModelInfo(**d)

    @classmethod
    def from_proto(cls, msg: pb.ModelInfo) -> "ModelInfo":
        kwargs = {}
        for f in dataclasses.fields(cls):
            v = getattr(msg, f.name)
            if f.name == "teacher_modes":
                v = [teacher_mode_from_pb(x) for x in v]
            elif f.name == "aux_layer_ids":
                v = list(v)
            kwargs[f.name] = v
        return cls(**kwargs)


# Fields every server in a pool, and the run itself, must agree on.
MUST_AGREE = (
    "tokenizer_fingerprint",
    "hidden_size",
    "num_layers",
    "vocab_size",
    "aux_layer_ids",
    "dtype",
    "feature_schema_version",
)


def check_compatible(expected: ModelInfo, actual: ModelInfo, *, expected_name: str, actual_name: str,
                     teacher_mode: str | None = None) -> None:
    """Raise ContractError naming every field where `actual` disagrees with `expected`."""
    problems = []
    for name in MUST_AGREE:
        a, b = getattr(expected, name), getattr(actual, name)
        if a != b:
            problems.append(f"{name}: {expected_name} has {a!r} but {actual_name} has {b!r}")
    if teacher_mode is not None and teacher_mode not in actual.teacher_modes:
        problems.append(f"teacher mode {teacher_mode!r} is not offered by {actual_name} (offers {actual.teacher_modes})")
    if problems:
        raise ContractError(
            "target model contract mismatch:\n  " + "\n  ".join(problems)
            + "\nEvery server must run the same model, tokenizer, aux layers and dtype as the run."
        )


def check_feature_spec(info: ModelInfo, spec: FeatureSpec, *, where: str = "the target") -> None:
    """Raise ContractError naming every layer id or teacher mode `info`'s server cannot capture."""
    problems = []
    if not info.max_capture_layer:
        if list(spec.layer_ids) != list(info.aux_layer_ids):
            problems.append(f"{where} only sends its aux layers {list(info.aux_layer_ids)} (a server from before "
                            "feature specs: upgrade it)")
    else:
        bad = [i for i in spec.layer_ids if not 0 <= i <= info.max_capture_layer]
        if bad:
            problems.append(f"layer ids {bad} cannot be captured by {where} ({info.num_layers} decoder layers; "
                            f"it captures 0..{info.max_capture_layer})")
    if spec.teacher == TEACHER_NONE and not info.max_capture_layer:
        problems.append(f"teacher mode 'none' needs a server that speaks feature specs; {where} does not (upgrade it)")
    if spec.teacher != TEACHER_NONE and spec.teacher not in info.teacher_modes:
        problems.append(f"teacher mode {spec.teacher!r} is not offered by {where} (offers {info.teacher_modes})")
    if spec.teacher == TEACHER_TOPK and info.max_topk and spec.topk > info.max_topk:
        problems.append(f"topk {spec.topk} exceeds {where}'s max_topk {info.max_topk}")
    if problems:
        raise ContractError(f"feature spec ({spec}) cannot be served: " + "; ".join(problems))


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over the vocabulary (token -> id) and the special tokens.

    Independent of how the tokenizer was stored (tokenizer.json, GGUF, sentencepiece), so two
    copies of the same vocabulary agree and any change to an id does not.
    """
    h = hashlib.sha256()
    vocab = tokenizer.get_vocab()
    for tok, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
        h.update(f"{idx}\t{tok}\n".encode())
    specials = {k: str(v) for k, v in sorted((tokenizer.special_tokens_map or {}).items())}
    h.update(json.dumps(specials, sort_keys=True).encode())
    return h.hexdigest()
