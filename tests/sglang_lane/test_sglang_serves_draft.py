"""SGLang itself serves the tiny target with our trained, exported draft (EAGLE3, chain 3/1/4) on
CPU: its output equals plain greedy decoding, and its reported acceptance length is within 10%
of our own evaluator's (`draft_trainer.eval.speculative_decode`) on the same prompts.

The draft goes the product way: trained with the real `train_step` (tests/support/drafts.py),
saved by the trainer's checkpoint writer, exported by `draft_trainer.export.export_sglang`; our
evaluator reads the export back with `load_exported` (the same bf16-rounded weights SGLang loads).

What makes it run on CPU (tests/sglang_lane/stubs/sgl_kernel): SGLang refuses EAGLE with the
torch_native attention backend; its CPU EAGLE backend (intel_amx) needs AMX hardware and kernels.
The lane keeps torch_native as the base backend and asks for intel_amx per phase, whose two
attention ops and the speculative-decoding CPU kernels the stand-in implements in plain torch.
"""

from __future__ import annotations

import pytest
import torch

from draft_trainer.assets.tiny import TINY_CHATS
from draft_trainer.eval import greedy_decode, speculative_decode
from draft_trainer.methods.eagle3.drafter import Eagle3Drafter
from draft_trainer.methods.eagle3.export import load_exported
from tests.sglang_lane.draft_support import export_via_checkpoint
from tests.support.drafts import one_thread, train_tiny_draft

STEPS, TOPK, DRAFT_TOKENS = 3, 1, 4
MAX_NEW = 32
TRAIN_STEPS = 60


def _prompts(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             for q, _ in TINY_CHATS[:4]]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


@pytest.fixture(scope="module")
def exported(tiny_llama, tmp_path_factory):
    """A draft trained (briefly, on these prompts' greedy continuations) and exported for SGLang.

    Training on the evaluated prompts is deliberate: the claim is SGLang == ours, and a draft
    that is actually accepted makes that comparison say something.
    """
    with one_thread():
        draft, vocab = train_tiny_draft(tiny_llama, _prompts(tiny_llama), steps=TRAIN_STEPS, max_new_tokens=MAX_NEW)
    return export_via_checkpoint(draft, vocab, tmp_path_factory.mktemp("draft"))


def test_sglang_serves_our_draft(exported, tiny_llama):
    import sglang as sgl
    from transformers import AutoModelForCausalLM

    prompts = _prompts(tiny_llama)
    target = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    draft = load_exported(exported, embed_tokens_VH=target.get_input_embeddings().weight.detach()).eval()
    no_eos: set[int] = set()  # SGLang runs with ignore_eos: both sides generate exactly MAX_NEW tokens
    greedy, ours = [], []
    with one_thread():
        for p in prompts:
            greedy.append(greedy_decode(target, p, MAX_NEW, no_eos)[0])
            ours.append(speculative_decode(target, Eagle3Drafter(draft), p, STEPS, MAX_NEW, no_eos))
    assert [toks for toks, _ in ours] == greedy  # our evaluator is lossless too
    assert all(len(g) == MAX_NEW for g in greedy)

    engine = sgl.Engine(
        model_path=str(tiny_llama), speculative_algorithm="EAGLE3", speculative_draft_model_path=str(exported),
        speculative_num_steps=STEPS, speculative_eagle_topk=TOPK, speculative_num_draft_tokens=DRAFT_TOKENS,
        device="cpu", dtype="float32", attention_backend="torch_native", prefill_attention_backend="intel_amx",
        decode_attention_backend="intel_amx", speculative_draft_attention_backend="intel_amx",
        disable_cuda_graph=True, disable_radix_cache=True, skip_tokenizer_init=True, max_total_tokens=4096,
        mem_fraction_static=0.05, max_running_requests=4, random_seed=0, log_level="warning")
    try:
        outs = engine.generate(input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": MAX_NEW,
                                                                   "ignore_eos": True})
    finally:
        engine.shutdown()
    served = [o["output_ids"] for o in outs]
    assert served == greedy  # speculative decoding in SGLang is lossless with our draft
    sg_accept = [o["meta_info"]["spec_accept_length"] for o in outs]
    # SGLang's convention: completion tokens (the prefill's token included) / verify passes.
    our_accept = [st.new_tokens / st.rounds for _, st in ours]
    sg_counts = [(o["meta_info"]["spec_verify_ct"], o["meta_info"]["spec_num_correct_drafts"]) for o in outs]
    our_counts = [(st.rounds, sum(st.accepted)) for _, st in ours]
    mean_sg, mean_ours = sum(sg_accept) / len(sg_accept), sum(our_accept) / len(our_accept)
    print(f"acceptance length: sglang {[round(a, 3) for a in sg_accept]} mean {mean_sg:.3f}; "
          f"ours {[round(a, 3) for a in our_accept]} mean {mean_ours:.3f}; "
          f"(verify passes, accepted drafts): sglang {sg_counts} ours {our_counts}")
    # Without any accepted draft the length is MAX_NEW / (MAX_NEW - 1) = 1.03 on both sides, and
    # the comparison would say nothing. How well a short training run drafts varies by machine,
    # so this asks only that drafts are accepted, not for a quality level.
    assert sum(a for _, a in our_counts) >= len(prompts), ("the draft is hardly ever accepted", our_counts)
    for a_sg, a_ours in zip(sg_accept, our_accept):
        assert abs(a_sg - a_ours) <= 0.10 * a_ours, (sg_accept, our_accept)
