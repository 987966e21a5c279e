"""Our DFlash export in SGLang 0.5.23's own DFLASH draft class (sglang/srt/models/dflash.py).

What runs on SGLang's side: `DFlashDraftModel(config)` built from our config.json (its config
parsing: `parse_dflash_draft_config`, `resolve_target_layer_ids`, block size, layer types), its
`load_weights` over our safetensors (q/k/v -> qkv_proj and gate/up -> gate_up_proj fusing, the
fc.weight shape check), `project_target_hidden`, and its decoder layers' forward: qkv_proj, the
q/k norms, its rotary embedding, o_proj, its fused residual RMSNorms, SiluAndMul MLP, final norm;
the context keys/values made the way its worker materialises them (`kv_proj_only`,
`apply_k_norm`, `apply_k_rope` on the projected context).
What does not run: RadixAttention (it needs a ForwardBatch, a KV pool holding the draft's five
layers and the DFLASH worker's context-KV writes; the CPU lane has no DFLASH worker path). Each
layer's `attn` is replaced by plain softmax attention over [context | block], non-causal (the
ENCODER_ONLY type SGLang picks for full-attention draft layers), fed by SGLang's own q/k/v.
The hidden states and logits are compared with our DFlashDraft on the same features and block.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from draft_trainer.methods.dflash.config import DFlashConfig
from draft_trainer.methods.dflash.export import expected_shapes, write_sglang
from draft_trainer.methods.dflash.model import DFlashDraft

S, K = 11, 16  # context positions, block size


@pytest.fixture(scope="module")
def runtime(inprocess_sglang_target):
    """The lane's one in-process SGLang target runner (conftest.py: one per process)."""
    return inprocess_sglang_target


def _ours(seed=0) -> DFlashDraft:
    cfg = DFlashConfig(hidden_size=64, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, intermediate_size=128, vocab_size=512, draft_vocab_size=256,
                       target_layer_ids=[1, 2, 3, 4, 5], num_target_layers=8, block_size=K, mask_token_id=3)
    torch.manual_seed(seed)
    m = DFlashDraft(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)    # not all-ones, so a dropped or misplaced norm shows
    # bf16 round trip, as exported
    m.load_state_dict({k: v.to(torch.bfloat16).float() if v.is_floating_point() else v
                       for k, v in m.state_dict().items()})
    return m.eval()


class _PlainAttention(torch.nn.Module):
    """Stands in for RadixAttention: softmax over [context K/V | block K/V], no causal mask."""

    def __init__(self, n, g, d, ctx_k, ctx_v):
        super().__init__()
        self.n, self.g, self.d, self.ctx_k, self.ctx_v = n, g, d, ctx_k, ctx_v

    def forward(self, q, k, v, forward_batch, **kw):
        Q = q.shape[0]
        k = torch.cat([self.ctx_k, k]).view(-1, self.g, self.d).repeat_interleave(self.n // self.g, 1)
        v = torch.cat([self.ctx_v, v]).view(-1, self.g, self.d).repeat_interleave(self.n // self.g, 1)
        q = q.view(Q, self.n, self.d)
        p = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) * self.d ** -0.5, -1)
        return torch.einsum("hqk,khd->qhd", p, v).reshape(Q, self.n * self.d)


def test_sglang_dflash_loads_our_export_and_matches_our_logits(runtime, tmp_path):
    from sglang.srt.models.dflash import DFlashDraftModel
    from sglang.srt.speculative.dflash_utils import build_target_layer_ids, parse_dflash_draft_config
    from transformers import AutoConfig

    ours = _ours()
    cfg = ours.cfg
    write_sglang(tmp_path, cfg, ours.state_dict())
    hf_cfg = AutoConfig.from_pretrained(tmp_path)

    # Config fields as SGLang parses them.
    parsed = parse_dflash_draft_config(draft_hf_config=hf_cfg)
    assert parsed.block_size == K and parsed.mask_token_id == 3 and parsed.target_layer_ids == [1, 2, 3, 4, 5]
    assert parsed.resolve_target_layer_ids(target_num_layers=8) == cfg.target_layer_ids
    assert build_target_layer_ids(8, 5) == cfg.target_layer_ids  # our derivation = SGLang's default
    assert parsed.conv_kernel_size == 0 and parsed.selector_rank == 0 and parsed.projector_type is None

    sm = DFlashDraftModel(hf_cfg).eval()
    assert sm.block_size == K and sm.num_context_features == 5
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        sm.load_weights((k, f.get_tensor(k).float()) for k in keys)
    assert set(keys) == set(expected_shapes(cfg))
    # Every SGLang parameter got our tensor (fused where SGLang fuses).
    st = {k: v for k, v in ours.state_dict().items()}
    for name, p in sm.named_parameters():
        if ".qkv_proj." in name:
            base = name.replace("qkv_proj.weight", "")
            want = torch.cat([st[base + "q_proj.weight"], st[base + "k_proj.weight"], st[base + "v_proj.weight"]])
        elif ".gate_up_proj." in name:
            base = name.replace("gate_up_proj.weight", "")
            want = torch.cat([st[base + "gate_proj.weight"], st[base + "up_proj.weight"]])
        else:
            want = st[name]
        assert torch.equal(p.detach().float(), want.float()), name

    # Same features, same block: SGLang's layers vs ours.
    g = torch.Generator().manual_seed(1)
    feats_SF = torch.randn(S, 5 * cfg.hidden_size, generator=g)
    emb_VH = torch.randn(cfg.vocab_size, cfg.hidden_size, generator=g) * 0.5
    head_VH = torch.randn(cfg.vocab_size, cfg.hidden_size, generator=g) * 0.5
    ids_K = torch.full((K,), cfg.mask_token_id)
    ids_K[0] = 42
    noise_KH = emb_VH[ids_K]
    with torch.no_grad():
        ours_h = ours(feats_SF[None], noise_KH[None], torch.arange(S)[None], torch.arange(S, S + K)[None],
                      torch.ones(1, K, S, dtype=torch.bool))[0]
        ctx_SH = sm.project_target_hidden(feats_SF)
        assert torch.allclose(ctx_SH, ours.project_context(feats_SF[None])[0], atol=1e-5)
        for layer in sm.layers:
            at = layer.self_attn
            k, v = at.kv_proj_only(sm.prepare_context_hidden_for_kv(layer, ctx_SH))
            k = at.apply_k_rope(torch.arange(S), at.apply_k_norm(k))
            at.attn = _PlainAttention(at.num_heads, at.num_kv_heads, at.head_dim, k, v)
        out = sm(torch.zeros(K, dtype=torch.long), torch.arange(S, S + K), None, input_embeds=noise_KH)
    sg_h = out.hidden_states
    assert torch.allclose(sg_h, ours_h, atol=1e-4), (sg_h - ours_h).abs().max()
    sg_tok = (sg_h[1:] @ head_VH.t()).argmax(-1)
    our_tok = (ours_h[1:] @ head_VH.t()).argmax(-1)
    assert torch.equal(sg_tok, our_tok)
    # A broken key fails the load: SGLang checks fc.weight's width against the config's layers.
    bad = {"fc.weight": torch.zeros(cfg.hidden_size, 4 * cfg.hidden_size)}
    with pytest.raises(ValueError, match="fc.weight shape mismatch"):
        sm.load_weights(bad.items())
    json.loads((tmp_path / "config.json").read_text())


@pytest.mark.parametrize("method", ["eagle3", "dflash"])
def test_each_method_names_an_algorithm_sglang_knows_for_its_export(method):
    """The demo's serve hint (`--speculative-algorithm`) comes from the method: SGLang must know that name,
    and it must be the algorithm of that method's family (DFLASH for DFlash, EAGLE3 for EAGLE-3)."""
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    from draft_trainer.methods import method_class

    algo = SpeculativeAlgorithm.from_string(method_class(method).sglang_algorithm)
    assert algo.is_dflash() == (method == "dflash") and algo.is_eagle3() == (method == "eagle3")
