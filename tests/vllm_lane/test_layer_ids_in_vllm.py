"""Which target layers vLLM captures for our exports, computed with vLLM's own code, and the
`speculators` package's own loader reading our speculators export.

vLLM's path (the CPU model runner inherits it): the draft config.json -> `SpeculatorsConfig`
(speculators layout) or the plain HF config (SGLang layout) -> `GPUModelRunner.
_get_eagle3_aux_layers_from_config` -> ids where id k is the input of target layer k (vLLM's
`LlamaModel.forward` adds the state after layer idx under id idx + 1; the captured features
themselves are checked in test_vllm_serves_draft.py).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from draft_trainer.formats.store import read_draft, to_speculators
from tests.support.engine_capture import vllm_captures
from tests.unit.test_formats import NUM_LAYERS, exported, make_export  # noqa: F401  (our export, ids [1, 14, 26])


def _vllm_ids(config: dict) -> tuple[int, ...] | None:
    """The aux ids vLLM's model runner takes from a draft config.json (its own code)."""
    from vllm.transformers_utils.configs.speculators.base import SpeculatorsConfig
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    hf = (SpeculatorsConfig.extract_transformers_pre_trained_config(dict(config))
          if "speculators_config" in config else dict(config))
    runner = SimpleNamespace(speculative_config=SimpleNamespace(draft_model_config=SimpleNamespace(
        hf_config=SimpleNamespace(**hf))))
    return GPUModelRunner._get_eagle3_aux_layers_from_config(runner)


def test_vllm_captures_our_layers_from_the_speculators_export(exported, tmp_path):  # noqa: F811
    model, src = exported
    spec_cfg = read_draft(to_speculators(src, tmp_path / "spec")).config
    ids = _vllm_ids(spec_cfg)
    assert [k - 1 for k in ids] == list(model.cfg.aux_layer_ids)    # input of layer k = output of k - 1
    assert [k - 1 for k in ids] == vllm_captures(spec_cfg, NUM_LAYERS)   # tests/support encodes vLLM right
    # vLLM's speculators path reads a missing norm_before_residual as true: ours is explicit.
    from vllm.transformers_utils.configs.speculators.base import SpeculatorsConfig

    assert SpeculatorsConfig.extract_transformers_pre_trained_config(dict(spec_cfg))["norm_before_residual"] is False


def test_vllm_reading_the_sglang_layout_is_off_by_one(exported):  # noqa: F811
    """Why vLLM gets the speculators layout: it reads SGLang's ids as input-of-layer ids."""
    model, src = exported
    sglang_cfg = read_draft(src).config
    ids = _vllm_ids(sglang_cfg)
    assert [k - 1 for k in ids] == vllm_captures(sglang_cfg, NUM_LAYERS) == [i - 1 for i in model.cfg.aux_layer_ids]


def test_speculators_loader_reads_our_export(tmp_path):
    """speculators' Eagle3DraftModel sizes fc from the draft width (3 x hidden_size, no
    target_hidden_size), so this uses a draft as wide as its target, as SpecRelay's are."""
    from speculators import SpeculatorModel
    from transformers import LlamaConfig, LlamaForCausalLM

    model, src = make_export(tmp_path, target_hidden_size=32)
    # A verifier for the loader to resolve ids against and take the embedding from: a tiny Llama
    # with the draft's vocabulary and width, and NUM_LAYERS layers.
    c = model.cfg
    verifier = LlamaForCausalLM(LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.target_hidden_size,
                                            intermediate_size=16, num_hidden_layers=NUM_LAYERS,
                                            num_attention_heads=2, num_key_value_heads=1))
    verifier.save_pretrained(tmp_path / "verifier")
    spec = to_speculators(src, tmp_path / "spec", target_model=tmp_path / "verifier")
    loaded = SpeculatorModel.from_pretrained(str(spec))
    assert type(loaded).__name__ == "Eagle3DraftModel"
    assert loaded.config.norm_before_residual is False
    assert [k - 1 for k in loaded.config.eagle_aux_hidden_state_layer_ids] == list(c.aux_layer_ids)
    state = loaded.state_dict()
    ours = read_draft(spec).tensors
    for k, v in ours.items():
        assert k in state, f"speculators did not load {k}"
        assert torch.equal(state[k].to(v.dtype), v), k
    # The embedding comes from the verifier (none is stored), in the draft's dtype (bf16).
    table = verifier.get_input_embeddings().weight.detach()
    assert torch.equal(state["embed_tokens.weight"], table.to(state["embed_tokens.weight"].dtype))
