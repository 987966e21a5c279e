"""`model.init=target` for DFlash: start each draft layer from the target decoder layer that reads
the feature that draft layer is paired with (target layer `target_layer_ids[i] + 1`), and the final
norm from the target's. `fc` and `hidden_norm` keep their random/ones init, and the q/k norms stay
ones (a Llama target has none; FetchTensors sends only the Llama-style layer tensors).
This is our choice, not a reference recipe: the reference DFlash trainers start from random weights.
"""

from __future__ import annotations

import torch

from common.contract import LAYER_TENSOR_SUFFIXES, layer_tensor_name
from common.errors import ConfigError, ContractError
from draft_trainer.methods.dflash.model import DFlashDraft


def source_layers(model: DFlashDraft, num_target_layers: int) -> list[int]:
    layers = [min(i + 1, num_target_layers - 1) for i in model.cfg.target_layer_ids]
    return layers


def tensor_names(model: DFlashDraft, num_target_layers: int) -> list[str]:
    return ["final_norm"] + [layer_tensor_name(src, s) for src in sorted(set(source_layers(model, num_target_layers)))
                             for s in LAYER_TENSOR_SUFFIXES]


@torch.no_grad()
def init_from_target(model: DFlashDraft, target: dict[str, torch.Tensor], num_target_layers: int) -> None:
    missing = [n for n in tensor_names(model, num_target_layers) if n not in target]
    if missing:
        raise ContractError(f"model.init=target: the target server did not send {missing[:4]}")
    for layer, src in zip(model.layers, source_layers(model, num_target_layers)):
        for suffix in LAYER_TENSOR_SUFFIXES:
            module = layer
            for part in suffix.split("."):
                module = getattr(module, part)
            x = target[layer_tensor_name(src, suffix)].float()
            if tuple(x.shape) != tuple(module.weight.shape):
                raise ConfigError(f"model.init=target: target tensor {layer_tensor_name(src, suffix)} has shape "
                                  f"{tuple(x.shape)}, the draft needs {tuple(module.weight.shape)}; use model.init=random")
            module.weight.copy_(x)
    model.norm.weight.copy_(target["final_norm"].float())
