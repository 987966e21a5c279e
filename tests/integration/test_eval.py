"""`draft-trainer eval`: real speculative decoding on the tiny model is lossless, a trained draft
is accepted (tau > 1) and a random one is not (tau ~ 1)."""

import json

import pytest
from transformers import AutoTokenizer

from draft_trainer.eval import evaluate, load_prompts
from draft_trainer.export import export_sglang
from draft_trainer.methods.eagle3.model import Eagle3Draft
from tests.support.drafts import one_thread, save_checkpoint, train_tiny_draft
from tests.support.procs import run_cli

PROMPTS = ["What is the capital of France?", "Count to five.", "Write a short poem about the sea.",
           "Add two numbers in Python."]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    lines = [json.dumps({"prompt": q}) for q in PROMPTS[:3]]
    lines.append(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": PROMPTS[3]}]}))
    p.write_text("\n".join(lines) + "\n")
    return p


def export(model, vocab, tmp_path, name):
    ckpt = save_checkpoint(model, vocab, tmp_path / f"run-{name}")
    out = tmp_path / f"draft-{name}"
    res = run_cli("draft_trainer", "export", "--checkpoint", str(ckpt), "--output", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def run_eval(tiny_llama, draft_dir, prompts_file, tmp_path, k=4, n=32):
    out = tmp_path / f"eval-{draft_dir.name}.json"
    res = run_cli("draft_trainer", "eval", "--target-model", str(tiny_llama), "--draft", str(draft_dir),
                  "--prompts", str(prompts_file), "--num-steps", str(k), "--max-new-tokens", str(n),
                  "--output", str(out), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(out.read_text())


def test_trained_draft_is_accepted_random_is_not_and_both_lossless(tiny_llama, prompts_file, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    prompts = load_prompts(prompts_file, tok)
    with one_thread():
        trained, vocab = train_tiny_draft(tiny_llama, prompts, steps=50, max_new_tokens=32)
    random_draft = Eagle3Draft(trained.cfg)                       # same geometry and mapping, untrained
    random_draft.set_vocab_mapping(vocab.d2t, vocab.t2d)
    good = run_eval(tiny_llama, export(trained, vocab, tmp_path, "trained"), prompts_file, tmp_path)
    # The random draft in-process (same code path as the command, one subprocess less).
    rnd_dir = tmp_path / "draft-random"
    export_sglang(save_checkpoint(random_draft, vocab, tmp_path / "run-random"), rnd_dir)
    with one_thread():
        bad = evaluate(tiny_llama, rnd_dir, prompts_file, num_steps=4, max_new_tokens=32)
    print("tau trained", good["tau"], "random", bad["tau"])
    for r in (good, bad):
        assert r["lossless"] and not r["mismatches"] and r["prompts"] == 4
        assert all(p["identical"] for p in r["per_prompt"])
        assert len(r["accept_rate_per_position"]) == 4
        rates = r["accept_rate_per_position"]
        assert all(a >= b for a, b in zip(rates, rates[1:]))          # P(first i accepted) is non-increasing
        assert r["greedy_tokens_per_s"] > 0 and r["spec_tokens_per_s"] > 0
    assert good["tau"] > 1.5, good
    assert bad["tau"] < 1.3, bad
    assert good["target_forwards"] < bad["target_forwards"]
    assert good["cond_accept_rate_per_position"][0] == good["accept_rate_per_position"][0]


def test_eval_rejects_bad_prompts_file(tiny_llama, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": 3}\n')
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    with pytest.raises(Exception, match=r"bad.jsonl:2: expected"):
        load_prompts(bad, tok)
    res = run_cli("draft_trainer", "eval", "--target-model", str(tiny_llama), "--draft", str(tmp_path / "none"),
                  "--prompts", str(bad))
    assert res.returncode == 2 and "not an exported draft" in res.stderr


def test_a_draft_for_another_target_is_refused_unless_forced(tiny_llama, tmp_path):
    """A draft whose export names another target (same shapes) is refused, then evaluated with force."""
    from common.errors import ContractError

    draft_dir = tmp_path / "d"
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    with one_thread():
        model, vocab = train_tiny_draft(tiny_llama, [tok("hello")["input_ids"]], steps=1, max_new_tokens=4)
    export_sglang(save_checkpoint(model, vocab, tmp_path / "run"), draft_dir)
    prov = json.loads((draft_dir / "specrelay_export.json").read_text())
    prov["target_model"] = "some-other-model"
    (draft_dir / "specrelay_export.json").write_text(json.dumps(prov))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    with pytest.raises(ContractError, match="trained against target 'some-other-model'.*--force"):
        evaluate(tiny_llama, draft_dir, prompts, num_steps=2, max_new_tokens=4)
    assert evaluate(tiny_llama, draft_dir, prompts, num_steps=2, max_new_tokens=4, force=True)["lossless"]
