"""Export a trained draft in the format SGLang's `LlamaForCausalLMEagle3` loads unchanged.

    draft-trainer export --checkpoint runs/x/checkpoints/latest --output drafts/x

Output directory: `config.json` + `model.safetensors` (bf16 weights, d2t int64, t2d bool, no
embed_tokens: SGLang shares the target's) + `specrelay_export.json` (provenance; ignored by
SGLang). SGLang silently skips unknown weight names and keeps random values for missing ones,
so the exporter refuses anything but the exact key set, the exact shapes and a consistent
vocabulary mapping, and writes atomically (temp dir + rename).

`load_trained_draft` is the one place that reads a training checkpoint (the trainer will move
checkpoints to torch.distributed.checkpoint; only this function changes then).
`load_exported` reads an export back into an `Eagle3Draft` (round-trip tests, `eval`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.errors import ContractError, ExportError
from common.files import replace_dir
from draft_trainer.data.vocab import VocabMapping
from draft_trainer.model.config import DraftConfig
from draft_trainer.model.draft import Eagle3Draft
from draft_trainer.train import checkpoint as ckpt_io

WEIGHT_FILE = "model.safetensors"
PROVENANCE_FILE = "specrelay_export.json"


def expected_shapes(cfg: DraftConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor SGLang's LlamaForCausalLMEagle3 reads, with its shape (exact key names)."""
    h, H, d = cfg.hidden_size, cfg.target_hidden_size, cfg.head_dim
    nh, nkv, ffn = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    return {
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


@dataclass
class TrainedDraft:
    """What a training checkpoint holds that export and eval need."""

    cfg: DraftConfig
    state: dict[str, torch.Tensor]          # draft tensors (no embed_tokens), incl. d2t/t2d buffers
    vocab: VocabMapping
    model_info: dict = field(default_factory=dict)
    path: Path | None = None


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory, a `latest`/`best` link, or a run directory (-> its checkpoints/latest)."""
    p = Path(path)
    for cand in (p, p / "checkpoints" / "latest"):
        if (cand / ckpt_io.COMPLETE).is_file():
            return cand.resolve()
    raise ExportError(f"{path} is not a complete draft checkpoint (no {ckpt_io.COMPLETE} marker); pass a run's "
                      "checkpoints/step_N (or latest, best) directory")


def load_trained_draft(ckpt_dir: str | Path, expected_vocab: VocabMapping | None = None) -> TrainedDraft:
    """Read a training checkpoint and check its vocabulary mapping.

    The d2t/t2d buffers stored with the weights must describe the same mapping as the pinned
    vocab.json next to them, and (on resume) the run's own mapping `expected_vocab`: a different
    mapping silently collapses acceptance, so any mismatch is an error.
    """
    d = resolve_checkpoint(ckpt_dir)
    try:
        cfg = DraftConfig.from_dict(json.loads((d / "draft_config.json").read_text()))
        model = Eagle3Draft(cfg)
        ckpt_io.load_model_state(d, model)
    except (OSError, ValueError, TypeError, RuntimeError, ckpt_io.CheckpointError) as e:
        raise ExportError(f"cannot read checkpoint {d}: {e}") from None
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("embed_tokens")}
    if not (d / "vocab.json").is_file():
        raise ExportError(f"checkpoint {d} has no vocab.json: the draft vocabulary mapping is missing")
    vocab = VocabMapping.load(d / "vocab.json")
    info_path = d / "model_info.json"
    model_info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if "d2t" not in state or "t2d" not in state:
        raise ExportError(f"checkpoint {d} carries no d2t/t2d buffers")
    from_buffers = VocabMapping.from_buffers(state["d2t"], state["t2d"])
    check_same_vocab(vocab, from_buffers, f"{d}/vocab.json", f"the d2t/t2d buffers in {d}")
    if expected_vocab is not None:
        check_same_vocab(expected_vocab, vocab, "this run's draft vocabulary", f"checkpoint {d}", error=ContractError)
    if (vocab.vocab_size, vocab.draft_vocab_size) != (cfg.vocab_size, cfg.draft_vocab_size):
        raise ExportError(f"checkpoint {d}: vocab.json is V={vocab.vocab_size}, Vd={vocab.draft_vocab_size} but "
                          f"draft_config.json says V={cfg.vocab_size}, Vd={cfg.draft_vocab_size}")
    return TrainedDraft(cfg=cfg, state=state, vocab=vocab, model_info=model_info, path=d)


def check_same_vocab(a: VocabMapping, b: VocabMapping, a_name: str, b_name: str, error=ExportError) -> None:
    if a.vocab_size != b.vocab_size or not torch.equal(a.used, b.used):
        raise error(
            f"draft vocabulary mismatch: {a_name} (fingerprint {a.fingerprint()}, V={a.vocab_size}, "
            f"Vd={a.draft_vocab_size}) differs from {b_name} (fingerprint {b.fingerprint()}, V={b.vocab_size}, "
            f"Vd={b.draft_vocab_size}); a draft must be used with the exact mapping it was trained with"
        )


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
    }


def serving_tensors(td: TrainedDraft) -> dict[str, torch.Tensor]:
    """The exact serving tensor set, validated: bf16 weights, d2t int64, t2d bool."""
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


def export_sglang(checkpoint: str | Path, output: str | Path, overwrite: bool = False) -> Path:
    from safetensors.torch import save_file

    td = load_trained_draft(checkpoint)
    tensors = serving_tensors(td)
    out = Path(output)
    with replace_dir(out, "export", overwrite=overwrite, replace_own=False, error=ExportError,
                     hint="pass --overwrite or choose another --output") as tmp:
        save_file(tensors, str(tmp / WEIGHT_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(sglang_config(td.cfg), indent=2))
        (tmp / PROVENANCE_FILE).write_text(json.dumps({
            "source_checkpoint": str(td.path), "vocab_fingerprint": td.vocab.fingerprint(),
            "vocab_coverage": td.vocab.coverage, "target_model": td.model_info.get("model_name", ""),
            "target_tokenizer_fingerprint": td.model_info.get("tokenizer_fingerprint", ""),
            "draft_config": td.cfg.to_dict()}, indent=1))
        load_exported(tmp)  # read back through the same validation before publishing
    return out


def draft_config_from_export(config: dict) -> DraftConfig:
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
            pad_token_id=config.get("pad_token_id"))
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
