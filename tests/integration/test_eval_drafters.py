"""The evaluator's Drafter seam on real tiny targets: acceptance accounting, the features handed
to a drafter, the fast verification path against the full forward, and the baselines and speed
rounds that `draft-trainer eval` reports beside the draft."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from draft_trainer.assets import TINY_CHATS
from draft_trainer.evaluate import rowwise_attention
from draft_trainer.evaluate.decode import TargetVerifier, eos_set, greedy_decode, speculative_decode
from draft_trainer.methods.base import Drafter
from draft_trainer.methods.eagle3.drafter import Eagle3Drafter
from common.cpu_linear import prepack_available
from common.errors import DataError
from draft_trainer.evaluate.runner import evaluate
from draft_trainer.export import export_sglang
from tests.support.drafts import one_thread, save_checkpoint, train_tiny_draft
from tests.support.procs import run_cli

MAX_NEW = 24


def _prompts(model_dir, n=4):
    tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for q, _ in TINY_CHATS[:n]:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                      return_dict=False)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def _n_linears(model_dir) -> int:
    """The linear layers a Llama has: q, k, v, o, gate, up, down in each layer, and its head."""
    from transformers import AutoConfig

    return 7 * AutoConfig.from_pretrained(model_dir).num_hidden_layers + 1


class ScriptedDrafter:
    """Knows the greedy reference: proposes its next tokens, wrong from position `wrong_at` on
    (None: never). Records every feature row it is handed, by the position it belongs to."""

    name = "scripted"

    def __init__(self, ref: list[int], wrong_at: int | None, feature_layers=(0, 1), vocab=512):
        self.ref, self.wrong_at, self.feature_layers, self.vocab = ref, wrong_at, tuple(feature_layers), vocab
        self.seq: list[int] = []
        self.feats: dict[int, torch.Tensor] = {}

    def _commit(self, tokens, feats_SF):
        assert feats_SF.shape[0] == len(tokens)
        for i in range(len(tokens)):  # the row of the position before tokens[i]
            self.feats[len(self.seq) - 1] = feats_SF[i].clone()
            self.seq.append(tokens[i])

    def start(self, prompt, first_token, feats_SF):
        self.seq, self.feats = [prompt[0]], {}
        self.n_prompt = len(prompt)
        self._commit(list(prompt[1:]) + [first_token], feats_SF)

    def extend(self, tokens, feats_SF):
        self._commit(list(tokens), feats_SF)

    def propose(self, k):
        done = len(self.seq) - self.n_prompt
        out = self.ref[done:done + k]
        if self.wrong_at is not None and self.wrong_at < len(out):
            out[self.wrong_at] = (out[self.wrong_at] + 1) % self.vocab
        return out


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("lazy_head", [True, False])
def test_acceptance_accounting_and_feature_pairing(family, lazy_head, tiny_llama, tiny_qwen3):
    model_dir = tiny_llama if family == "llama" else tiny_qwen3
    target = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = _prompts(model_dir, 1)[0]
    no_eos: set[int] = set()
    K = 4
    ref, _ = greedy_decode(target, prompt, MAX_NEW, no_eos)
    assert ScriptedDrafter(ref, None).name and isinstance(ScriptedDrafter(ref, None), Drafter)
    for wrong_at in (None, 0, 2):
        d = ScriptedDrafter(ref, wrong_at, vocab=target.config.vocab_size)
        verifier = TargetVerifier(target, d.feature_layers, lazy_head=lazy_head)
        assert (verifier.body is not None) == lazy_head
        got, st = speculative_decode(target, d, prompt, K, MAX_NEW, no_eos, verifier=verifier)
        assert got == ref
        expect = K if wrong_at is None else wrong_at
        # Every round but the last (cut by max_new_tokens) accepts exactly `expect` drafts.
        assert st.accepted[:-1] == [expect] * (st.rounds - 1) and st.accepted[-1] <= expect
        assert st.new_tokens == len(got) == MAX_NEW
        assert st.proposed[0] == K and 0 < st.draft_s + st.target_s <= st.seconds
        # The features handed over are the target's own, at the right positions: a full forward
        # over the committed sequence (no cache) gives the same rows.
        with torch.no_grad():
            hs = target(torch.tensor([d.seq]), output_hidden_states=True).hidden_states
        full_SF = torch.cat([hs[i + 1][0] for i in d.feature_layers], -1)
        assert sorted(d.feats) == list(range(len(d.feats)))       # every position once, in order
        got_SF = torch.stack([d.feats[p] for p in sorted(d.feats)])
        torch.testing.assert_close(got_SF, full_SF[: len(d.feats)], atol=1e-4, rtol=1e-4)


def test_a_drafter_may_not_propose_more_than_k(tiny_llama):
    target = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    prompt = _prompts(tiny_llama, 1)[0]
    ref, _ = greedy_decode(target, prompt, 8, set())
    too_many = ScriptedDrafter(ref, None)
    too_many.propose = lambda k: [1] * (k + 1)
    with pytest.raises(ValueError, match="proposed 3 tokens, more than 2"):
        speculative_decode(target, too_many, prompt, 2, 8, set())
    with pytest.raises(ValueError, match="do not fit the target"):
        TargetVerifier(target, [0, target.config.num_hidden_layers])


@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaldrafters")
    with one_thread():
        draft, vocab = train_tiny_draft(tiny_llama, _prompts(tiny_llama), steps=50, max_new_tokens=32)
    out = export_sglang(save_checkpoint(draft, vocab, tmp / "run"), tmp / "export")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q, _ in TINY_CHATS[:4]))
    return draft, out, prompts


def test_fast_verification_path_equals_the_full_forward(trained, tiny_llama):
    """Projecting one position at a time until a rejection decides exactly as all K+1 logits do."""
    draft, _, _ = trained
    target = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    eos = eos_set(target, tok)
    total = 0
    with one_thread():
        for prompt in _prompts(tiny_llama):
            runs = [speculative_decode(target, Eagle3Drafter(draft), prompt, 5, 32, eos,
                                       verifier=TargetVerifier(target, draft.cfg.aux_layer_ids, lazy_head=lazy))
                    for lazy in (True, False)]
            (fast, st_fast), (full, st_full) = runs
            assert fast == full == greedy_decode(target, prompt, 32, eos)[0]
            assert st_fast.accepted == st_full.accepted
            total += sum(st_fast.accepted)
    assert total > 0  # the draft is accepted: the comparison covers accepted and rejected positions


def test_evaluate_reports_baselines_and_speed_rounds(trained, tiny_llama):
    _, export_dir, prompts = trained
    cache: dict = {}
    with one_thread():
        r = evaluate(tiny_llama, export_dir, prompts, num_steps=4, max_new_tokens=MAX_NEW, greedy_cache=cache,
                     untrained=True, speed_rounds=2)
        again = evaluate(tiny_llama, export_dir, prompts, num_steps=4, max_new_tokens=MAX_NEW, greedy_cache=cache)
    assert r["lossless"] and not r["mismatches"]
    pl, un = r["prompt_lookup"], r["untrained"]
    for block in (r, pl, un):
        assert sum(block["accepted_histogram"]) == block["target_forwards"] > 0
        assert 1.0 <= block["tau"] <= 5.0 and block["spec_tokens_per_s"] > 0
    assert pl["lossless"] and un["lossless"] and pl["max_ngram"] == 3 and 0 <= pl["proposed_per_round"] <= 4
    assert r["tau"] > un["tau"]                        # training added something over random weights
    sp = r["speed"]
    assert sp["rounds"] == 2 and all(len(sp[f"{k}_tokens_per_s"]) == 2
                                     for k in ("greedy", "draft", "prompt_lookup", "untrained"))
    assert min(sp["draft_tokens_per_s"]) <= r["spec_tokens_per_s"] <= max(sp["draft_tokens_per_s"])
    ts = r["time_split"]
    assert ts["drafter_s"] > 0 and ts["target_s"] > 0 and ts["loop_other_s"] >= 0
    assert ts["break_even_tau"] == pytest.approx(ts["ms_per_round"] / ts["greedy_ms_per_token"])
    # The second call reuses the cached greedy references and prompt-lookup decodes: same numbers.
    assert "untrained" not in again and again["speed"]["rounds"] == 1
    assert again["tau"] == r["tau"] and again["prompt_lookup"]["tau"] == pl["tau"]
    assert again["per_prompt"] == r["per_prompt"]


def test_evaluate_also_k_runs_the_same_draft_at_other_chain_lengths(trained, tiny_llama):
    """by_k[K] is what a separate evaluation at --num-steps K reports (same acceptance, lossless)."""
    _, export_dir, prompts = trained
    cache: dict = {}
    with one_thread():
        r = evaluate(tiny_llama, export_dir, prompts, num_steps=4, max_new_tokens=MAX_NEW, greedy_cache=cache,
                     prompt_lookup=False, also_k=[2, 1, 4])
        alone = {k: evaluate(tiny_llama, export_dir, prompts, num_steps=k, max_new_tokens=MAX_NEW,
                             greedy_cache=cache, prompt_lookup=False) for k in (1, 2)}
        with pytest.raises(DataError, match="--also-k"):
            evaluate(tiny_llama, export_dir, prompts, num_steps=4, max_new_tokens=MAX_NEW, also_k=[0])
    assert list(r["by_k"]) == ["1", "2", "4"] and r["lossless"]
    assert r["by_k"]["4"]["tau"] == r["tau"] and r["by_k"]["4"]["speedup"] == r["speedup"]
    for k in (1, 2):
        assert r["by_k"][str(k)]["tau"] == alone[k]["tau"] and r["by_k"][str(k)]["lossless"]
        assert r["by_k"][str(k)]["spec_tokens_per_s"] > 0
    assert 1.0 < r["by_k"]["1"]["tau"] <= 2.0 and r["by_k"]["1"]["tau"] != r["tau"]
    assert r["num_steps"] == 4 and len(r["accept_rate_per_position"]) == 4


def test_eval_command_flags(trained, tiny_llama, tmp_path):
    _, export_dir, prompts = trained
    out = tmp_path / "r.json"
    res = run_cli("draft_trainer", "eval", "--target-model", str(tiny_llama), "--draft", str(export_dir),
                  "--prompts", str(prompts), "--num-steps", "3", "--max-new-tokens", "16", "--speed-rounds", "2",
                  "--untrained", "--no-prompt-lookup", "--also-k", "1", "--linears", "torch", "--output", str(out),
                  timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())
    assert "prompt_lookup" not in r and r["untrained"]["lossless"] and r["speed"]["rounds"] == 2
    assert r["linear_kernel"] == "torch"      # (the default, prepacked, runs in the other tests)
    assert list(r["by_k"]) == ["1", "3"] and "draft_k1" not in r
    bad = run_cli("draft_trainer", "eval", "--target-model", str(tiny_llama), "--draft", str(export_dir),
                  "--prompts", str(prompts), "--speed-rounds", "0", timeout=600)
    assert bad.returncode == 2 and "--speed-rounds" in bad.stderr


def test_row_wise_evaluations_share_the_greedy_reference_of_a_tree(trained, tiny_llama):
    """rowwise=True in fp32: a chain-only evaluation decodes its greedy reference with the attention a tree
    evaluation needs, so the two share it (the demo: step 0's draft, then the trained draft's trees)."""
    _, export_dir, prompts = trained
    cache: dict = {}
    with one_thread():
        chain = evaluate(tiny_llama, export_dir, prompts, num_steps=4, max_new_tokens=MAX_NEW, greedy_cache=cache,
                         prompt_lookup=False, rowwise=True)
        tree = evaluate(tiny_llama, export_dir, prompts, num_steps=4, max_new_tokens=MAX_NEW, greedy_cache=cache,
                        prompt_lookup=False, also_tree=[(2, 2)])
        plain = evaluate(tiny_llama, export_dir, prompts, num_steps=4, max_new_tokens=MAX_NEW, greedy_cache=cache,
                         prompt_lookup=False)
    assert chain["attention"] == tree["attention"] == "rowwise" and plain["attention"] == "transformers"
    assert chain["lossless"] and tree["lossless"] and plain["lossless"]
    # the tree's evaluation found the chain's references: the same greedy timings, one cache entry per prompt
    assert tree["greedy_tokens_per_s"] == chain["greedy_tokens_per_s"] != plain["greedy_tokens_per_s"]
    packed = "+prepacked" if prepack_available() else ""
    assert sorted({k[1] for k in cache}) == [f"fp32{packed}", f"fp32+rowwise{packed}"]
    assert chain["tau"] == tree["tau"]   # the same K=4 chain, verified with the same attention
    with pytest.raises(DataError, match="rowwise=False"):
        evaluate(tiny_llama, export_dir, prompts, num_steps=4, max_new_tokens=MAX_NEW, also_tree=[(2, 2)],
                 rowwise=False)


def test_evaluate_in_bf16_verifies_against_bf16_greedy(trained, tiny_llama):
    """--dtype bf16: the target (and draft) in the training features' dtype; the reference is bf16
    greedy decoding of the same target, kept apart from the fp32 reference in the shared cache.
    Lossless in bf16 too: this tiny random target is full of near-ties, and with transformers' own
    SDPA a K+1-token verification rounds differently from 1-token steps and flips some of them
    (rowwise_attention.py; the unit test shows the difference)."""
    _, export_dir, prompts = trained
    cache: dict = {}
    with one_thread():
        r32 = evaluate(tiny_llama, export_dir, prompts, num_steps=4, max_new_tokens=MAX_NEW, greedy_cache=cache)
        r16 = evaluate(tiny_llama, export_dir, prompts, num_steps=4, max_new_tokens=MAX_NEW, greedy_cache=cache,
                       dtype="bf16")
    assert r32["dtype"] == "fp32" and r16["dtype"] == "bf16"
    assert r16["linear_kernel"] == "torch"       # bf16 keeps torch's linears (row-invariant there)
    assert r32["lossless"] and r16["tau"] >= 1.0
    assert r16["lossless"] and not r16["mismatches"], r16["mismatches"]
    assert len({k[1] for k in cache if k[0] != "prompt_lookup"}) == 2   # one greedy reference per dtype
    with pytest.raises(DataError, match="eval dtype 'fp16'"):
        evaluate(tiny_llama, export_dir, prompts, num_steps=4, max_new_tokens=MAX_NEW, dtype="fp16")


@pytest.mark.skipif(not prepack_available(), reason="this torch build has no oneDNN (CPU wheels do)")
def test_prepacked_linears_are_evaluated_lossless_beside_torchs_own(trained, tiny_llama):
    """The default fp32 evaluation runs the target's linears prepacked for oneDNN (common/cpu_linear.py):
    it says so, stays lossless against greedy decoding on the same kernels, drafts what torch's linears
    draft (the same acceptance on this target), and keeps its greedy reference apart from torch's."""
    _, export_dir, prompts = trained
    cache: dict = {}
    with one_thread():
        packed = evaluate(tiny_llama, export_dir, prompts, num_steps=4, max_new_tokens=MAX_NEW, greedy_cache=cache)
        plain = evaluate(tiny_llama, export_dir, prompts, num_steps=4, max_new_tokens=MAX_NEW, greedy_cache=cache,
                         linears="torch")
    n_linears = _n_linears(tiny_llama)
    assert packed["linear_kernel"] == f"oneDNN prepacked ({n_linears} layers)" and plain["linear_kernel"] == "torch"
    assert packed["lossless"] and plain["lossless"], (packed["mismatches"], plain["mismatches"])
    assert packed["accepted_histogram"] == plain["accepted_histogram"]
    assert sorted({k[1] for k in cache if k[0] != "prompt_lookup"}) == ["fp32", "fp32+prepacked"]
    with pytest.raises(DataError, match="linears 'mkl'"):
        evaluate(tiny_llama, export_dir, prompts, num_steps=4, max_new_tokens=MAX_NEW, linears="mkl")


class _Recording:
    """Wraps a drafter: for every round, also the chain it would propose with no threshold."""

    def __init__(self, inner: Eagle3Drafter, k: int):
        self.inner, self.k = inner, k
        self.name, self.feature_layers = inner.name, inner.feature_layers
        self.rounds: list[tuple[list[int], list[int], float]] = []   # (proposed, full chain, p(first))

    def start(self, *a):
        self.inner.start(*a)

    def extend(self, *a):
        self.inner.extend(*a)

    def propose(self, k, min_confidence=0.0):
        d = self.inner.draft
        p_first = float(d.logits(self.inner.g_last).float().softmax(-1).max())
        full = self.inner.propose(k)
        self.inner.cache.truncate(self.inner.real_len)   # drop the look-ahead's speculative entries
        got = self.inner.propose(k, min_confidence)
        self.rounds.append((got, full, p_first))
        return got


def test_dynamic_chains_stop_where_the_drafts_confidence_falls(trained, tiny_llama):
    """A confidence-stopped chain is a prefix of the fixed-K chain, decided by the draft's top-1
    probabilities (below p(first) nothing is drafted); decoding stays lossless."""
    draft, export_dir, prompts = trained
    target = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    eos = eos_set(target, AutoTokenizer.from_pretrained(tiny_llama))
    lengths = {}
    with one_thread():
        for c in (1e-9, 0.3, 0.6, 0.999999):
            rec, n = _Recording(Eagle3Drafter(draft), 4), []
            for prompt in _prompts(tiny_llama):
                got, _ = speculative_decode(target, rec, prompt, 4, MAX_NEW, eos, min_confidence=c)
                assert got == greedy_decode(target, prompt, MAX_NEW, eos)[0]
            for proposed, full, p_first in rec.rounds:
                assert proposed == full[: len(proposed)]
                assert (len(proposed) == 0) == (p_first < c)
                n.append(len(proposed))
            lengths[c] = n
    assert set(lengths[1e-9]) == {4}                         # a threshold nothing falls below: always K
    assert set(lengths[0.999999]) == {0}                     # nothing is that sure: plain greedy steps
    assert len(set(lengths[0.3]) | set(lengths[0.6])) > 2    # in between, the length varies with the context
    mean = {c: sum(n) / len(n) for c, n in lengths.items()}
    assert mean[1e-9] > mean[0.3] >= mean[0.6] > mean[0.999999]
    with one_thread():
        r = evaluate(tiny_llama, export_dir, prompts, num_steps=4, max_new_tokens=MAX_NEW, prompt_lookup=False,
                     also_confidence=[0.5])
        with pytest.raises(DataError, match="--also-min-confidence"):
            evaluate(tiny_llama, export_dir, prompts, num_steps=4, max_new_tokens=MAX_NEW, also_confidence=[1.0])
    b = r["by_confidence"]["0.5"]
    assert b["lossless"] and 0 < b["proposed_per_round"] < 4 and 1.0 <= b["tau"] <= r["tau"]


def test_fast_drafter_path_drafts_what_the_model_path_drafts(trained, tiny_llama):
    """The drafter's fused fp32 path (the default) proposes, round by round, what the draft model's
    own inference methods propose: same acceptance on every prompt, as a chain and as a tree."""
    draft, _, _ = trained
    target = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32,
                                                  attn_implementation=rowwise_attention.register()).eval()
    eos = eos_set(target, AutoTokenizer.from_pretrained(tiny_llama))
    accepted = 0
    with one_thread():
        for prompt in _prompts(tiny_llama):
            for width in (1, 3):
                (a, st_a), (b, st_b) = [speculative_decode(target, Eagle3Drafter(draft, fast=fast), prompt, 4, MAX_NEW,
                                                           eos, width=width) for fast in (True, False)]
                assert a == b and st_a.accepted == st_b.accepted and st_a.proposed == st_b.proposed
                accepted += sum(st_a.accepted)
    assert accepted > 0


def test_bench_spec_loop_times_an_exported_draft(trained, tiny_llama, tmp_path):
    """benchmarks/bench_spec_loop.py on an export (its loader had gone stale unnoticed): bf16 trees,
    the fused and the model path side by side, every output checked against greedy."""
    from benchmarks.bench_spec_loop import main

    _, export_dir, prompts = trained
    with one_thread():
        rc = main(["--target-model", str(tiny_llama), "--draft", str(export_dir), "--prompts", str(prompts),
                   "--num-steps", "3", "--width", "2", "--dtype", "bf16", "--rounds", "1", "--max-new-tokens", "8",
                   "--name", "spec_loop_test", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "spec_loop_test.json").read_text())
    assert rc == 0 and data["lossless"] and data["config"]["width"] == 2 and data["config"]["dtype"] == "bf16"
    assert {"spec", "spec_model_path", "prompt_lookup"} <= set(data["tau"])
    # fp32: the prepacked target beside a copy with torch's linears (--linears both), all lossless
    with one_thread():
        rc = main(["--target-model", str(tiny_llama), "--draft", str(export_dir), "--prompts", str(prompts),
                   "--num-steps", "3", "--rounds", "1", "--max-new-tokens", "8", "--linears", "both",
                   "--name", "spec_loop_linears", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "spec_loop_linears.json").read_text())
    assert rc == 0 and data["lossless"]
    n_linears = _n_linears(tiny_llama)
    assert data["config"]["prepacked_layers"] == (n_linears if prepack_available() else 0)
    assert data["tau"]["spec_torch_linears"] == data["tau"]["spec"] > 1.0
    assert data["tau"]["greedy_torch_linears"] == 1.0 and data["tokens_per_s"]["greedy_torch_linears"][0] > 0
