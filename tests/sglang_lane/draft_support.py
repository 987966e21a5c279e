"""A draft for the lane's SGLang checks: build (random or briefly trained) and export it.

Export uses `draft_trainer.export` when it exists on this branch; until it lands, `_export`
writes the serving format of notes/eagle3-algorithm.md section 6 itself (bf16 weights, int64
d2t, bool t2d, no embed_tokens, LlamaForCausalLMEagle3 config.json).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from draft_trainer.model.config import DraftConfig
from draft_trainer.model.draft import Eagle3Draft


def random_draft(target_dir: Path, info, draft_vocab_size: int, seed: int = 0) -> Eagle3Draft:
    """Eagle3Draft with random weights, the target's embedding, a random pinned vocab mapping."""
    from safetensors.torch import load_file

    cfg = DraftConfig.from_model_info(info, draft_vocab_size=draft_vocab_size)
    torch.manual_seed(seed)
    draft = Eagle3Draft(cfg).float().eval()
    with torch.no_grad():
        for name, p in draft.named_parameters():
            if p.ndim == 2 and name != "embed_tokens.weight":
                p.normal_(0.0, 0.1)
            elif p.ndim == 1:
                p.uniform_(0.5, 1.5)  # non-trivial norm weights, so a dropped norm shows up
        draft.embed_tokens.weight.copy_(load_file(target_dir / "model.safetensors")["model.embed_tokens.weight"])
        used = torch.randperm(info.vocab_size)[:draft_vocab_size].sort().values
        t2d = torch.zeros(info.vocab_size, dtype=torch.bool)
        t2d[used] = True
        draft.set_vocab_mapping(used - torch.arange(draft_vocab_size), t2d)
    return draft


def export(draft: Eagle3Draft, out: Path) -> Path:
    try:
        from draft_trainer import export as exporter  # the real exporter, once it is on this branch
    except ImportError:
        return _export(draft, out)
    return exporter.export_draft(draft, out)  # pragma: no cover - switched on when it lands


SERVING_KEYS = (
    "fc.weight", "midlayer.hidden_norm.weight", "midlayer.input_layernorm.weight",
    "midlayer.post_attention_layernorm.weight", "midlayer.self_attn.q_proj.weight",
    "midlayer.self_attn.k_proj.weight", "midlayer.self_attn.v_proj.weight", "midlayer.self_attn.o_proj.weight",
    "midlayer.mlp.gate_proj.weight", "midlayer.mlp.up_proj.weight", "midlayer.mlp.down_proj.weight",
    "norm.weight", "lm_head.weight", "d2t", "t2d",
)


def _export(draft: Eagle3Draft, out: Path) -> Path:
    from safetensors.torch import save_file

    state = draft.state_dict()
    tensors = {k: (state[k].to(torch.bfloat16) if state[k].is_floating_point() else state[k]).contiguous()
               for k in SERVING_KEYS}
    cfg = draft.cfg
    rope = dict(cfg.rope_parameters)
    config = {
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "num_hidden_layers": 1,
        "hidden_size": cfg.hidden_size, "target_hidden_size": cfg.target_hidden_size,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim, "intermediate_size": cfg.intermediate_size, "hidden_act": cfg.hidden_act,
        "rms_norm_eps": cfg.rms_norm_eps, "max_position_embeddings": cfg.max_position_embeddings,
        "vocab_size": cfg.vocab_size, "draft_vocab_size": cfg.draft_vocab_size, "tie_word_embeddings": False,
        "rope_parameters": rope, "rope_theta": rope.get("rope_theta", 10000.0), "torch_dtype": "bfloat16",
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(cfg.aux_layer_ids), "use_aux_hidden_state": True},
    }
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out
