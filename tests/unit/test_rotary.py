"""The draft's rotary embedding equals transformers' LlamaRotaryEmbedding bit for bit (default RoPE computed
here, the other types through transformers' rope utils), and building a default-RoPE draft does not import
transformers' Llama modeling code (~190 MB of resident memory in the trainer process)."""


import pytest
import torch

from draft_trainer.model.layers import RotaryEmbedding
from tests.support.eagle3 import tiny_cfg
from tests.support.procs import run_code

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 100000.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64},
}


@pytest.mark.parametrize("kind", sorted(ROPES))
def test_rotary_equals_transformers_llama(kind):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = tiny_cfg(head_dim=16, max_position_embeddings=128, rope_parameters=dict(ROPES[kind]))
    ours = RotaryEmbedding(cfg.head_dim, cfg.rope_parameters, cfg.llama_config)
    ref = LlamaRotaryEmbedding(cfg.llama_config())
    assert torch.equal(ours.inv_freq, ref.inv_freq)
    x = torch.empty(0, dtype=torch.bfloat16)
    # Positions past max_position_embeddings make "dynamic" recompute its frequencies, then reset them.
    for pos in (torch.arange(40)[None] + 3, torch.arange(300)[None], torch.arange(2, 50).view(2, 24)):
        for dtype in (torch.float32, torch.bfloat16):
            c, s = ours(x.to(dtype), pos)
            rc, rs = ref(x.to(dtype), pos)
            assert c.dtype == dtype and c.shape == (*pos.shape, 16)
            assert torch.equal(c, rc) and torch.equal(s, rs), (kind, pos.shape, dtype)


def test_non_default_rope_needs_the_hf_config():
    with pytest.raises(ValueError, match="llama3.*hf_config"):
        RotaryEmbedding(16, ROPES["llama3"])


def test_default_rope_draft_does_not_import_transformers_modeling():
    code = ("import sys\n"
            "from tests.support.eagle3 import tiny_cfg\n"
            "from draft_trainer.methods.eagle3.model import Eagle3Draft\n"
            "Eagle3Draft(tiny_cfg())\n"
            "bad = [m for m in sys.modules if m.startswith(('transformers.models', 'transformers.generation'))]\n"
            "assert not bad, bad[:5]\n")
    res = run_code(code)
    assert res.returncode == 0, res.stderr[-2000:]
