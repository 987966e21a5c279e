"""`prepare-data --regenerate`: one command from human chats to a training set of the target's own
answers (tiny Llama on a real local HF server): the answers are the target's greedy output, the
held-out prompts come from the human split and are never answered for training, a second run
reuses the cached answers without starting a server, and asking for more conversations generates
only the new ones (a cached answer is reused only when its prompt is identical)."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from draft_trainer.assets.tiny import tiny_conversations
from tests.support.procs import run_cli

NEW = 5


def _lines(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").split("\n") if x.strip()]


def test_prepare_data_regenerate_is_on_policy_cached_and_keeps_heldout_apart(tiny_llama, tmp_path, monkeypatch):
    src = tmp_path / "chats.jsonl"
    src.write_text("".join(json.dumps(c) + "\n" for c in tiny_conversations(14, seed=3)))
    cache = tmp_path / "cache"
    args = ["draft_trainer", "prepare-data", "--model", str(tiny_llama), "--input", str(src), "--output",
            str(tmp_path / "out"), "--max-length", "256", "--draft-vocab-size", "64", "--holdout", "3", "--workers", "1",
            "--regenerate", "--regen-conversations", "6", "--regen-max-new-tokens", str(NEW), "--regen-dtype", "fp32"]
    monkeypatch.setenv("SPECRELAY_CACHE", str(cache))   # run_cli passes the environment on
    res = run_cli(*args, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "answers: 6 regenerated" in res.stdout
    onpolicy = tmp_path / "out" / "onpolicy"
    held = _lines(onpolicy / "heldout_prompts.jsonl")
    assert len(held) == 3
    [answers] = list(cache.glob("onpolicy/*/regenerated.jsonl"))
    convs = _lines(answers)
    assert len(convs) == 6 and len(_lines(onpolicy / "conversations.jsonl")) == 6
    held_users = {json.dumps(h["messages"][-1]["content"]) for h in held}
    assert not held_users & {json.dumps(c["messages"][0]["content"]) for c in convs}  # never answered for training

    # Each answer is the target's greedy continuation of the first user turn (at most NEW tokens).
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    for c in convs[:3]:
        user, answer = c["messages"][0], c["messages"][1]
        assert len(c["messages"]) == 2 and user["role"] == "user" and answer["role"] == "assistant"
        ids = tok.apply_chat_template([user], add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=NEW, do_sample=False)
        assert answer["content"] == tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    # Again: the answers are cached (not regenerated: the file is untouched, no server started).
    before = answers.stat().st_mtime_ns
    res = run_cli(*args, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert answers.stat().st_mtime_ns == before and "answers: all cached" in res.stdout

    # More conversations: the 6 cached answers seed the new set, only the rest is generated. One
    # cached prompt is altered first: its answer must not be reused (answered again instead).
    old_ds = answers.parent / "prompts_ds" / "conversations.jsonl"
    rows = _lines(old_ds)
    rows[0]["messages"][0]["content"] += " (changed)"
    old_ds.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    res = run_cli(*[("9" if a == "6" else a) for a in args], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    [bigger] = [p for p in cache.glob("onpolicy/*/regenerated.jsonl") if p != answers]
    n = len(_lines(bigger.parent / "prompts.jsonl"))  # the split has fewer than 9 answerable chats
    assert n > 6 and f"answers: {n - 6 + 1} regenerated" in res.stdout, res.stdout[-2000:]
    new = {c["id"]: c for c in _lines(bigger)}
    assert sorted(new) == list(range(n)) and len(_lines(onpolicy / "conversations.jsonl")) == n
    assert all(new[c["id"]] == c for c in convs[1:])          # reused as they were
    assert new[0]["messages"][0] == convs[0]["messages"][0]  # the real prompt, answered again
    for c in (new[0], new[n - 1]):
        user, answer = c["messages"]
        ids = tok.apply_chat_template([user], add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=NEW, do_sample=False)
        assert answer["content"] == tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_answers_within_a_budget_grow_only_as_far_as_the_measured_speed_allows(tiny_llama, tmp_path):
    """The demo's sizing (prepare_on_policy_within): a third of the answers first; with time to spare, all of
    them (only the new ones generated); later runs decide from the speed stored with the cached answers:
    the same budget takes all of them from the cache, a budget they would not fit in keeps the third."""
    from draft_trainer.data.prepare import PrepareConfig
    from draft_trainer.onpolicy import SPEED_FILE, OnPolicyConfig, prepare_on_policy_within

    src = tmp_path / "chats.jsonl"
    src.write_text("".join(json.dumps(c) + "\n" for c in tiny_conversations(40, seed=5)))

    def prep(name):
        return PrepareConfig(model=str(tiny_llama), inputs=[str(src)], output=str(tmp_path / name), max_length=256,
                             draft_vocab_size=64, holdout=2, workers=1)

    cfg = OnPolicyConfig(conversations=9, max_new_tokens=NEW, dtype="fp32", cache_dir=str(tmp_path / "cache"),
                         progress=False)
    roomy = prepare_on_policy_within(prep("a"), cfg, budget_s=3600)
    assert roomy.conversations == 9 and len(_lines(roomy.answers)) == 9
    assert roomy.report["written"] == 9      # 3, then the 6 new ones: none generated twice
    dirs = {len(_lines(p)): p.parent for p in (tmp_path / "cache").glob("*/regenerated.jsonl")}
    assert sorted(dirs) == [3, 9]
    speed = json.loads((dirs[3] / SPEED_FILE).read_text())
    assert speed["written"] == 3 and speed["wall_s"] > 0

    again = prepare_on_policy_within(prep("b"), cfg, budget_s=3600)
    assert again.conversations == 9 and again.report == {} and _lines(again.answers) == _lines(roomy.answers)

    # a budget a little under 6 answers' time at the stored speed: neither 6 nor 9 fit, the first third
    tight = prepare_on_policy_within(prep("c"), cfg, budget_s=0.9 * 6 * speed["wall_s"] / 3)
    assert tight.conversations == 3 and tight.report == {} and len(_lines(tight.answers)) == 3
    assert len(_lines(tmp_path / "c" / "onpolicy" / "conversations.jsonl")) == 3
