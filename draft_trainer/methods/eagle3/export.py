"""EAGLE-3's serving format: what SGLang's `LlamaForCausalLMEagle3` loads unchanged.

Output directory: `config.json` + `model.safetensors` (bf16 weights, d2t int64, t2d bool, no
embed_tokens: SGLang shares the target's; EAGLE-3.1 adds `fc_norm.{0,1,2}.weight` and the
config fields `fc_norm`/`norm_output`, as SGLang 0.5.23's llama_eagle3.py reads them);
draft_trainer/export.py adds `specrelay_export.json` (provenance; ignored by SGLang) and the atomic publish. SGLang silently skips unknown weight
names and keeps random values for missing ones, so the writer refuses anything but the exact
key set, the exact shapes and a consistent vocabulary mapping.

`load_exported` reads an export back into an `Eagle3Draft` (round-trip tests, `eval`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from common.errors import ContractError, ExportError
from draft_trainer.data.vocab import VocabMapping, check_same_vocab
from draft_trainer.methods.eagle3.config import DraftConfig
from draft_trainer.methods.eagle3.model import Eagle3Draft

WEIGHT_FILE = "model.safetensors"


def expected_shapes(cfg: DraftConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor SGLang's LlamaForCausalLMEagle3 reads, with its shape (exact key names)."""
    h, H, d = cfg.hidden_size, cfg.target_hidden_size, cfg.head_dim
    nh, nkv, ffn = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    norms = {f"fc_norm.{i}.weight": (H,) for i in range(3)} if cfg.fc_norm else {}
    return {
        **norms,
        "fc.weight": (h, 3 * H),
        "midlayer.hidden_norm.weight": (h,),
        "midlayer.input_layernorm.weight": (h,),
        "midlayer.post_attention_layernorm.weight": (h,),
        "midlayer.self_attn.q_proj.weight": (nh * d, 2 * h),
        "midlayer.self_attn.k_proj.weight": (nkv * d, 2 * h),
        "midlayer.self_attn.v_proj.weight": (nkv * d, 2 * h),
        "midlayer.self_attn.o_proj.weight": (h, nh * d),
        "midlayer.mlp.gate_proj.weight": (ffn, h),
        "midlayer.mlp.up_proj.weight": (ffn, h),
        "midlayer.mlp.down_proj.weight": (h, ffn),
        "norm.weight": (h,),
        "lm_head.weight": (cfg.draft_vocab_size, h),
        "d2t": (cfg.draft_vocab_size,),
        "t2d": (cfg.vocab_size,),
    }


def sglang_config(cfg: DraftConfig) -> dict:
    """config.json for SGLang (and transformers 5): both the new and the legacy rope fields."""
    rope = dict(cfg.rope_parameters)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    legacy_scaling = None
    if rope_type != "default":
        legacy_scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        legacy_scaling["rope_type"] = legacy_scaling["type"] = rope_type
    return {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "num_hidden_layers": 1,
        "hidden_size": cfg.hidden_size,
        "target_hidden_size": cfg.target_hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": cfg.hidden_act,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "vocab_size": cfg.vocab_size,
        "draft_vocab_size": cfg.draft_vocab_size,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "rope_parameters": {**rope, "rope_type": rope_type},
        "rope_theta": float(rope.get("rope_theta", 10000.0)),
        "rope_scaling": legacy_scaling,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "dtype": "bfloat16",
        "torch_dtype": "bfloat16",
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(cfg.aux_layer_ids), "use_aux_hidden_state": True},
        # SGLang ignores it; vLLM reads a missing key as true, so it is written explicitly.
        "norm_before_residual": False,
        # EAGLE-3.1, read by SGLang >= 0.5.23 and vLLM as top-level fields (absent = EAGLE-3).
        **({"fc_norm": True} if cfg.fc_norm else {}),
        **({"norm_output": True} if cfg.norm_output else {}),
    }


def serving_tensors(td) -> dict[str, torch.Tensor]:
    """The exact serving tensor set of `td` (draft_trainer.export.TrainedDraft), validated: bf16
    weights, d2t int64, t2d bool."""
    want = expected_shapes(td.cfg)
    state = {k: v for k, v in td.state.items() if not k.startswith(("embed_tokens.", "rotary."))}
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    if missing or extra:
        raise ExportError(f"checkpoint {td.path}: refusing to export: missing keys {missing}, unexpected keys {extra} "
                          "(SGLang would silently keep random weights / ignore them)")
    bad = {k: (tuple(state[k].shape), s) for k, s in want.items() if tuple(state[k].shape) != s}
    if bad:
        raise ExportError(f"checkpoint {td.path}: wrong shapes {bad} (got, expected from draft_config.json)")
    out = {}
    for k, v in state.items():
        if k == "d2t":
            out[k] = v.to(torch.int64).contiguous()
        elif k == "t2d":
            out[k] = v.to(torch.bool).contiguous()
        else:
            if not torch.isfinite(v).all():
                raise ExportError(f"checkpoint {td.path}: {k} has non-finite values; refusing to export")
            out[k] = v.detach().to(torch.bfloat16).contiguous()
    check_same_vocab(td.vocab, VocabMapping.from_buffers(out["d2t"], out["t2d"]), "the checkpoint's vocab.json",
                     "the exported d2t/t2d")
    return out


def write_sglang(out: Path, td) -> None:
    """Write the SGLang layout of `td` (a TrainedDraft) into the empty directory `out`."""
    from safetensors.torch import save_file

    save_file(serving_tensors(td), str(out / WEIGHT_FILE), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(sglang_config(td.cfg), indent=2))
    load_exported(out)  # read back through the same validation before publishing


def draft_config_from_export(config: dict) -> DraftConfig:
    if config.get("norm_before_fc") or (config.get("eagle_config") or {}).get("norm_before_fc"):
        raise ExportError("exported config.json sets norm_before_fc (one norm over the concatenated aux features); "
                          "this trainer reads EAGLE-3 and EAGLE-3.1 (fc_norm, per aux layer) drafts only")
    rope = config.get("rope_parameters") or {"rope_type": (config.get("rope_scaling") or {}).get("rope_type", "default"),
                                             "rope_theta": config.get("rope_theta", 10000.0)}
    try:
        return DraftConfig(
            hidden_size=config["hidden_size"], target_hidden_size=config.get("target_hidden_size", config["hidden_size"]),
            num_attention_heads=config["num_attention_heads"], num_key_value_heads=config["num_key_value_heads"],
            head_dim=config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"],
            intermediate_size=config["intermediate_size"], vocab_size=config["vocab_size"],
            draft_vocab_size=config["draft_vocab_size"],
            aux_layer_ids=list(config.get("eagle_config", {}).get("eagle_aux_hidden_state_layer_ids") or []),
            rms_norm_eps=config["rms_norm_eps"], max_position_embeddings=config["max_position_embeddings"],
            rope_parameters=dict(rope), hidden_act=config.get("hidden_act", "silu"),
            bos_token_id=config.get("bos_token_id"), eos_token_id=config.get("eos_token_id"),
            pad_token_id=config.get("pad_token_id"),
            # SGLang also accepts the legacy `use_aux_norm` for fc_norm.
            fc_norm=bool(config.get("fc_norm") or config.get("use_aux_norm")),
            norm_output=bool(config.get("norm_output")))
    except KeyError as e:
        raise ExportError(f"exported config.json lacks {e}; is this an EAGLE-3 draft directory?") from None


def load_exported(path: str | Path, embed_tokens_VH: torch.Tensor | None = None,
                  dtype: torch.dtype = torch.float32) -> Eagle3Draft:
    """An exported draft directory as an Eagle3Draft (embedding from the target, as SGLang does)."""
    from safetensors.torch import load_file

    p = Path(path)
    if not (p / "config.json").is_file() or not (p / WEIGHT_FILE).is_file():
        raise ExportError(f"{p} is not an exported draft (needs config.json and {WEIGHT_FILE})")
    config = json.loads((p / "config.json").read_text())
    if config.get("architectures") != ["LlamaForCausalLMEagle3"]:
        raise ExportError(f"{p}/config.json: architectures {config.get('architectures')} is not LlamaForCausalLMEagle3")
    cfg = draft_config_from_export(config)
    tensors = load_file(str(p / WEIGHT_FILE))
    want = expected_shapes(cfg)
    if set(tensors) != set(want):
        raise ExportError(f"{p}: keys differ from the serving set: missing {sorted(set(want) - set(tensors))}, "
                          f"unexpected {sorted(set(tensors) - set(want))}")
    bad = {k: tuple(tensors[k].shape) for k in want if tuple(tensors[k].shape) != want[k]}
    if bad or tensors["d2t"].dtype != torch.int64 or tensors["t2d"].dtype != torch.bool:
        raise ExportError(f"{p}: wrong shapes {bad} or d2t/t2d dtypes ({tensors['d2t'].dtype}, {tensors['t2d'].dtype})")
    VocabMapping.from_buffers(tensors["d2t"], tensors["t2d"])   # consistent mapping or ExportError
    model = Eagle3Draft(cfg)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v
                                                 for k, v in tensors.items()}, strict=False)
    assert not unexpected and set(missing) <= {"embed_tokens.weight"}, (missing, unexpected)
    if embed_tokens_VH is not None:
        if tuple(embed_tokens_VH.shape) != (cfg.vocab_size, cfg.hidden_size):
            raise ContractError(f"target embedding {tuple(embed_tokens_VH.shape)} does not fit the draft "
                                f"(V={cfg.vocab_size}, h={cfg.hidden_size})")
        with torch.no_grad():
            model.embed_tokens.weight.copy_(embed_tokens_VH)
    return model.to(dtype)
