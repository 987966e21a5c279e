"""The EAGLE-3 draft's configuration, derived from the target's ModelInfo."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from common.contract import ModelInfo
from common.errors import ConfigError


@dataclass
class DraftConfig:
    hidden_size: int                 # h (draft) — equals the target's H by default
    target_hidden_size: int          # H
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int                  # V, the target vocabulary
    draft_vocab_size: int            # Vd
    aux_layer_ids: list[int]
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope_parameters: dict[str, Any] = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # EAGLE-3.1 (model.eagle_variant=3.1); field names as SGLang/vLLM read them from config.json.
    fc_norm: bool = False            # an RMSNorm over each aux layer's H before `fc` (weights fc_norm.{i})
    norm_output: bool = False        # the next draft step reads norm(g), the final-normed output, not g

    @classmethod
    def from_model_info(cls, info: ModelInfo, draft_vocab_size: int) -> "DraftConfig":
        hf = info.hf_config
        if not hf:
            raise ConfigError("the target's ModelInfo carries no HF config; cannot derive the draft config")
        heads = int(hf["num_attention_heads"])
        rope = hf.get("rope_parameters")
        if not rope:  # transformers 4.x configs
            rope = dict(hf.get("rope_scaling") or {})
            rope.setdefault("rope_type", rope.pop("type", "default"))
            rope["rope_theta"] = float(hf.get("rope_theta", 10000.0))
        if draft_vocab_size > info.vocab_size:
            raise ConfigError(f"draft_vocab_size {draft_vocab_size} exceeds the target vocabulary ({info.vocab_size})")
        return cls(
            hidden_size=info.hidden_size,
            target_hidden_size=info.hidden_size,
            num_attention_heads=heads,
            num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or info.hidden_size // heads),
            intermediate_size=int(hf["intermediate_size"]),
            vocab_size=info.vocab_size,
            draft_vocab_size=draft_vocab_size,
            aux_layer_ids=list(info.aux_layer_ids),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(hf.get("max_position_embeddings", info.max_length)),
            rope_parameters=dict(rope),
            hidden_act=hf.get("hidden_act", "silu"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DraftConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def llama_config(self):
        """A transformers LlamaConfig with the same geometry (rotary embedding, export)."""
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=self.hidden_size, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
            intermediate_size=self.intermediate_size, vocab_size=self.vocab_size, num_hidden_layers=1,
            rms_norm_eps=self.rms_norm_eps, max_position_embeddings=self.max_position_embeddings,
            rope_parameters=dict(self.rope_parameters), hidden_act=self.hidden_act, tie_word_embeddings=False,
        )
