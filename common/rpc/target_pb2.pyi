from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TeacherMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TEACHER_MODE_UNSPECIFIED: _ClassVar[TeacherMode]
    TEACHER_MODE_HIDDEN: _ClassVar[TeacherMode]
    TEACHER_MODE_TOPK: _ClassVar[TeacherMode]
    TEACHER_MODE_NONE: _ClassVar[TeacherMode]
TEACHER_MODE_UNSPECIFIED: TeacherMode
TEACHER_MODE_HIDDEN: TeacherMode
TEACHER_MODE_TOPK: TeacherMode
TEACHER_MODE_NONE: TeacherMode

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("server_version", "feature_schema_version", "backend", "model_name", "architecture", "model_type", "num_layers", "hidden_size", "vocab_size", "aux_layer_ids", "dtype", "max_length", "tokenizer_fingerprint", "chat_template", "teacher_modes", "max_topk", "hf_config_json", "flight_port", "max_batch_tokens", "max_request_tokens", "max_capture_layer")
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    AUX_LAYER_IDS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    TEACHER_MODES_FIELD_NUMBER: _ClassVar[int]
    MAX_TOPK_FIELD_NUMBER: _ClassVar[int]
    HF_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    FLIGHT_PORT_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_CAPTURE_LAYER_FIELD_NUMBER: _ClassVar[int]
    server_version: str
    feature_schema_version: int
    backend: str
    model_name: str
    architecture: str
    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    aux_layer_ids: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    max_length: int
    tokenizer_fingerprint: str
    chat_template: str
    teacher_modes: _containers.RepeatedScalarFieldContainer[TeacherMode]
    max_topk: int
    hf_config_json: str
    flight_port: int
    max_batch_tokens: int
    max_request_tokens: int
    max_capture_layer: int
    def __init__(self, server_version: _Optional[str] = ..., feature_schema_version: _Optional[int] = ..., backend: _Optional[str] = ..., model_name: _Optional[str] = ..., architecture: _Optional[str] = ..., model_type: _Optional[str] = ..., num_layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., vocab_size: _Optional[int] = ..., aux_layer_ids: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., max_length: _Optional[int] = ..., tokenizer_fingerprint: _Optional[str] = ..., chat_template: _Optional[str] = ..., teacher_modes: _Optional[_Iterable[_Union[TeacherMode, str]]] = ..., max_topk: _Optional[int] = ..., hf_config_json: _Optional[str] = ..., flight_port: _Optional[int] = ..., max_batch_tokens: _Optional[int] = ..., max_request_tokens: _Optional[int] = ..., max_capture_layer: _Optional[int] = ...) -> None: ...

class FetchTensorsRequest(_message.Message):
    __slots__ = ("names", "chunk_bytes")
    NAMES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    chunk_bytes: int
    def __init__(self, names: _Optional[_Iterable[str]] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("data", "offset", "total_bytes", "sha256")
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    offset: int
    total_bytes: int
    sha256: str
    def __init__(self, data: _Optional[bytes] = ..., offset: _Optional[int] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class FeatureRequest(_message.Message):
    __slots__ = ("request_id", "sample_ids", "token_ids", "lengths", "teacher_mode", "topk", "feature_schema_version", "client_id", "deadline_unix_s", "expect_dtype", "layer_ids", "tensor_dtypes")
    class TensorDtypesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    TEACHER_MODE_FIELD_NUMBER: _ClassVar[int]
    TOPK_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    EXPECT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    LAYER_IDS_FIELD_NUMBER: _ClassVar[int]
    TENSOR_DTYPES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    sample_ids: _containers.RepeatedScalarFieldContainer[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    lengths: _containers.RepeatedScalarFieldContainer[int]
    teacher_mode: TeacherMode
    topk: int
    feature_schema_version: int
    client_id: str
    deadline_unix_s: float
    expect_dtype: str
    layer_ids: _containers.RepeatedScalarFieldContainer[int]
    tensor_dtypes: _containers.ScalarMap[str, str]
    def __init__(self, request_id: _Optional[str] = ..., sample_ids: _Optional[_Iterable[int]] = ..., token_ids: _Optional[_Iterable[int]] = ..., lengths: _Optional[_Iterable[int]] = ..., teacher_mode: _Optional[_Union[TeacherMode, str]] = ..., topk: _Optional[int] = ..., feature_schema_version: _Optional[int] = ..., client_id: _Optional[str] = ..., deadline_unix_s: _Optional[float] = ..., expect_dtype: _Optional[str] = ..., layer_ids: _Optional[_Iterable[int]] = ..., tensor_dtypes: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompts", "max_new_tokens", "temperature", "top_p", "seed", "stop_token_ids", "top_k", "stop", "client_id", "chat_template_kwargs_json")
    class Prompt(_message.Message):
        __slots__ = ("id", "token_ids", "messages_json")
        ID_FIELD_NUMBER: _ClassVar[int]
        TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
        MESSAGES_JSON_FIELD_NUMBER: _ClassVar[int]
        id: str
        token_ids: _containers.RepeatedScalarFieldContainer[int]
        messages_json: str
        def __init__(self, id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., messages_json: _Optional[str] = ...) -> None: ...
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_KWARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    prompts: _containers.RepeatedCompositeFieldContainer[GenerateRequest.Prompt]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    top_k: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    client_id: str
    chat_template_kwargs_json: str
    def __init__(self, prompts: _Optional[_Iterable[_Union[GenerateRequest.Prompt, _Mapping]]] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., top_k: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., client_id: _Optional[str] = ..., chat_template_kwargs_json: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("completions",)
    class Completion(_message.Message):
        __slots__ = ("id", "token_ids", "finish_reason", "prompt_tokens")
        ID_FIELD_NUMBER: _ClassVar[int]
        TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
        FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
        PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
        id: str
        token_ids: _containers.RepeatedScalarFieldContainer[int]
        finish_reason: str
        prompt_tokens: int
        def __init__(self, id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[str] = ..., prompt_tokens: _Optional[int] = ...) -> None: ...
    COMPLETIONS_FIELD_NUMBER: _ClassVar[int]
    completions: _containers.RepeatedCompositeFieldContainer[GenerateResponse.Completion]
    def __init__(self, completions: _Optional[_Iterable[_Union[GenerateResponse.Completion, _Mapping]]] = ...) -> None: ...
