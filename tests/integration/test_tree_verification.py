"""Tree verification (decode.py, `width` > 1): alternatives beside each chain token, verified in the
same forward through row-wise attention's tree rows, on real tiny targets. Accepted alternatives
must leave the target's cache and the features handed to the drafter exactly as if the path had
been a chain, and the output must stay plain greedy's."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from draft_trainer.evaluate import rowwise_attention
from draft_trainer.evaluate.decode import TargetVerifier, eos_set, greedy_decode, speculative_decode
from draft_trainer.methods.eagle3.drafter import Eagle3Drafter
from tests.integration.test_eval_drafters import MAX_NEW, ScriptedDrafter, _prompts, trained  # noqa: F401
from tests.support.drafts import one_thread


class ScriptedTree(ScriptedDrafter):
    """The chain is wrong from `wrong_at` on; the alternatives at `wrong_at` hold two wrong tokens
    and, when `alt_right`, the right one between them."""

    def __init__(self, ref, wrong_at, alt_right=True, **kw):
        super().__init__(ref, wrong_at, **kw)
        self.alt_right = alt_right

    def propose_tree(self, k, width, min_confidence=0.0):
        chain = self.propose(k)
        done = len(self.seq) - self.n_prompt
        alts = [[] for _ in chain]
        if self.wrong_at is not None and self.wrong_at < len(chain):
            right = self.ref[done + self.wrong_at]
            wrong = [(right + 2) % self.vocab, (right + 3) % self.vocab]
            alts[self.wrong_at] = [wrong[0], right, wrong[1]][: width - 1] if self.alt_right else wrong[: width - 1]
        return chain, alts


def _target(model_dir, dtype):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype,
                                                attn_implementation=rowwise_attention.register()).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lazy_head", [True, False])
def test_an_accepted_alternative_commits_like_a_chain(dtype, lazy_head, tiny_llama):
    target = _target(tiny_llama, dtype)
    prompt = _prompts(tiny_llama, 1)[0]
    no_eos: set[int] = set()
    K = 4
    ref, _ = greedy_decode(target, prompt, MAX_NEW, no_eos)
    for wrong_at, alt_right, expect in ((0, True, 1), (2, True, 3), (2, False, 2), (None, True, K)):
        d = ScriptedTree(ref, wrong_at, alt_right, vocab=target.config.vocab_size)
        verifier = TargetVerifier(target, d.feature_layers, lazy_head=lazy_head)
        got, st = speculative_decode(target, d, prompt, K, MAX_NEW, no_eos, verifier=verifier, width=4)
        assert got == ref, (wrong_at, alt_right)
        assert st.accepted[:-1] == [expect] * (st.rounds - 1) and st.accepted[-1] <= expect, (wrong_at, st.accepted)
        assert st.proposed[0] == K + (3 if alt_right and wrong_at is not None else 2 if wrong_at is not None else 0)
        # features handed over after rounds that ended on an alternative are the target's own at
        # those positions: a moved cache entry in the wrong place would change every later row
        with torch.no_grad():
            hs = target(torch.tensor([d.seq]), output_hidden_states=True).hidden_states
        full_SF = torch.cat([hs[i + 1][0] for i in d.feature_layers], -1)
        got_SF = torch.stack([d.feats[p] for p in sorted(d.feats)])
        tol = 1e-4 if dtype == torch.float32 else 0.1
        torch.testing.assert_close(got_SF.float(), full_SF[: len(d.feats)].float(), atol=tol, rtol=tol)


def test_tree_rows_attend_to_their_own_path_only(tiny_llama):
    """One forward over a tree equals, row by row, 1-token steps along each row's own path (bf16,
    bit for bit), and a row that attended to a sibling's key would not."""
    target = _target(tiny_llama, torch.bfloat16)
    prompt = _prompts(tiny_llama, 1)[0]
    verifier = TargetVerifier(target, (0,), lazy_head=False)
    with torch.inference_mode():
        first, _ = verifier.prefill(prompt)
        # rows: x_n, 5, 6 | 7 (alternative to 5), 8, 9 (to 6) | 10 after 7 (a deeper branch: keys copied)
        ids = [first, 5, 6, 7, 8, 9, 10]
        parents = [-1, 0, 1, 0, 1, 1, 3]
        depth = [0, 1, 2, 1, 2, 2, 2]
        with rowwise_attention.tree_rows(parents):
            _, logits, _ = verifier._forward(ids, prefill=False, depth=depth)
        for row, path in ((2, [first, 5, 6]), (3, [first, 7]), (5, [first, 5, 9]), (6, [first, 7, 10])):
            step = TargetVerifier(target, (0,), lazy_head=False)
            step.prefill(prompt)
            for t in path:
                _, one, _ = step._forward([t], prefill=False)
            assert torch.equal(one[0, -1], logits[0, row]), (row, path)
        # the sibling's path differs from row 4's: its logits do too
        assert not torch.equal(logits[0, 4], logits[0, 5])


def test_a_tree_needs_row_wise_attention_and_a_tree_drafter(tiny_llama):
    target = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()   # SDPA
    prompt = _prompts(tiny_llama, 1)[0]
    ref, _ = greedy_decode(target, prompt, 8, set())
    with pytest.raises(ValueError, match="row-wise attention"):
        speculative_decode(target, ScriptedTree(ref, 0, vocab=target.config.vocab_size), prompt, 3, 8, set(),
                           width=2)
    with pytest.raises(ValueError, match="proposes chains only"):
        speculative_decode(target, ScriptedDrafter(ref, 0), prompt, 3, 8, set(), width=2)
    with pytest.raises(ValueError, match="tree row 1 follows row 1"):
        rowwise_attention.tree_paths([-1, 1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_trained_draft_decodes_losslessly_as_a_tree_and_accepts_more(dtype, trained, tiny_llama):  # noqa: F811
    draft, _, _ = trained
    target = _target(tiny_llama, dtype)
    draft = draft.to(dtype)
    eos = eos_set(target, AutoTokenizer.from_pretrained(tiny_llama))
    # a tree's chain is the chain: the alternatives come from the same steps' logits
    prompt = _prompts(tiny_llama, 1)[0]
    verifier = TargetVerifier(target, draft.cfg.aux_layer_ids)
    with torch.inference_mode():
        first, feats_SF = verifier.prefill(prompt)
        d = Eagle3Drafter(draft)
        d.start(prompt, first, feats_SF)
        chain = d.propose(4)
        d.cache.truncate(d.real_len)
        tree_chain, alts = d.propose_tree(4, 3)
    assert tree_chain == chain and [len(a) for a in alts] == [2] * 4
    assert all(t not in a for t, a in zip(chain, alts))
    chain_acc = tree_acc = alt_hits = 0
    with one_thread():
        for prompt in _prompts(tiny_llama):
            ref, _ = greedy_decode(target, prompt, 32, eos)
            got1, st1 = speculative_decode(target, Eagle3Drafter(draft), prompt, 3, 32, eos)
            got3, st3 = speculative_decode(target, Eagle3Drafter(draft), prompt, 3, 32, eos, width=3)
            assert got1 == ref and got3 == ref
            chain_acc += sum(st1.accepted) / st1.rounds
            tree_acc += sum(st3.accepted) / st3.rounds
            alt_hits += sum(p > 3 for p in st3.proposed)
    assert alt_hits > 0
    assert tree_acc > chain_acc, (tree_acc, chain_acc)
