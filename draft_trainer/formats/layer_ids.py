"""Which target layers an engine captures for EAGLE-3, and how each engine spells them.

SpecRelay's own convention (common/contract.py `default_aux_layers`, the HF backend's forward
hooks on `model.layers[i]`, eval's `hidden_states[i + 1]`): aux id i is the **output of decoder
layer i** (0-indexed). These are the "trained" ids below.

The engines read `eagle_aux_hidden_state_layer_ids` differently (checked in their source):
- SGLang 0.5.23, `srt/models/llama.py` `LlamaForCausalLM.set_eagle3_layers_to_capture`: stores
  `layers_to_capture = [id + 1 ...]` and `LlamaModel.forward` captures the *input* of layer
  `i in layers_to_capture`, so SGLang id i is the output of layer i: the same as ours. With no
  ids it captures inputs of layers [2, L//2, L-3].
- vLLM 0.32, `model_executor/models/interfaces.py` `EagleModelMixin._maybe_add_hidden_state`
  (called with `idx + 1` after layer idx, and with `start_layer` before the first layer): vLLM id
  k is the *input* of layer k, i.e. the output of layer k - 1; id L is the last layer's output.
  No ids: `get_eagle3_default_aux_hidden_state_layers` = (2, L//2, L-3), the same layers as
  SGLang's default. The speculators format (vLLM's) uses vLLM's convention.
Both engines concatenate the captured states in layer order (vLLM even sorts the id set), while
a draft's `fc` columns follow the order it was trained with: ids must be ascending.
"""

from __future__ import annotations

from common.errors import ExportError

SGLANG = "sglang"
VLLM = "vllm"        # also the speculators format's convention
ENGINES = (SGLANG, VLLM)

_OFFSET = {SGLANG: 0, VLLM: 1}   # engine id = trained id + offset


def _check_engine(engine: str) -> int:
    if engine not in _OFFSET:
        raise ExportError(f"unknown engine {engine!r}; use one of {list(ENGINES)}")
    return _OFFSET[engine]


def check_ascending(trained: list[int]) -> None:
    if list(trained) != sorted(set(trained)):
        raise ExportError(f"aux layer ids {list(trained)} are not distinct and ascending: SGLang and vLLM "
                          "concatenate captured layers in layer order, so this draft's fc input order cannot "
                          "be expressed; retrain with ascending ids")


def to_engine(trained: list[int], engine: str, num_layers: int | None = None) -> list[int]:
    """Ids to write for `engine` so that it captures the outputs of layers `trained`."""
    off = _check_engine(engine)
    check_ascending(trained)
    out = [i + off for i in trained]
    if min(trained, default=0) < 0:
        raise ExportError(f"aux layer ids {list(trained)}: negative ids are not layers")
    if num_layers is not None:
        # SGLang captures the input of layer id+1, so the last layer's output is not capturable.
        limit = num_layers - 2 if engine == SGLANG else num_layers - 1
        bad = [i for i in trained if i > limit]
        if bad:
            raise ExportError(f"aux layer ids {bad} cannot be captured by {engine} on a {num_layers}-layer target "
                              f"(largest capturable output is layer {limit})")
    return out


def from_engine(ids: list[int], engine: str, num_layers: int | None = None) -> list[int]:
    """The trained (output-of-layer) ids that `engine` captures when given `ids`."""
    off = _check_engine(engine)
    trained = [i - off for i in ids]
    if any(i < 0 for i in trained):
        raise ExportError(f"{engine} aux layer ids {list(ids)} include the embedding output (vLLM id 0), which "
                          "SpecRelay drafts and SGLang cannot use; refusing")
    to_engine(trained, engine, num_layers)   # same checks: ascending, capturable
    return trained


def engine_default(engine: str, num_layers: int) -> list[int]:
    """What `engine` captures (as trained ids) when the config carries no ids."""
    _check_engine(engine)
    # Both engines default to the inputs of layers [2, L//2, L-3] (sources in the module doc).
    return [2 - 1, num_layers // 2 - 1, num_layers - 3 - 1]
