"""Which target layers each serving engine captures for an EAGLE-3 draft config, as small functions
that encode the engines' code (cited below), returning SpecRelay's convention: the ids of the
decoder layers whose *outputs* are captured (HF `hidden_states[i + 1]`).

The engine lanes check these functions against the engines' own code (tests/sglang_lane/
test_layer_ids_in_sglang.py, tests/vllm_lane/test_layer_ids_in_vllm.py); the unit tests use them
where no engine is installed.
"""

from __future__ import annotations


def sglang_captures(config: dict, num_layers: int) -> list[int]:
    """SGLang 0.5.23 serving an SGLang-layout draft.

    - srt/model_executor/model_runner_components/spec_aux_hidden_state.py: the ids are
      `draft_config.eagle_config["eagle_aux_hidden_state_layer_ids"]`, None when absent;
    - srt/models/llama.py `set_eagle3_layers_to_capture`: `layers_to_capture` is
      `[2, L // 2, L - 3]` for None, else `[id + 1 for id in ids]`;
    - `LlamaModel.forward` hands layer i `capture_output` when `i in layers_to_capture`, and the
      layer captures its *input* (`attn_boundary.prepare(..., capture=...)`): the output of i - 1.
    """
    ids = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    to_capture = [2, num_layers // 2, num_layers - 3] if ids is None else [v + 1 for v in ids]
    return [i - 1 for i in to_capture if 0 < i < num_layers]


def vllm_captures(config: dict, num_layers: int) -> list[int]:
    """vLLM 0.32 serving a draft of either layout.

    - transformers_utils/configs/speculators/algos.py `update_eagle3`: a speculators config's
      top-level `eagle_aux_hidden_state_layer_ids` becomes the draft hf_config's attribute;
    - v1/worker/gpu_model_runner.py `_get_eagle3_aux_layers_from_config`: that attribute, else
      `eagle_config["eagle_aux_hidden_state_layer_ids"]` (the SGLang layout), else the model's
      default (interfaces.py `get_eagle3_default_aux_hidden_state_layers`: (2, L // 2, L - 3));
    - interfaces.py `EagleModelMixin._set_aux_hidden_state_layers` keeps `sorted(set(ids))`, and
      models/llama.py `LlamaModel.forward` calls `_maybe_add_hidden_state(..., idx + 1, ...)`
      after layer idx: id k is the input of layer k, the output of layer k - 1.
    """
    ids = config.get("eagle_aux_hidden_state_layer_ids")
    if not ids:
        ids = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    if not ids:
        ids = (2, num_layers // 2, num_layers - 3)
    return [k - 1 for k in sorted(set(ids)) if 0 < k <= num_layers]
