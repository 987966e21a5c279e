"""A draft saved as a real training checkpoint and exported by `draft_trainer.export.export_sglang`,
loaded by SGLang's own LlamaForCausalLMEagle3 weight loader, computes the same logits as our
Eagle3Draft on the same target features and tokens.

SGLang side: its model class, its `load_weights` (the name mapping it applies when serving:
midlayer -> layers.0, q/k/v -> qkv_proj, gate/up -> gate_up_proj, d2t -> hot_token_id), its
attention backend and KV pool (borrowed from an in-process target ModelRunner), its
LogitsProcessor. Both sides run fp32 on the exported (bf16-rounded) weights.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from draft_trainer.methods.eagle3.model import KVCache
from tests.sglang_lane.draft_support import export_via_checkpoint, random_draft

VD = 200  # draft vocab < target vocab, so the d2t mapping is exercised


@pytest.fixture(scope="module")
def target(inprocess_sglang_target):
    """The lane's one in-process SGLang target runner (conftest.py: one per process)."""
    return inprocess_sglang_target


def _sglang_draft(export_dir, embed_VH):
    from sglang.srt.models.llama_eagle3 import LlamaForCausalLMEagle3
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(export_dir)
    model = LlamaForCausalLMEagle3(cfg).eval()
    with safe_open(export_dir / "model.safetensors", "pt") as f:
        model.load_weights((k, f.get_tensor(k)) for k in f.keys())
    with torch.no_grad():  # SGLang shares the target's embedding with the draft when serving
        model.model.embed_tokens.weight.copy_(embed_VH)
    return model


def _run_sglang_draft(runner, model, ids, aux_N3H, out_aux=None):
    """One EXTEND pass of the SGLang draft over `ids`; returns (normed hidden [N,h], last-token logits).
    `aux_N3H` is what the draft worker hands it: target features [N,3H] (first pass) or the
    draft's own previous output [N,h]. `out_aux` (a dict) receives under "aux" the hidden state
    the draft model hands its next step (LlamaModel's second output)."""
    from sglang.srt.managers.schedule_batch import ScheduleBatch
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch
    from sglang.srt.model_executor.forward_context import ForwardContext, forward_context
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    mr = runner.mr
    batch = ScheduleBatch.init_new(
        reqs=runner.passes.reqs([ids]), req_to_token_pool=mr.req_to_token_pool,
        token_to_kv_pool_allocator=mr.token_to_kv_pool_allocator, tree_cache=runner.passes.tree_cache,
        model_config=mr.model_config, enable_overlap=False, spec_algorithm=SpeculativeAlgorithm.NONE)
    batch.prepare_for_extend()
    if batch.input_ids is None:
        batch.input_ids = batch.prefill_input_ids_cpu
    fb = ForwardBatch.init_new(batch, mr, return_hidden_states_before_norm=False)
    fb.spec_info = SimpleNamespace(hidden_states=aux_N3H)  # what EAGLE's draft worker hands the draft
    seen = {}

    def grab(_module, args):  # returns None: the call goes on unchanged
        seen["h"] = args[1]

    def grab_aux(_module, _args, output):
        if out_aux is not None:
            out_aux["aux"] = output[1][0].detach().clone()

    hook = model.logits_processor.register_forward_pre_hook(grab)
    aux_hook = model.model.register_forward_hook(grab_aux)
    try:
        mr.attn_backend.init_forward_metadata(fb)
        with torch.no_grad(), forward_context(ForwardContext(attn_backend=mr.attn_backend), forward_batch=fb):
            out = model(fb.input_ids, fb.positions, fb)
    finally:
        hook.remove()
        aux_hook.remove()
        runner.passes.release(batch.reqs)  # this pass's own KV slots
    return seen["h"], out.next_token_logits


def test_exported_draft_same_logits_in_sglang(target, tiny_llama, tmp_path):
    info = target.model_info()
    ours, vocab = random_draft(tiny_llama, info, VD)
    out = export_via_checkpoint(ours, vocab, tmp_path)
    _rounded_like_export(ours)
    theirs = _sglang_draft(out, ours.embed_tokens.weight.detach())
    # SGLang's loader turned d2t into the hot-token map: the same draft->target ids as ours.
    assert torch.equal(theirs.get_hot_token_id(), ours.draft_to_target(torch.arange(VD)))

    ids = [5, 17, 42, 99, 3, 250, 7, 8, 300, 11, 64, 128]
    (cap,) = target.forward([ids], "hidden")
    aux_T3H = cap.aux_T3H.float()
    with torch.no_grad():
        g_1Th = ours.project(aux_T3H[None])
        pos_1T = torch.arange(len(ids))[None]
        g_1Th = ours.step(ours.embed_tokens(torch.tensor([ids])), g_1Th, pos_1T, KVCache())
        want_TV = ours.logits(g_1Th)[0]
    h_Nh, last_logits = _run_sglang_draft(target._runner, theirs, ids, aux_T3H)
    got_TV = torch.nn.functional.linear(h_Nh, theirs.lm_head.weight)[:, :VD]
    torch.testing.assert_close(got_TV, want_TV, rtol=0, atol=1e-5)
    torch.testing.assert_close(last_logits[0, :VD], want_TV[-1], rtol=0, atol=1e-5)
    assert torch.equal(got_TV.argmax(-1), want_TV.argmax(-1))
    print(f"max |logit diff| {(got_TV - want_TV).abs().max().item():.3g}")


def _rounded_like_export(ours):
    """Our side computes with the weights rounded as the export stores them (bf16); the
    embedding comes from the target, unrounded, in both."""
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if not name.startswith("embed_tokens"):
                p.copy_(p.to(torch.bfloat16).float())


def test_eagle31_export_same_logits_in_sglang(target, tiny_llama, tmp_path):
    """EAGLE-3.1 (model.eagle_variant=3.1): SGLang 0.5.23 reads `fc_norm` (a norm per aux layer,
    weights fc_norm.{0,1,2}) and `norm_output` (the next draft step reads the normed output) from
    our export. Its first draft pass over target features and its next pass over its own output
    compute our logits; the hidden state it feeds forward is our `feed(g)` = norm(g)."""
    info = target.model_info()
    ours, vocab = random_draft(tiny_llama, info, VD, seed=2, eagle31=True)
    out = export_via_checkpoint(ours, vocab, tmp_path)
    _rounded_like_export(ours)
    theirs = _sglang_draft(out, ours.embed_tokens.weight.detach())
    m = theirs.model
    assert m.fc_norm is not None and len(m.fc_norm) == 3 and m.norm_output and m.input_norm is None
    for i in range(3):   # loaded, not left at SGLang's init (ours are random, not ones)
        assert torch.equal(m.fc_norm[i].weight, ours.fc_norm[i].weight)

    ids = [5, 17, 42, 99, 3, 250, 7, 8, 300, 11, 64, 128]
    (cap,) = target.forward([ids], "hidden")
    aux_T3H = cap.aux_T3H.float()
    pos_1T = torch.arange(len(ids))[None]
    with torch.no_grad():
        emb_1Th = ours.embed_tokens(torch.tensor([ids]))
        g0_1Th = ours.step(emb_1Th, ours.project(aux_T3H[None]), pos_1T, KVCache())
        g1_1Th = ours.step(emb_1Th, ours.feed(g0_1Th), pos_1T, KVCache())
        want0_TV, fed0_Th, want1_TV = ours.logits(g0_1Th)[0], ours.feed(g0_1Th)[0], ours.logits(g1_1Th)[0]
    fed = {}
    h0_Nh, _ = _run_sglang_draft(target._runner, theirs, ids, aux_T3H, out_aux=fed)
    d0 = (torch.nn.functional.linear(h0_Nh, theirs.lm_head.weight)[:, :VD] - want0_TV).abs().max()
    assert d0 <= 1e-5, float(d0)
    # norm_output: SGLang hands the next step norm(g), which is our feed(g) (not g itself).
    torch.testing.assert_close(fed["aux"], fed0_Th, rtol=0, atol=1e-5)
    assert not torch.allclose(fed["aux"], g0_1Th[0], atol=1e-2)
    h1_Nh, last1 = _run_sglang_draft(target._runner, theirs, ids, fed["aux"])
    got1_TV = torch.nn.functional.linear(h1_Nh, theirs.lm_head.weight)[:, :VD]
    torch.testing.assert_close(got1_TV, want1_TV, rtol=0, atol=1e-5)
    torch.testing.assert_close(last1[0, :VD], want1_TV[-1], rtol=0, atol=1e-5)
    print(f"EAGLE-3.1 max |logit diff| pass 1 {float(d0):.3g}, pass 2 {(got1_TV - want1_TV).abs().max().item():.3g}")


def test_missing_key_is_what_sglang_would_silently_skip(target, tiny_llama, tmp_path):
    """Why the exporter must refuse incomplete checkpoints: SGLang loads one without complaint."""
    info = target.model_info()
    out = export_via_checkpoint(*random_draft(tiny_llama, info, VD, seed=1), tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(out / "model.safetensors")
    del tensors["midlayer.hidden_norm.weight"]
    save_file(tensors, str(out / "model.safetensors"))
    model = _sglang_draft(out, torch.zeros(info.vocab_size, info.hidden_size))
    # Loaded without an error; the norm kept its init value instead of the trained one.
    assert torch.equal(model.model.layers[0].hidden_norm.weight, torch.ones(info.hidden_size))
