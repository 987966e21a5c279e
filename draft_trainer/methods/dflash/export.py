"""DFlash's serving format: what SGLang's `--speculative-algorithm DFLASH` loads (and the z-lab
checkpoints on the Hub use the same layout, read by the `dflash` package's HF class).

Output directory: `config.json` + `model.safetensors` (bf16): no embedding and no lm_head (the
draft borrows the target's), keys exactly as SGLang 0.5.23's `DFlashDraftModel.load_weights`
maps them (srt/models/dflash.py: q/k/v_proj -> qkv_proj, gate/up_proj -> gate_up_proj, the rest
by name): see `expected_shapes`. Config fields SGLang reads (srt/speculative/dflash_utils.py
`parse_dflash_draft_config`, srt/models/dflash.py): architectures, hidden_size,
num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim, intermediate_size,
hidden_act, rms_norm_eps, attention_bias, rope_theta/rope_scaling, max_position_embeddings,
vocab_size, and `dflash_config` {block_size, target_layer_ids, mask_token_id}; no `layer_types`
and no `is_causal`, so every draft layer is full (non-causal) attention, as trained.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from common.errors import ExportError
from draft_trainer.methods.dflash.config import DFlashConfig
from draft_trainer.methods.dflash.model import DFlashDraft

WEIGHTS = "model.safetensors"
ARCHITECTURE = "DFlashDraftModel"
NOT_EXPORTED = ("d2t", "t2d")      # the run's vocabulary bookkeeping: SGLang drafts the whole vocabulary


def expected_shapes(cfg: DFlashConfig) -> dict[str, tuple[int, ...]]:
    """Every key of the export and its shape (what SGLang's loader needs)."""
    H, n, g, d, I = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, \
        cfg.intermediate_size
    out = {"fc.weight": (H, len(cfg.target_layer_ids) * H), "hidden_norm.weight": (H,), "norm.weight": (H,)}
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        out.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                    p + "self_attn.q_proj.weight": (n * d, H), p + "self_attn.k_proj.weight": (g * d, H),
                    p + "self_attn.v_proj.weight": (g * d, H), p + "self_attn.o_proj.weight": (H, n * d),
                    p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,),
                    p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H),
                    p + "mlp.down_proj.weight": (H, I)})
    return out


def sglang_config(cfg: DFlashConfig) -> dict:
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    return {
        "architectures": [ARCHITECTURE], "model_type": "qwen3",
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim, "intermediate_size": cfg.intermediate_size, "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps, "attention_bias": False, "attention_dropout": 0.0,
        "rope_theta": cfg.rope_theta, "rope_scaling": None, "rope_parameters": rope,
        "max_position_embeddings": cfg.max_position_embeddings, "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "num_target_layers": cfg.num_target_layers, "block_size": cfg.block_size,
        "dflash_config": {"block_size": cfg.block_size, "target_layer_ids": list(cfg.target_layer_ids),
                          "mask_token_id": cfg.mask_token_id},
        "specrelay": {"method": "dflash", "draft_config": cfg.to_dict()},
    }


def write_sglang(output: Path, cfg: DFlashConfig, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    want = expected_shapes(cfg)
    tensors = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in state.items() if k not in NOT_EXPORTED}
    if set(tensors) != set(want):
        raise ExportError(f"DFlash draft tensors {sorted(set(tensors) ^ set(want))} differ from the export layout")
    for k, shape in want.items():
        if tuple(tensors[k].shape) != shape:
            raise ExportError(f"DFlash tensor {k} has shape {tuple(tensors[k].shape)}, the export needs {shape}")
    save_file(tensors, str(output / WEIGHTS), metadata={"format": "pt"})
    (output / "config.json").write_text(json.dumps(sglang_config(cfg), indent=2) + "\n")


def speculators_config(cfg: DFlashConfig, model_info: dict) -> dict:
    """config.json in vllm-project/speculators' DFlash layout (src/speculators/models/dflash/config.py,
    core.py): the draft layers' Qwen3 config nested as `transformer_layer_config`, the layers as
    `aux_hidden_state_layer_ids`, a greedy proposal of block_size - 1 tokens (the anchor is the
    bonus token, `sample_from_anchor` false). A full-vocabulary draft has no lm_head, embedding or
    d2t/t2d in its weights (speculators reloads them from the verifier), so the safetensors are
    the same tensors as the SGLang export."""
    layer = {k: v for k, v in sglang_config(cfg).items()
             if k not in ("architectures", "dflash_config", "specrelay", "block_size", "num_target_layers")}
    return {
        "architectures": ["DFlashSpeculator"], "speculators_model_type": "dflash",
        "transformer_layer_config": layer, "draft_vocab_size": cfg.vocab_size, "block_size": cfg.block_size,
        "target_hidden_size": cfg.hidden_size, "aux_hidden_state_layer_ids": list(cfg.target_layer_ids),
        "mask_token_id": cfg.mask_token_id, "sample_from_anchor": False, "projector_type": "dflash",
        "speculators_config": {
            "algorithm": "dflash", "default_proposal_method": "greedy",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": cfg.block_size - 1}],
            "verifier": {"name_or_path": model_info.get("model_name") or None,
                         "architectures": [model_info["architecture"]] if model_info.get("architecture") else []},
        },
        "specrelay": {"method": "dflash", "draft_config": cfg.to_dict()},
    }


def write_speculators(output: Path, cfg: DFlashConfig, state: dict[str, torch.Tensor], model_info: dict) -> None:
    write_sglang(output, cfg, state)  # same tensors and file; only config.json differs
    (output / "config.json").write_text(json.dumps(speculators_config(cfg, model_info), indent=2) + "\n")


def load_exported(export_dir: Path, dtype: torch.dtype = torch.float32) -> DFlashDraft:
    """Our model from an export (ours, or any z-lab/SGLang-layout DFlash checkpoint of this shape)."""
    from safetensors.torch import load_file

    config = json.loads((Path(export_dir) / "config.json").read_text())
    cfg = config_from_export(config)
    model = DFlashDraft(cfg)
    state = load_file(str(Path(export_dir) / WEIGHTS))
    state = {k.removeprefix("model."): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in NOT_EXPORTED]
    if missing or unexpected:
        raise ExportError(f"{export_dir}: DFlash weights missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(dtype)


def config_from_export(config: dict) -> DFlashConfig:
    ours = (config.get("specrelay") or {}).get("draft_config")
    if ours:
        return DFlashConfig.from_dict(ours)
    if "transformer_layer_config" in config:   # a speculators-layout checkpoint from elsewhere
        flat = {**config["transformer_layer_config"], "block_size": config.get("block_size", 8),
                "dflash_config": {"target_layer_ids": config.get("aux_hidden_state_layer_ids"),
                                  "mask_token_id": config.get("mask_token_id")}}
        return config_from_export(flat)
    dfc = config.get("dflash_config") or {}
    heads = int(config["num_attention_heads"])
    layer_ids = dfc.get("target_layer_ids") or config.get("target_layer_ids")
    if not layer_ids:
        raise ExportError("DFlash config.json names no dflash_config.target_layer_ids")
    return DFlashConfig(
        hidden_size=int(config["hidden_size"]), num_hidden_layers=int(config["num_hidden_layers"]),
        num_attention_heads=heads, num_key_value_heads=int(config.get("num_key_value_heads", heads)),
        head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
        intermediate_size=int(config["intermediate_size"]), vocab_size=int(config["vocab_size"]),
        target_layer_ids=[int(i) for i in layer_ids], num_target_layers=int(config.get("num_target_layers") or 0),
        block_size=int(dfc.get("block_size", config.get("block_size", 16))),
        mask_token_id=int(dfc.get("mask_token_id", config.get("mask_token_id", 0))),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 1e6)),
        max_position_embeddings=int(config.get("max_position_embeddings", 32768)))
