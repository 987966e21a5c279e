"""`draft-trainer regenerate` against real target-server processes (tiny Llama, HF backend):
answers come from the target, work spreads over two servers, output is valid prepare-data
input, and a run killed mid-way resumes to the same result."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.errors import ConfigError
from draft_trainer.data.chat import ChatEncoder
from draft_trainer.data.prepare import PrepareConfig, prepare_data
from draft_trainer.regenerate import RegenerateConfig, regenerate
from tests.support.procs import REPO, env_with_repo, start_server

NEW = 6  # max new tokens: short, so the tests stay fast on 2 shared cores


@pytest.fixture(scope="module")
def servers(tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("servers")
    procs = [start_server(d, "--model", str(tiny_llama), "--backend", "hf", "--dtype", "fp32", "--metrics-port", "-1",
                          name=f"s{k}") for k in range(2)]
    yield procs
    for p in procs:
        p.stop()


@pytest.fixture(scope="module")
def dataset(tiny_llama, tmp_path_factory):
    from draft_trainer.assets.tiny import tiny_conversations

    d = tmp_path_factory.mktemp("regen-data")
    src = d / "chats.jsonl"
    convs = tiny_conversations(16, seed=5)
    # one conversation with a tool call: that turn and its result are kept, the final answer regenerated
    convs.append({"messages": [{"role": "user", "content": "Add 2 and 3."},
                               {"role": "assistant", "content": "", "tool_calls": [
                                   {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
                               {"role": "tool", "content": "5"}, {"role": "assistant", "content": "It is 5."}]})
    src.write_text("".join(json.dumps(c) + "\n" for c in convs))
    prepare_data(PrepareConfig(model=str(tiny_llama), inputs=[str(src)], output=str(d / "ds")), progress=False)
    return d / "ds"


def _read(path):
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_regenerate_two_servers_answers_are_the_targets(servers, dataset, tiny_llama, tmp_path):
    out = tmp_path / "regen.jsonl"
    rep = regenerate(RegenerateConfig(targets=[s.endpoint for s in servers], input=str(dataset), output=str(out),
                                      max_new_tokens=NEW, concurrency=2, batch_size=3, progress=False))
    src = [json.loads(line) for line in (dataset / "conversations.jsonl").read_text().splitlines()]
    got = _read(out)
    assert sorted(got) == sorted(r["id"] for r in src) and rep["written"] == len(src) == 17
    assert rep["output"] == {"records": 17, "valid": 17, "bad": 0, "duplicate_ids": 0}
    assert all(s["prompts"] > 0 for s in rep["per_server"].values()) and len(rep["per_server"]) == 2
    n_turns = sum(1 for r in src for k, m in enumerate(r["messages"]) if m["role"] == "assistant" and not m.get("tool_calls"))
    assert rep["turns_regenerated"] == n_turns and sum(rep["finish_reasons"].values()) == n_turns

    # Independent check of the first conversation: greedy decoding with transformers itself.
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    enc = ChatEncoder(tok)
    first = src[0]
    prompt = enc.prompt_ids(first["messages"][:1])
    with torch.no_grad():
        gen = model.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False,
                             eos_token_id=enc.eot_token_ids, pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
    if gen and gen[-1] in enc.eot_token_ids:
        gen = gen[:-1]
    assert got[first["id"]]["messages"][1]["content"] == tok.decode(gen, skip_special_tokens=True)
    assert got[first["id"]]["messages"][0] == first["messages"][0]  # user turns untouched

    tool = next(r for r in got.values() if any(m.get("tool_calls") for m in r["messages"]))
    assert tool["messages"][1]["tool_calls"] and tool["messages"][2] == {"role": "tool", "content": "5"}
    assert tool["regenerated_turns"] == 1 and tool["messages"][3]["content"] != "It is 5."

    # The output is prepare-data input like any other.
    res = prepare_data(PrepareConfig(model=str(tiny_llama), inputs=[str(out)], output=str(tmp_path / "ds2")),
                       progress=False)
    assert res.stats.samples_in == 17 and res.stats.dropped["malformed"] == 0


def test_regenerate_resumes_after_a_crash(servers, dataset, tmp_path):
    out = tmp_path / "regen.jsonl"
    cmd = [sys.executable, "-m", "draft_trainer", "regenerate", "--targets", servers[0].endpoint, "--input",
           str(dataset), "--output", str(out), "--max-new-tokens", str(NEW), "--concurrency", "1", "--batch-size", "1"]
    proc = subprocess.Popen(cmd, env=env_with_repo(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and len(out.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"finished before it could be interrupted: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()
    done_before = _read(out) if out.read_text().endswith("\n") else None
    with open(out, "a") as f:
        f.write('{"id": 99, "messages": [{"role": "us')  # a record torn mid-write
    rep = regenerate(RegenerateConfig(targets=[servers[0].endpoint], input=str(dataset), output=str(out),
                                      max_new_tokens=NEW, concurrency=1, batch_size=4, progress=False))
    assert rep["already_done"] >= 3 and rep["already_done"] + rep["written"] == rep["samples"] == 17
    assert rep["output"] == {"records": 17, "valid": 17, "bad": 0, "duplicate_ids": 0}
    resumed = _read(out)
    if done_before:
        assert all(resumed[k] == v for k, v in done_before.items())  # finished lines were never rewritten

    # Greedy decoding is deterministic: the resumed file equals an uninterrupted run, id by id.
    straight = tmp_path / "straight.jsonl"
    regenerate(RegenerateConfig(targets=[servers[1].endpoint], input=str(dataset), output=str(straight),
                                max_new_tokens=NEW, batch_size=8, progress=False))
    assert {k: v["messages"] for k, v in resumed.items()} == {k: v["messages"] for k, v in _read(straight).items()}

    # A finished file resumes to nothing; different settings refuse to mix into it.
    again = regenerate(RegenerateConfig(targets=[servers[0].endpoint], input=str(dataset), output=str(out),
                                        max_new_tokens=NEW, progress=False))
    assert again["written"] == 0 and again["already_done"] == 17
    with pytest.raises(ConfigError, match="same settings"):
        regenerate(RegenerateConfig(targets=[servers[0].endpoint], input=str(dataset), output=str(out),
                                    max_new_tokens=NEW + 1, progress=False))
