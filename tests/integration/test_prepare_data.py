"""`draft-trainer prepare-data` end to end: mixed input formats, accounting, bad rows, the cache
key, atomic output, workers, and the draft vocabulary the trainer picks up."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.errors import DataError
from draft_trainer.data.dataset import TokenizedDataset
from draft_trainer.data.prepare import PrepareConfig, prepare_data
from draft_trainer.data.vocab import VocabMapping, count_supervised_tokens
from tests.support.procs import run_cli

SHAREGPT = [
    {"id": "ok-0", "conversations": [{"from": "human", "value": "What is the capital of France?"},
                                     {"from": "gpt", "value": "The capital of France is Paris."}]},
    {"id": "lead", "conversations": [{"from": "gpt", "value": "orphan answer"}, {"from": "human", "value": "Count to five."},
                                     {"from": "chatgpt", "value": "1 2 3 4 5"}]},
    {"id": "empty", "conversations": []},
    {"id": "order", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"},
                                      {"from": "gpt", "value": "c"}]},
    {"id": "noans", "conversations": [{"from": "human", "value": "only a question"}]},
    {"id": "long", "conversations": [{"from": "human", "value": "fox " * 400}, {"from": "gpt", "value": "ok"}]},
    {"id": "cut", "conversations": [{"from": "human", "value": "this record is cut off"}]},
]
OPENAI = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add two numbers in Python."},
                  {"role": "assistant", "content": "def add(a, b): return a + b"}]},
    {"messages": [{"role": "user", "content": "Weather?"},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Paris\"}"}}]},
                  {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                  {"role": "assistant", "content": "It is sunny."}]},
]
BAD_LINE = '{"messages": [{"role": "wizard", "content": "x"}]}'


@pytest.fixture
def inputs(tmp_path):
    text = json.dumps(SHAREGPT, indent=2)
    sg = tmp_path / "sharegpt.json"
    sg.write_text(text[: text.index('"this record is cut') + 10])  # truncated inside the last record
    oa = tmp_path / "openai.jsonl"
    oa.write_text("".join(json.dumps(r) + "\n" for r in OPENAI))
    pqf = tmp_path / "more.parquet"
    pq.write_table(pa.table({"messages": [[{"role": "user", "content": "Name a lazy animal."},
                                           {"role": "assistant", "content": "The lazy dog."}]]}), pqf)
    return [sg, oa, pqf]


def _cli(model, inputs, out, *extra):
    return run_cli("draft_trainer", "prepare-data", "--model", str(model), "--input", *map(str, inputs),
                   "--output", str(out), "--max-length", "256", "--workers", "1", *extra, timeout=300)


def test_prepare_data_cli_accounts_for_every_record(tiny_llama, inputs, tmp_path):
    out = tmp_path / "ds"
    res = _cli(tiny_llama, inputs, out)
    assert res.returncode == 0, res.stderr
    stats = json.loads((out / "stats.json").read_text())
    # 6 complete ShareGPT records (the 7th is cut off and reported lost) + 2 OpenAI + 1 Parquet.
    assert stats["samples_in"] == 9 and stats["kept"] == 5
    assert stats["dropped"] == {"malformed": 0, "empty": 1, "role_order": 1, "template_error": 0, "too_long": 1,
                                "no_supervised_tokens": 1, "heldout_overlap": 0}
    assert stats["files"][0]["lost_records"] == 1 and "record 6" in stats["files"][0]["note"]
    assert stats["events"]["leading_turns_trimmed"] == 1 and stats["events"]["tool_calls_inlined"] == 1
    assert "samples in 9: kept 5" in res.stdout and "1 incomplete record" in res.stdout

    ds = TokenizedDataset(out)
    assert len(ds) == 5 and ds.tokenizer_fingerprint == json.loads((out / "meta.json").read_text())["tokenizer_fingerprint"]
    # sample ids are ordinals over all input records: 0 and 1 (ShareGPT), 6 and 7 (OpenAI), 8 (Parquet)
    assert ds.sample_ids.tolist() == [0, 1, 6, 7, 8]
    assert sum(int(ds[i][2].sum()) for i in range(len(ds))) == stats["supervised_tokens"]
    assert stats["tokens"] == int(ds.lengths.sum())
    convs = [json.loads(line) for line in (out / "conversations.jsonl").read_text().splitlines()]
    assert [c["id"] for c in convs] == ds.sample_ids.tolist() and convs[1]["messages"][0]["content"] == "Count to five."

    vocab = VocabMapping.load(out / "vocab.json")
    counts = count_supervised_tokens([ds[i][1] for i in range(len(ds))], [ds[i][2] for i in range(len(ds))],
                                     vocab.vocab_size)
    assert np.array_equal(np.load(out / "token_counts.npy"), counts)
    assert vocab.coverage == pytest.approx(1.0) and stats["vocab"]["distinct_supervised"] == int((counts > 0).sum())


def test_parquet_row_becomes_a_sample(tiny_llama, inputs, tmp_path):
    out = tmp_path / "ds"
    prepare_data(PrepareConfig(model=str(tiny_llama), inputs=[str(inputs[2])], output=str(out)), progress=False)
    ds = TokenizedDataset(out)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    _, ids, mask = ds[0]
    assert tok.decode(ids[mask.astype(bool)]) == "The lazy dog.<|im_end|>"


def test_bad_row_is_an_error_naming_the_line_and_leaves_nothing(tiny_llama, inputs, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(OPENAI[0]) + "\n" + BAD_LINE + "\n")
    out = tmp_path / "ds"
    res = _cli(tiny_llama, [inputs[0], bad], out)
    assert res.returncode == 2
    assert f"{bad}:line 2: message 0: unknown role 'wizard'" in res.stderr and "--skip-bad" in res.stderr
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".ds")] == []

    prepare_data(PrepareConfig(model=str(tiny_llama), inputs=[str(inputs[0]), str(bad)], output=str(out),
                               max_length=256, skip_bad=True), progress=False)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["dropped"]["malformed"] == 1 and stats["samples_in"] == 8
    assert stats["examples"]["malformed"] == [f"{bad}:line 2: message 0: unknown role 'wizard' (known: "
                                              + str(sorted(__import__("draft_trainer.data.formats", fromlist=["x"]).ROLE_ALIASES)) + ")"]


def test_cache_key_reuses_only_identical_builds(tiny_llama, inputs, tmp_path):
    out = tmp_path / "ds"
    cfg = dict(model=str(tiny_llama), inputs=[str(p) for p in inputs], output=str(out), max_length=256)
    first = prepare_data(PrepareConfig(**cfg), progress=False)
    inode = os.stat(out / "samples.arrow").st_ino
    again = prepare_data(PrepareConfig(**cfg), progress=False)
    assert again.reused and again.cache_key == first.cache_key and os.stat(out / "samples.arrow").st_ino == inode

    for change in ({"max_length": 128}, {"last_turn_only": True}, {"min_supervised_tokens": 2},
                   {"system_prompt": "hi"}, {"drop_reasoning": True}):
        r = prepare_data(PrepareConfig(**{**cfg, **change}), progress=False)
        assert not r.reused and r.cache_key != first.cache_key, change
        assert json.loads((out / "meta.json").read_text())["cache_key"] == r.cache_key

    inputs[1].write_text(inputs[1].read_text().replace("It is sunny.", "It is sunny!"))  # same size, new content
    r = prepare_data(PrepareConfig(**cfg), progress=False)
    assert not r.reused and r.cache_key != first.cache_key

    # Only the draft vocabulary size changed: samples are reused, vocab.json is rebuilt.
    inode = os.stat(out / "samples.arrow").st_ino
    r2 = prepare_data(PrepareConfig(**cfg, draft_vocab_size=16), progress=False)
    assert r2.reused and os.stat(out / "samples.arrow").st_ino == inode
    assert VocabMapping.load(out / "vocab.json").draft_vocab_size == 16
    assert json.loads((out / "stats.json").read_text())["vocab"]["draft_vocab_size"] == 16


def test_workers_give_identical_output(tiny_llama, tmp_path):
    from draft_trainer.assets.tiny import tiny_conversations

    src = tmp_path / "chats.jsonl"
    src.write_text("".join(json.dumps(c) + "\n" for c in tiny_conversations(300, seed=3)))
    outs = []
    for w in (1, 2):
        out = tmp_path / f"w{w}"
        prepare_data(PrepareConfig(model=str(tiny_llama), inputs=[str(src)], output=str(out), workers=w), progress=False)
        outs.append(out)
    a, b = TokenizedDataset(outs[0]), TokenizedDataset(outs[1])
    assert len(a) == len(b) == 300
    for i in range(len(a)):
        assert a[i][0] == b[i][0] and np.array_equal(a[i][1], b[i][1]) and np.array_equal(a[i][2], b[i][2])
    assert (outs[0] / "vocab.json").read_text() == (outs[1] / "vocab.json").read_text()


def test_refuses_to_replace_a_directory_that_is_not_a_dataset(tiny_llama, inputs, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a tokenized dataset"):
        prepare_data(PrepareConfig(model=str(tiny_llama), inputs=[str(p) for p in inputs], output=str(out)),
                     progress=False)
    assert (out / "notes.txt").read_text() == "keep me"


def test_tiny_dataset_fixture_is_built_by_the_pipeline(tiny_dataset):
    assert (tiny_dataset / "vocab.json").is_file() and (tiny_dataset / "stats.json").is_file()
    stats = json.loads((tiny_dataset / "stats.json").read_text())
    assert stats["kept"] == stats["samples_in"] == 48


def test_holdout_prompts_are_never_trained_on(tiny_llama, tmp_path):
    # Records 0/1 are parts of one ShareGPT chat; record 4 repeats record 2's first user turn.
    chats = [
        {"id": "a_0", "conversations": [{"from": "human", "value": "Tell me about owls."}, {"from": "gpt", "value": "Owls hunt at night."}]},
        {"id": "a_1", "conversations": [{"from": "human", "value": "And their eyes?"}, {"from": "gpt", "value": "They are large."}]},
        {"id": "b", "conversations": [{"from": "human", "value": "Name a prime."}, {"from": "gpt", "value": "Seven."}]},
        {"id": "c", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi!"}]},
        {"id": "d", "conversations": [{"from": "human", "value": "Name a prime."}, {"from": "gpt", "value": "Two."}]},
        {"id": "e", "conversations": [{"from": "human", "value": "Count to three."}, {"from": "gpt", "value": "1 2 3"}]},
    ]
    src = tmp_path / "sg.json"
    src.write_text(json.dumps(chats))
    held_first = [{"id": "x", "conversations": [{"from": "gpt", "value": "orphan"}]}]  # not usable as a prompt
    src2 = tmp_path / "lead.json"
    src2.write_text(json.dumps(held_first))
    out = tmp_path / "ds"
    res = _cli(tiny_llama, [src2, src], out, "--holdout", "2", "--max-samples", "3")
    assert res.returncode == 0, res.stderr
    stats = json.loads((out / "stats.json").read_text())
    prompts = [json.loads(x) for x in (out / "heldout_prompts.jsonl").read_text().splitlines()]
    # The orphan answer is passed over (it goes to training and is dropped there); a_0 and a_1 are the
    # first two usable conversations.
    assert [p["messages"][-1]["content"] for p in prompts] == ["Tell me about owls.", "And their eyes?"]
    assert all(p["messages"][-1]["role"] == "user" for p in prompts)
    # Training reads 3 records after the held-out ones: the orphan (passed over), b, c.
    ds = TokenizedDataset(out)
    assert ds.sample_ids.tolist() == [3, 4]
    assert stats["heldout"] == 2 and stats["samples_in"] == 5
    assert stats["samples_in"] == stats["kept"] + stats["heldout"] + sum(stats["dropped"].values())
    # Holding out only a_0: a_1, another part of the same chat, must not be trained on.
    res = _cli(tiny_llama, [src2, src], tmp_path / "one", "--holdout", "1")
    assert res.returncode == 0, res.stderr
    stats = json.loads((tmp_path / "one" / "stats.json").read_text())
    assert stats["dropped"]["heldout_overlap"] == 1 and TokenizedDataset(tmp_path / "one").sample_ids.tolist() == [3, 4, 5, 6]
    # Holding out a_0, a_1, b: d asks b's question, so it is dropped too.
    res = _cli(tiny_llama, [src2, src], tmp_path / "three", "--holdout", "3")
    assert res.returncode == 0, res.stderr
    stats = json.loads((tmp_path / "three" / "stats.json").read_text())
    assert stats["dropped"]["heldout_overlap"] == 1 and TokenizedDataset(tmp_path / "three").sample_ids.tolist() == [4, 6]
    res = _cli(tiny_llama, [src], tmp_path / "toomany", "--holdout", "50")
    assert res.returncode != 0 and "only 6 usable conversations" in res.stderr
