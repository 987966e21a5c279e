"""transformers helpers shared by the backends that load a local HF model directory (hf, sglang).

Legend (shapes): V vocab size.

Kept apart from hf.py so the sglang backend never imports the HF backend.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from common.contract import TEACHER_HIDDEN, TEACHER_TOPK, ModelInfo, tokenizer_fingerprint
from common.errors import AssetError
from common.features import FEATURE_SCHEMA_VERSION, wire_dtype_name
from common.hardware import pick_dtype

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MAX_TOPK = 64


def check_model_dir(model_path: str | Path) -> Path:
    """The model directory as a Path, or an AssetError saying what to point at."""
    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise AssetError(f"--model {path}: no config.json there; point at a local HF model directory")
    return path


def resolve_dtype(dtype: str, device: str = "cpu") -> torch.dtype:
    """--dtype as a torch dtype; `auto` is bf16 where `device` computes it natively, else fp32."""
    return DTYPES[pick_dtype(dtype, device, setting="--dtype")]


def hf_model_info(cfg, tokenizer, *, backend: str, model_name: str, num_layers: int, hidden_size: int,
                  vocab_size: int, aux_layer_ids: list[int], dtype: torch.dtype, max_length: int, max_topk: int,
                  default_arch: str, max_capture_layer: int = 0) -> ModelInfo:
    """The contract for a model described by a transformers config + tokenizer (hf and sglang backends)."""
    return ModelInfo(
        architecture=(cfg.architectures or [default_arch])[0],
        model_type=cfg.model_type,
        num_layers=num_layers,
        hidden_size=hidden_size,
        vocab_size=vocab_size,
        aux_layer_ids=list(aux_layer_ids),
        dtype=wire_dtype_name(dtype),
        max_length=max_length,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        chat_template=tokenizer.chat_template or "",
        teacher_modes=[TEACHER_HIDDEN, TEACHER_TOPK],  # teacher "none" is served by every spec-aware server
        max_capture_layer=max_capture_layer,
        max_topk=max_topk,
        hf_config_json=json.dumps(cfg.to_dict(), default=str),
        backend=backend,
        model_name=model_name,
        feature_schema_version=FEATURE_SCHEMA_VERSION,
    )


def sample_next(logits_V: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    """Greedy when temperature <= 0, else temperature + nucleus (top_p) sampling with `gen`."""
    logits_V = logits_V.float()
    if temperature <= 0:
        return int(logits_V.argmax())
    probs = torch.softmax(logits_V / temperature, dim=-1)
    if 0 < top_p < 1:
        sp, si = probs.sort(descending=True)
        keep = sp.cumsum(0) - sp < top_p
        probs = torch.zeros_like(probs).scatter_(0, si[keep], sp[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


def eos_ids(*configs) -> list[int]:
    """The eos token ids: the first config (generation config, then model config) that sets any."""
    eos = None
    for c in configs:
        eos = eos or getattr(c, "eos_token_id", None)
    if eos is None:
        return []
    return list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]


def render_chat(tokenizer, messages: list[dict], template_kwargs: dict) -> list[int]:
    """Token ids of `messages` + the generation prompt, with the tokenizer's chat template and
    extra template variables (e.g. enable_thinking=False)."""
    if not tokenizer.chat_template:
        raise NotImplementedError("the served tokenizer has no chat template: send token_ids")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **template_kwargs)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
