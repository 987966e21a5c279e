"""Which target layers SGLang captures for our SGLang export (and for a speculators draft
converted back), computed with SGLang's own code: the draft's config read the way SGLang's
ModelConfig reads it (transformers' AutoConfig), then `LlamaForCausalLM.
set_eagle3_layers_to_capture` (srt/models/llama.py) on the target side. `LlamaModel.forward`
captures the *input* of each layer in `layers_to_capture`, i.e. the output of the layer before;
that the features are right end to end is shown by test_sglang_serves_draft.py's acceptance.
"""

from __future__ import annotations

from types import SimpleNamespace

from draft_trainer.formats.store import read_draft, to_sglang, to_speculators
from tests.support.engine_capture import sglang_captures
from tests.unit.test_formats import NUM_LAYERS, exported  # noqa: F401  (fixture: our export, ids [1, 14, 26])


def _sglang_outputs_captured(draft_dir, num_layers: int) -> list[int]:
    from sglang.srt.models.llama import LlamaForCausalLM
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(draft_dir)
    try:   # as srt/model_executor/model_runner_components/spec_aux_hidden_state.py reads it
        ids = hf.eagle_config["eagle_aux_hidden_state_layer_ids"]
    except Exception:
        ids = None
    target = SimpleNamespace(pp_group=SimpleNamespace(is_last_rank=True),
                             config=SimpleNamespace(num_hidden_layers=num_layers), model=SimpleNamespace())
    LlamaForCausalLM.set_eagle3_layers_to_capture(target, ids)
    return [i - 1 for i in target.model.layers_to_capture]   # input of layer i = output of layer i - 1


def test_sglang_captures_our_layers(exported, tmp_path):  # noqa: F811
    model, src = exported
    got = _sglang_outputs_captured(src, NUM_LAYERS)
    assert got == list(model.cfg.aux_layer_ids)
    assert got == sglang_captures(read_draft(src).config, NUM_LAYERS)   # tests/support encodes SGLang right
    back = to_sglang(to_speculators(src, tmp_path / "spec"), tmp_path / "back")
    assert _sglang_outputs_captured(back, NUM_LAYERS) == list(model.cfg.aux_layer_ids)


def test_sglang_default_without_ids(exported, tmp_path):  # noqa: F811
    import json

    _, src = exported
    c = read_draft(src).config
    c["eagle_config"] = {"use_aux_hidden_state": True}
    (tmp_path / "noids").mkdir()
    (tmp_path / "noids" / "config.json").write_text(json.dumps(c))
    assert _sglang_outputs_captured(tmp_path / "noids", NUM_LAYERS) == sglang_captures(c, NUM_LAYERS) == [1, 14, 26]
