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


_SPECULATORS_LOAD = """
import json, sys, torch
from safetensors.torch import load_file
from speculators import SpeculatorModel
spec, verifier = sys.argv[1], sys.argv[2]
# speculators 0.9.0 takes the verifier's embedding when its own is "not loaded", judged by NaNs in a
# tensor made with torch.empty: in deterministic mode torch fills new memory with NaN, so that
# judgement no longer depends on what the allocator's memory held (it failed ~1 run in 3 without).
torch.use_deterministic_algorithms(True, warn_only=True)
m = SpeculatorModel.from_pretrained(spec)
state = m.state_dict()
ours = load_file(spec + "/model.safetensors")
table = load_file(verifier + "/model.safetensors")["model.embed_tokens.weight"]
emb = state["embed_tokens.weight"]
print(json.dumps({"cls": type(m).__name__, "norm_before_residual": m.config.norm_before_residual,
                  "ids": m.config.eagle_aux_hidden_state_layer_ids,
                  "missing": [k for k in ours if k not in state],
                  "differ": [k for k in ours if k in state and not torch.equal(state[k].to(ours[k].dtype), ours[k])],
                  "embed_is_verifiers": torch.equal(emb, table.to(emb.dtype))}))
"""


def test_speculators_loader_reads_our_export(tmp_path):
    """speculators' own loader, in a fresh interpreter: with vLLM imported in the same process,
    speculators 0.9.0 sometimes keeps an uninitialised embedding instead of the verifier's (its
    "NaN means not loaded" check misses; measured here), which is not about our files.

    speculators' Eagle3DraftModel sizes fc from the draft width (3 x hidden_size, no
    target_hidden_size), so this uses a draft as wide as its target, as SpecRelay's are."""
    import json
    import subprocess
    import sys

    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.support.procs import env_with_repo

    model, src = make_export(tmp_path, target_hidden_size=32)
    c = model.cfg
    # A verifier to resolve ids against and take the embedding from: the draft's vocabulary and
    # width, NUM_LAYERS layers.
    verifier = LlamaForCausalLM(LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.target_hidden_size,
                                            intermediate_size=16, num_hidden_layers=NUM_LAYERS,
                                            num_attention_heads=2, num_key_value_heads=1))
    verifier.save_pretrained(tmp_path / "verifier")
    spec = to_speculators(src, tmp_path / "spec", target_model=tmp_path / "verifier")
    res = subprocess.run([sys.executable, "-c", _SPECULATORS_LOAD, str(spec), str(tmp_path / "verifier")],
                         capture_output=True, text=True, timeout=300, env=env_with_repo())
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["cls"] == "Eagle3DraftModel" and got["norm_before_residual"] is False
    assert [k - 1 for k in got["ids"]] == list(c.aux_layer_ids)
    assert got["missing"] == [] and got["differ"] == []
    assert got["embed_is_verifiers"]   # none is stored: the loader takes the verifier's
