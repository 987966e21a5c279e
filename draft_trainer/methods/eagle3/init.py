"""Initialising the draft from the target's own weights (`model.init`).

Legend (shapes): V target vocab, Vd draft vocab, H target hidden, h draft hidden (= H here),
nh/nkv query/key-value heads, d head_dim, F FFN width.

`random`   PyTorch's default init (the EAGLE-3 recipe).
`target`   the serving architecture is unchanged; only the starting point moves:
  - `lm_head` <- the target's lm_head rows of the draft vocabulary, `norm` <- the target's
    final norm: the draft starts out speaking the target's output space, so training does not
    have to learn a Vd x h head from scratch (the largest block of parameters);
  - `fc` <- [0 | 0 | I]: the draft's hidden stream starts as the last aux layer's output;
  - `midlayer` <- target decoder layer `aux[-1] + 1` (the one that reads that output): its
    hidden half of q/k/v, o_proj, the norms and the MLP. The embedding half of q/k/v keeps a
    small random init, so the next token's embedding enters from the first step.
  At step 0 the draft then computes "one more target layer + final norm + lm_head" over the last
  aux state; training teaches it the one-token look-ahead.

The target tensors come from the servers (FetchTensors: `lm_head`, `final_norm` and
`layers.<i>.<name>`), so this works for remote target pools as well as the embedded server.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from common.contract import LAYER_TENSOR_SUFFIXES, layer_tensor_name
from common.errors import ConfigError, ContractError
from draft_trainer.methods.eagle3.model import Eagle3Draft

INITS = ("random", "target")
EMBED_HALF_STD = 0.02  # random init of the embedding half of q/k/v (the target layer never read embeddings)


def init_layer(aux_layer_ids: list[int], num_layers: int) -> int:
    """The target decoder layer the midlayer starts from: the one after the last aux layer, or the
    last layer when the last aux layer is the final one (the final norm's input): its weights have
    the right scale for that stream, though the target never applied them to it."""
    if max(aux_layer_ids) >= num_layers:
        raise ConfigError(f"model.init=target: aux layer {max(aux_layer_ids)} is past the target's {num_layers} layers")
    return min(max(aux_layer_ids) + 1, num_layers - 1)


def target_tensor_names(init: str, layer: int) -> list[str]:
    """FetchTensors names an init needs (besides embed_tokens/lm_head, which training always fetches)."""
    if init not in INITS:
        raise ConfigError(f"model.init={init!r}: use one of {INITS}")
    if init == "random":
        return []
    return ["final_norm"] + [layer_tensor_name(layer, n) for n in LAYER_TENSOR_SUFFIXES]


@torch.no_grad()
def init_from_target(model: Eagle3Draft, target: dict[str, torch.Tensor], layer: int, used_Vd: torch.Tensor,
                     seed: int = 0, embed_std: float = EMBED_HALF_STD) -> None:
    """Overwrite the draft's trainable weights with the target-derived start (see the module doc).

    `target` holds `lm_head` [V,H], `final_norm` [H] and `layers.<layer>.<name>` weights.
    """
    cfg = model.cfg
    h, H = cfg.hidden_size, cfg.target_hidden_size
    if h != H:
        raise ConfigError(f"model.init=target needs the draft hidden size to equal the target's ({h} != {H})")
    want = ["lm_head"] + target_tensor_names("target", layer)
    missing = [n for n in want if n not in target]
    if missing:
        raise ContractError(f"model.init=target: the target server did not send {missing}")

    def t(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        x = target[name].float()
        if tuple(x.shape) != shape:
            raise ContractError(f"model.init=target: target tensor {name} has shape {tuple(x.shape)}, the draft "
                                f"needs {shape} (a Llama-style decoder layer with the draft's geometry)")
        return x

    nh, nkv, d, F = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size
    L = f"layers.{layer}."
    model.lm_head.weight.copy_(t("lm_head", (cfg.vocab_size, H))[used_Vd])
    model.norm.weight.copy_(t("final_norm", (H,)))
    fc_h3H = torch.zeros(h, 3 * H)
    fc_h3H[:, 2 * H:] = torch.eye(H)
    model.fc.weight.copy_(fc_h3H)
    mid = model.midlayer
    mid.hidden_norm.weight.copy_(t(L + "input_layernorm", (H,)))
    mid.input_layernorm.weight.fill_(1.0)
    g = torch.Generator().manual_seed(seed)
    for proj, rows in (("q_proj", nh * d), ("k_proj", nkv * d), ("v_proj", nkv * d)):
        w_R2h = torch.empty(rows, 2 * h)
        w_R2h[:, :h] = torch.randn(rows, h, generator=g) * embed_std   # embedding half
        w_R2h[:, h:] = t(L + f"self_attn.{proj}", (rows, H))               # hidden half
        getattr(mid.self_attn, proj).weight.copy_(w_R2h)
    mid.self_attn.o_proj.weight.copy_(t(L + "self_attn.o_proj", (h, nh * d)))
    mid.post_attention_layernorm.weight.copy_(t(L + "post_attention_layernorm", (H,)))
    mid.mlp.gate_proj.weight.copy_(t(L + "mlp.gate_proj", (F, H)))
    mid.mlp.up_proj.weight.copy_(t(L + "mlp.up_proj", (F, H)))
    mid.mlp.down_proj.weight.copy_(t(L + "mlp.down_proj", (H, F)))


def init_draft(model: Eagle3Draft, init: str, num_layers: int, used_Vd: torch.Tensor, lm_head_VH: torch.Tensor,
               fetch: Callable[[list[str]], dict[str, torch.Tensor]], seed: int = 0) -> None:
    """Apply `model.init` to a freshly built draft; `fetch(names)` gets target tensors (FetchTensors)."""
    if init not in INITS:
        raise ConfigError(f"model.init={init!r}: use one of {INITS}")
    if init == "random":
        return
    layer = init_layer(model.cfg.aux_layer_ids, num_layers)
    tensors = dict(fetch(target_tensor_names(init, layer)))
    tensors["lm_head"] = lm_head_VH
    init_from_target(model, tensors, layer, used_Vd, seed)
