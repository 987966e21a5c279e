"""HFDecoder's slot KV cache on real tiny models: rows joining (prefilled in length groups) and
leaving (a later slot moving into the hole) at random between decode steps, with the cache starting
too small in both rows and columns so that it grows mid-run, give every sequence exactly the
tokens of transformers' own `generate` on that prompt alone, and logits that match a full forward
pass of the sequence -- also when every allocation starts out as NaN (storage is uninitialised and
only the attended columns are zeroed); and a growth never holds the old and the new cache at once."""

from __future__ import annotations

import random
import threading
import weakref

import pytest
import torch
from transformers import AutoModelForCausalLM

from target_server.backends.hf_decode import HFDecoder, prefill_groups, supports


def reference(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module", params=[("llama", "sdpa"), ("llama", "eager"), ("qwen3", "sdpa")],
                ids=lambda p: "-".join(p))
def model(request, tiny_llama, tiny_qwen3):
    family, attn = request.param
    path = tiny_llama if family == "llama" else tiny_qwen3
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn).eval()


class NaNStorageDecoder(HFDecoder):
    """Storage that starts as NaN, the worst uninitialised memory can hold: a masked column that was
    never zeroed turns an attention output into NaN (weight 0 x NaN)."""

    def _alloc(self, shape, dtype):
        return torch.full(shape, float("nan"), dtype=dtype)


class MeteredDecoder(HFDecoder):
    """Records, at each allocation, the bytes of this decoder's storage still alive plus the new tensor."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.alive: list[tuple[weakref.ref, int]] = []
        self.peaks: list[int] = []  # live storage bytes right after each allocation

    def _alloc(self, shape, dtype):
        t = super()._alloc(shape, dtype)
        self.alive = [(r, n) for r, n in self.alive if r() is not None] + [(weakref.ref(t), t.nbytes)]
        self.peaks.append(sum(n for _, n in self.alive))
        return t


@pytest.mark.parametrize("decoder", [HFDecoder, NaNStorageDecoder])
def test_rows_join_and_leave_at_random_and_match_generate(model, decoder):
    rng = random.Random(7)
    vocab = model.config.vocab_size
    todo = [([rng.randrange(3, vocab) for _ in range(rng.randint(1, 40))], rng.randint(1, 12)) for _ in range(14)]
    dec = decoder(model, torch.device("cpu"), threading.Lock(), rows=2, cols=8)
    running: list[dict] = []  # row b of the decoder = running[b]
    done: list[dict] = []
    moved_into_a_hole = False
    with torch.no_grad():
        while todo or running:
            if todo and (not running or rng.random() < 0.4):
                joining = [{"prompt": p, "n": n, "out": []} for p, n in todo[: rng.randint(1, 3)]]
                del todo[: len(joining)]
                logits_nV = dec.prefill([s["prompt"] for s in joining])
                for s, row in zip(joining, logits_nV):
                    s["out"].append(int(row.argmax()))
                running += joining
            else:
                logits_BV = dec.step([s["out"][-1] for s in running])
                for s, row in zip(running, logits_BV):
                    s["out"].append(int(row.argmax()))
                    s["last_logits"] = row
            keep = [b for b, s in enumerate(running) if len(s["out"]) < s["n"]]
            if len(keep) < len(running):
                moved_into_a_hole |= any(dec.slots[b] >= len(keep) for b in keep)  # a slot past the new end stays
                done += [s for b, s in enumerate(running) if b not in keep]
                running = [running[b] for b in keep]
                dec.keep(keep)
            assert dec.rows == len(running)
    assert dec.rows == 0 and dec.capacity == (0, 0)  # the batch emptied: storage released
    assert moved_into_a_hole and dec.grown >= 2  # the scenario exercised moves and growth (rows and columns)
    for s in done:
        assert s["out"] == reference(model, s["prompt"], s["n"]), s["prompt"]
        if "last_logits" in s:  # the last decode step's logits vs the whole sequence in one forward pass
            full = model(torch.tensor([s["prompt"] + s["out"][:-1]])).logits[0, -1]
            torch.testing.assert_close(s["last_logits"], full, atol=2e-4, rtol=1e-4)


def test_a_growth_holds_the_new_cache_and_one_old_layer_at_most(model):
    dec = MeteredDecoder(model, torch.device("cpu"), threading.Lock(), rows=2, cols=8)
    tokens = [int(r.argmax()) for r in dec.prefill([[5, 6, 7], [8, 9]])]
    with torch.no_grad():
        for _ in range(140):  # columns grow (64 at a time)
            tokens = [int(r.argmax()) for r in dec.step(tokens)]
        tokens += [int(r.argmax()) for r in dec.prefill([[3 + i] * (5 + 3 * i) for i in range(8)])]  # rows grow
        dec.step(tokens)
    assert dec.grown >= 3
    per_column = sum(t.shape[1] * t.shape[3] * t.element_size() for t in (*dec.keys, *dec.values))
    longest = int(dec.len_R[: dec.rows].max())
    # kv_bytes: every slot's columns up to the longest row's at least, at most the capacity
    assert dec.rows * longest * per_column <= dec.kv_bytes <= dec.capacity[0] * dec.capacity[1] * per_column
    one = dec.keys[0].nbytes
    cache = one * (len(dec.keys) + len(dec.values))
    # The old and the new cache side by side would be about 1.8x the new one at +25% per growth.
    assert max(dec.peaks) <= cache + one, (max(dec.peaks), cache, one)
    dec.keep([])
    assert dec.kv_bytes == 0


def test_a_long_row_leaving_does_not_leave_its_columns_to_the_rows_that_follow(model):
    dec = HFDecoder(model, torch.device("cpu"), threading.Lock(), rows=2, cols=8)
    long, short = [4 + i % 50 for i in range(150)], [5, 6, 7]
    with torch.no_grad():
        tokens = [int(r.argmax()) for r in dec.prefill([long, short])]
        tokens = [int(r.argmax()) for r in dec.step(tokens)]
        assert dec.capacity[1] >= 152
        dec.keep([1])  # the long row leaves; the short one (5 tokens cached) stays
        joining = [[9, 10 + i] for i in range(8)]
        firsts = [int(r.argmax()) for r in dec.prefill(joining)]  # 9 rows: the rows grow
        assert dec.capacity[0] >= 9
        # The columns are cut to what the rows use (a quarter spare, 64 at a time), not kept at the long row's.
        assert dec.capacity[1] == 64, dec.capacity
        logits_BV = dec.step([tokens[1]] + firsts)
    assert [tokens[1], int(logits_BV[0].argmax())] == reference(model, short, 3)[1:]
    for i, p in enumerate(joining):
        assert [firsts[i], int(logits_BV[1 + i].argmax())] == reference(model, p, 2)


def test_storage_is_reused_after_the_batch_empties(model):
    dec = HFDecoder(model, torch.device("cpu"), threading.Lock())
    with torch.no_grad():
        for prompt in ([5, 6, 7], [9] * 20):
            first = int(dec.prefill([prompt])[0].argmax())
            second = int(dec.step([first])[0].argmax())
            dec.keep([])
            assert [first, second] == reference(model, prompt, 2)


def test_step_refuses_a_token_count_that_is_not_the_row_count(model):
    dec = HFDecoder(model, torch.device("cpu"), threading.Lock())
    dec.prefill([[1, 2, 3], [4, 5]])
    with pytest.raises(ValueError, match="3 tokens for 2 rows"):
        dec.step([1, 2, 3])


def test_prefill_groups_bound_padding_and_cover_every_prompt_once():
    lengths = [400, 12, 380, 13, 700, 390, 11, 1, 695]
    groups = prefill_groups(lengths, max_pad=1.25, max_tokens=2048)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        padded, real = max(lengths[i] for i in g) * len(g), sum(lengths[i] for i in g)
        assert len(g) == 1 or (padded <= 1.25 * real and padded <= 2048)
    assert [sorted(lengths[i] for i in g) for g in groups] == [[1], [11, 12, 13], [380, 390, 400], [695, 700]]
    assert prefill_groups([5000], max_tokens=2048) == [[0]]  # a single prompt is always a group


def test_supports_names_what_it_can_batch(tiny_llama):
    m = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, attn_implementation="sdpa")
    assert supports(m)
    m.config.layer_types = ["sliding_attention"] * m.config.num_hidden_layers
    assert not supports(m)
    with pytest.raises(ValueError, match="full attention in every layer"):
        HFDecoder(m, torch.device("cpu"), threading.Lock())
