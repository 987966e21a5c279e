"""EAGLE-3 draft layouts: SGLang's (what `draft-trainer export` writes) and speculators' (vLLM's).

Pure functions on (config dict, tensor dict); reading and writing directories is in `store.py`.

SGLang (`LlamaForCausalLMEagle3`): flat HF-style config.json, ids in
`eagle_config.eagle_aux_hidden_state_layer_ids` (SGLang convention), weights `fc.weight`,
`midlayer.*`, `norm.weight`, `lm_head.weight`, `d2t`, `t2d`.
speculators (`speculators_model_type: eagle3`): decoder hyperparameters nested in
`transformer_layer_config`, EAGLE fields at the top level (`draft_vocab_size`,
`target_hidden_size`, `norm_before_residual`, `eagle_aux_hidden_state_layer_ids` in vLLM's
convention), a `speculators_config` block (algorithm, proposal methods, verifier), weights under
`layers.0.*` instead of `midlayer.*` (speculators `convert/eagle/eagle3_converter.py`, vLLM
`transformers_utils/configs/speculators/algos.py:update_eagle3`).

What one side cannot express is refused with the reason (ExportError), never dropped:
`norm_before_residual: true`, EAGLE-3.1 norms (`norm_before_fc`, `fc_norm`, `norm_output`) or
more than one decoder layer into SGLang's layout; a speculators config without an explicit
`norm_before_residual` (vLLM reads a missing key as true, speculators as false); an
`embed_tokens` table that is not exactly the target's (SGLang always uses the target's).

Legend (shapes): V target vocabulary, H the embedding width (= the draft's hidden size).
"""

from __future__ import annotations

import copy

import torch

from common.errors import ExportError
import draft_trainer.formats.layer_ids as layer_ids

SGLANG_ARCH = "LlamaForCausalLMEagle3"
SPECULATORS_ARCH = "Eagle3Speculator"
SPECULATORS_VERSION = "0.9.0"   # the speculators release whose loader the vLLM lane checks

# Top-level EAGLE fields of the speculators config; everything else of SGLang's flat config is
# the decoder layer's and goes to `transformer_layer_config`.
_EAGLE_TOP = ("draft_vocab_size", "target_hidden_size")
_EAGLE31_FLAGS = ("norm_before_fc", "fc_norm", "norm_output")
LAYER_SUFFIXES = ("hidden_norm.weight", "input_layernorm.weight", "post_attention_layernorm.weight",
                  "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                  "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
_OTHER_KEYS = ("fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d")
EMBED = "embed_tokens.weight"


def detect(config: dict) -> str:
    """'sglang' or 'speculators' for an EAGLE-3 config.json; ExportError for anything else."""
    if config.get("speculators_model_type") is not None or config.get("speculators_config") is not None:
        if config.get("speculators_model_type") != "eagle3":
            raise ExportError(f"speculators_model_type {config.get('speculators_model_type')!r} is not eagle3; "
                              "only EAGLE-3 drafts convert")
        return "speculators"
    if config.get("architectures") == [SGLANG_ARCH]:
        return "sglang"
    raise ExportError(f"config.json with architectures {config.get('architectures')} is neither an SGLang EAGLE-3 "
                      f"draft ({SGLANG_ARCH}) nor a speculators one (speculators_model_type: eagle3)")


# ----------------------------------------------------------------------------- tensors

def _rename(tensors: dict[str, torch.Tensor], old: str, new: str) -> dict[str, torch.Tensor]:
    return {(new + k[len(old):] if k.startswith(old) else k): v for k, v in tensors.items()}


def _check_keys(tensors: dict[str, torch.Tensor], layer_prefix: str, where: str) -> None:
    want = {layer_prefix + s for s in LAYER_SUFFIXES} | set(_OTHER_KEYS)
    have = set(tensors) - {EMBED}
    missing, extra = sorted(want - have), sorted(have - want)
    if missing or extra:
        raise ExportError(f"{where}: weights differ from a one-layer EAGLE-3 draft: missing {missing}, unexpected "
                          f"{extra} (an engine would keep random weights or ignore them)")


def _drop_embed(tensors: dict[str, torch.Tensor], target_embed_VH: torch.Tensor | None,
                where: str) -> dict[str, torch.Tensor]:
    """Remove an embed_tokens table that equals the target's; refuse any other."""
    if EMBED not in tensors:
        return tensors
    if target_embed_VH is None:
        raise ExportError(f"{where} carries its own embed_tokens; pass the target model (--target-model) so it can "
                          "be checked against the target's table (SGLang always uses the target's, so a different "
                          "table would be silently replaced)")
    emb = tensors[EMBED]
    if tuple(emb.shape) != tuple(target_embed_VH.shape) or not torch.equal(emb.to(target_embed_VH.dtype),
                                                                           target_embed_VH):
        raise ExportError(f"{where}: its embed_tokens {tuple(emb.shape)} differs from the target's "
                          f"{tuple(target_embed_VH.shape)}; SGLang cannot express a draft-own embedding and "
                          "SpecRelay drafts share the target's: refusing")
    return {k: v for k, v in tensors.items() if k != EMBED}


def _check_vocab(config_vocab: int, draft_vocab: int, tensors: dict[str, torch.Tensor], where: str) -> None:
    d2t, t2d = tensors["d2t"], tensors["t2d"]
    if tuple(d2t.shape) != (draft_vocab,) or tuple(t2d.shape) != (config_vocab,):
        raise ExportError(f"{where}: d2t {tuple(d2t.shape)} / t2d {tuple(t2d.shape)} do not match "
                          f"draft_vocab_size={draft_vocab}, vocab_size={config_vocab}")
    if int(t2d.to(torch.int64).sum()) != draft_vocab:
        raise ExportError(f"{where}: t2d marks {int(t2d.sum())} tokens but the draft vocabulary has {draft_vocab}")


# ----------------------------------------------------------------------------- configs

def _sglang_ids(config: dict) -> list[int] | None:
    ec = config.get("eagle_config") or {}
    ids = ec.get("eagle_aux_hidden_state_layer_ids")
    return list(ids) if ids else None


def sglang_to_speculators(config: dict, tensors: dict[str, torch.Tensor], *, verifier: str | None = None,
                          verifier_architectures: list[str] | None = None, speculative_tokens: int = 3,
                          target_num_layers: int | None = None,
                          target_embed_VH: torch.Tensor | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """SGLang layout -> speculators layout (config, tensors). Inputs are not modified."""
    where = "SGLang draft"
    if detect(config) != "sglang":
        raise ExportError("expected an SGLang EAGLE-3 config (architectures LlamaForCausalLMEagle3)")
    ec = dict(config.get("eagle_config") or {})
    if ec.get("use_aux_hidden_state", True) is not True:
        raise ExportError(f"{where}: eagle_config.use_aux_hidden_state is false; that is EAGLE-2, not EAGLE-3")
    unknown = sorted(set(ec) - {"eagle_aux_hidden_state_layer_ids", "use_aux_hidden_state"})
    if unknown:
        raise ExportError(f"{where}: eagle_config has {unknown}, which this converter does not know how to carry")
    if config.get("num_hidden_layers", 1) != 1:
        raise ExportError(f"{where}: {config.get('num_hidden_layers')} decoder layers; SGLang's layout has one")
    if config.get("norm_before_residual", False):
        raise ExportError(f"{where}: norm_before_residual is true, which SGLang cannot run (it always normalises "
                          "after taking the residual)")
    if any(config.get(f) for f in _EAGLE31_FLAGS):
        raise ExportError(f"{where}: EAGLE-3.1 norms {[f for f in _EAGLE31_FLAGS if config.get(f)]} are not "
                          "supported by this converter")
    tensors = _drop_embed(tensors, target_embed_VH, where)
    _check_keys(tensors, "midlayer.", where)
    _check_vocab(config["vocab_size"], config["draft_vocab_size"], tensors, where)

    layer_cfg = {k: copy.deepcopy(v) for k, v in config.items()
                 if k not in ("architectures", "eagle_config", "norm_before_residual", *_EAGLE_TOP, *_EAGLE31_FLAGS)}
    out = {
        "architectures": [SPECULATORS_ARCH],
        "speculators_model_type": "eagle3",
        "speculators_version": SPECULATORS_VERSION,
        "draft_vocab_size": config["draft_vocab_size"],
        "target_hidden_size": config.get("target_hidden_size", config["hidden_size"]),
        # Explicit: vLLM reads a missing key as true (algos.py update_eagle3); SGLang drafts are false.
        "norm_before_residual": False,
        "norm_before_fc": False,
        "fc_norm": False,
        "norm_output": False,
        "transformer_layer_config": layer_cfg,
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": int(speculative_tokens)}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier, "architectures": list(verifier_architectures or [])},
        },
    }
    trained = layer_ids.from_engine(_sglang_ids(config), layer_ids.SGLANG, target_num_layers) \
        if _sglang_ids(config) else None
    if trained is not None:   # absent stays absent: both engines default to the same layers
        out["eagle_aux_hidden_state_layer_ids"] = layer_ids.to_engine(trained, layer_ids.VLLM, target_num_layers)
    return out, _rename(tensors, "midlayer.", "layers.0.")


def speculators_to_sglang(config: dict, tensors: dict[str, torch.Tensor], *, target_num_layers: int | None = None,
                          target_embed_VH: torch.Tensor | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """speculators layout -> SGLang layout (config, tensors), refusing what SGLang cannot run."""
    where = "speculators draft"
    if detect(config) != "speculators":
        raise ExportError("expected a speculators EAGLE-3 config (speculators_model_type: eagle3)")
    if "norm_before_residual" not in config:
        raise ExportError(f"{where}: norm_before_residual is missing; vLLM reads that as true and speculators as "
                          "false, so which one the draft was trained with is unknown. Add it explicitly")
    if config["norm_before_residual"]:
        raise ExportError(f"{where}: norm_before_residual is true; SGLang's LlamaForCausalLMEagle3 always "
                          "normalises after taking the residual (false), so it would run a different network")
    on = [f for f in _EAGLE31_FLAGS if config.get(f)]
    if on:
        raise ExportError(f"{where}: EAGLE-3.1 norms {on} are not supported by this converter")
    layer_cfg = dict(config.get("transformer_layer_config") or {})
    if layer_cfg.get("model_type", "llama") != "llama":
        raise ExportError(f"{where}: decoder layer type {layer_cfg.get('model_type')!r}; SGLang's "
                          f"{SGLANG_ARCH} is a Llama layer")
    if layer_cfg.get("num_hidden_layers", 1) != 1:
        raise ExportError(f"{where}: {layer_cfg.get('num_hidden_layers')} decoder layers; SGLang's layout has one")
    tensors = _drop_embed(tensors, target_embed_VH, where)
    _check_keys(tensors, "layers.0.", where)
    draft_vocab = config.get("draft_vocab_size")
    if draft_vocab is None:
        raise ExportError(f"{where}: draft_vocab_size is missing")
    _check_vocab(layer_cfg["vocab_size"], draft_vocab, tensors, where)

    out = {"architectures": [SGLANG_ARCH], **copy.deepcopy(layer_cfg)}
    out["draft_vocab_size"] = draft_vocab
    out["target_hidden_size"] = config.get("target_hidden_size") or layer_cfg["hidden_size"]
    out["norm_before_residual"] = False   # explicit, for vLLM reading this layout (it honours the key)
    eagle = {"use_aux_hidden_state": True}
    if config.get("eagle_aux_hidden_state_layer_ids"):
        trained = layer_ids.from_engine(config["eagle_aux_hidden_state_layer_ids"], layer_ids.VLLM, target_num_layers)
        eagle = {"eagle_aux_hidden_state_layer_ids": layer_ids.to_engine(trained, layer_ids.SGLANG, target_num_layers),
                 **eagle}
    out["eagle_config"] = eagle
    return out, _rename(tensors, "layers.0.", "midlayer.")


def trained_layer_ids(config: dict) -> list[int] | None:
    """The output-of-layer ids a draft of either layout was trained on (None: the engines' default)."""
    if detect(config) == "sglang":
        ids = _sglang_ids(config)
        return layer_ids.from_engine(ids, layer_ids.SGLANG) if ids else None
    ids = config.get("eagle_aux_hidden_state_layer_ids")
    return layer_ids.from_engine(list(ids), layer_ids.VLLM) if ids else None
