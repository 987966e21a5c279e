"""Input readers: ShareGPT (array, truncated, corrupt), JSONL, OpenAI tool calls, Parquet/Arrow."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from draft_trainer.data import formats
from draft_trainer.data.formats import BadRecord, FileReport, normalize, read_records

SHAREGPT = [
    {"id": f"c{i}", "conversations": [{"from": "human", "value": f"question {i} ünïcödé ✓ {'x' * 40 * i}"},
                                      {"from": "gpt", "value": f"answer {i}\n" + "{\"json\": [1, 2]}"}]}
    for i in range(6)
]


def _read(path):
    rep = FileReport(str(path), "")
    recs = list(read_records(path, rep))
    return recs, rep


def test_sharegpt_array_complete(tmp_path):
    p = tmp_path / "sg.json"
    p.write_text(json.dumps(SHAREGPT, indent=2, ensure_ascii=False))
    recs, rep = _read(p)
    assert [r.raw for r in recs] == SHAREGPT
    assert rep.format == "json_array" and rep.records == 6 and rep.lost_records == 0


@pytest.mark.parametrize("chunk", [17, 64, 1 << 20])
def test_sharegpt_array_truncated_mid_record_recovers_the_rest(tmp_path, monkeypatch, chunk):
    # Small read chunks force records to straddle buffer refills.
    monkeypatch.setattr(formats, "_JSON_CHUNK", chunk)
    text = json.dumps(SHAREGPT, indent=2, ensure_ascii=False)
    cut = text.index('"question 5') + 5  # inside record 5's string
    p = tmp_path / "sg.json"
    p.write_text(text[:cut])
    recs, rep = _read(p)
    assert [r.raw for r in recs] == SHAREGPT[:5]
    assert rep.lost_records == 1 and rep.lost_bytes == len(text[:cut].encode()) - len(text[: text.index('{\n    "id": "c5"')].encode())
    assert "record 5" in rep.note


def test_sharegpt_array_cut_between_records_loses_nothing(tmp_path):
    text = json.dumps(SHAREGPT, indent=2)
    p = tmp_path / "sg.json"
    p.write_text(text[: text.index('{\n    "id": "c3"')])  # ends with "},\n  "
    recs, rep = _read(p)
    assert [r.raw for r in recs] == SHAREGPT[:3] and rep.lost_records == 0 and "not closed" in rep.note


def test_corrupt_record_mid_array_is_named_and_reading_resumes(tmp_path):
    text = json.dumps(SHAREGPT, indent=2)
    bad_at = text.index('"id": "c2"')
    text = text[:bad_at] + '"id": "c2" oops,' + text[bad_at + len('"id": "c2",'):]
    p = tmp_path / "sg.json"
    p.write_text(text)
    recs, _ = _read(p)
    errors = [r for r in recs if r.error]
    rec_line = text[: text.rfind("{", 0, bad_at)].count("\n") + 1
    assert len(errors) == 1 and errors[0].where.endswith(f"sg.json:record 2 (line {rec_line})")
    assert f"at line {text[:bad_at].count(chr(10)) + 1})" in errors[0].error  # the line of the fault itself
    assert [r.raw["id"] for r in recs if not r.error] == ["c0", "c1", "c3", "c4", "c5"]
    with pytest.raises(BadRecord, match=r"sg.json:record 2 .*invalid JSON"):
        normalize(errors[0])


def test_real_sharegpt_file_recovers_every_complete_record():
    from draft_trainer.assets.fetch import locate_sharegpt

    recs, rep = _read(locate_sharegpt())
    # The shipped file is cut inside its last record (docs: 17,671 complete conversations).
    assert rep.records == 17671 and rep.lost_records == 1 and rep.lost_bytes > 0
    assert all(r.error is None for r in recs)
    assert recs[0].raw["id"] == "QWJhYvA_0"


def test_jsonl_bad_line_and_truncated_last_line(tmp_path):
    p = tmp_path / "chat.jsonl"
    lines = [json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
             "{not json", "", json.dumps({"messages": []})]
    p.write_text("\n".join(lines) + "\n" + '{"messages": [{"role": "user", "con')
    recs, rep = _read(p)
    assert [r.where.rsplit(":", 1)[1] for r in recs] == ["line 1", "line 2", "line 4"]
    assert recs[1].error and "invalid JSON" in recs[1].error
    assert rep.lost_records == 1 and "line 5" in rep.note


def test_jsonl_bad_encoding_is_one_bad_line(tmp_path):
    p = tmp_path / "chat.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "ok"}]}).encode()
    p.write_bytes(good + b"\n" + b'{"messages": "\xff\xfe"}\n' + good + b"\n")
    recs, _ = _read(p)
    assert [r.error is None for r in recs] == [True, False, True] and "not UTF-8" in recs[1].error


def test_compact_array_with_a_bad_record_reports_what_was_not_read(tmp_path):
    p = tmp_path / "compact.json"
    text = json.dumps(SHAREGPT)  # one line: no safe place to resume after a fault
    p.write_text(text.replace('"id": "c2"', '"id": "c2" oops'))
    recs, rep = _read(p)
    assert [r.raw["id"] for r in recs if not r.error] == ["c0", "c1"] and recs[2].error
    assert rep.lost_bytes > 0 and "not read" in rep.note


def test_roles_and_content_normalization():
    raw = {"id": 7, "conversations": [
        {"from": "system", "value": "be nice"}, {"from": "human", "value": "hi"}, {"from": "chatgpt", "value": "a"},
        {"from": "user", "value": "q"}, {"from": "bing", "value": "b"}, {"from": "human", "value": "q2"},
        {"from": "bard", "value": "c"}, {"role": "user", "content": [{"type": "text", "text": "par"}, "ts"]},
        {"from": "gpt", "value": None}]}
    conv = normalize(formats.Record("f:line 1", raw))
    assert [m["role"] for m in conv.messages] == ["system", "user", "assistant", "user", "assistant", "user",
                                                  "assistant", "user", "assistant"]
    assert conv.messages[7]["content"] == "parts" and conv.messages[8]["content"] == "" and conv.source_id == "7"


@pytest.mark.parametrize("raw,match", [
    ({"conversations": [{"from": "narrator", "value": "x"}]}, r"message 0: unknown role 'narrator'"),
    ({"messages": [{"role": "user", "content": 5}]}, r"message 0: content must be a string"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, r"image_url"),
    ({"messages": "hello"}, r"must be a list"),
    ({"text": "hello"}, r"no 'messages' or 'conversations'"),
    ([1, 2], r"expected a JSON object"),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{bad"}}]}]}, r"arguments that are not JSON"),
])
def test_malformed_records_name_the_place(raw, match):
    with pytest.raises(BadRecord, match=match) as e:
        normalize(formats.Record("data.jsonl:line 12", raw))
    assert str(e.value).startswith("data.jsonl:line 12: ")


def test_openai_tool_calls_and_reasoning_fields():
    raw = {"tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}], "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "reasoning_content": "Need the tool.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "assistant", "function_call": {"name": "log", "arguments": {"x": 1}}, "content": "Done"}]}
    conv = normalize(formats.Record("f", raw))
    a = conv.messages[1]
    assert a["content"] == "" and a["reasoning_content"] == "Need the tool."
    assert a["tool_calls"] == [{"type": "function", "id": "call_1",
                                "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert conv.messages[2] == {"role": "tool", "content": "18C", "tool_call_id": "call_1"}
    assert conv.messages[3]["tool_calls"][0]["function"] == {"name": "log", "arguments": {"x": 1}}
    assert conv.tools == raw["tools"]


MSGS = [[{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}],
        [{"role": "system", "content": "s"}, {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]]


def test_parquet_messages_column(tmp_path):
    p = tmp_path / "chat.parquet"
    pq.write_table(pa.table({"messages": MSGS, "id": ["a", "b"]}), p)
    recs, rep = _read(p)
    assert rep.format == "parquet" and [normalize(r).messages for r in recs] == MSGS
    assert [r.where.rsplit(":", 1)[1] for r in recs] == ["row 0", "row 1"]


@pytest.mark.parametrize("kind", ["file", "stream"])
def test_arrow_ipc_with_json_string_column(tmp_path, kind):
    p = tmp_path / "chat.arrow"
    table = pa.table({"conversations": [json.dumps(m) for m in MSGS] + ["{broken"]})
    with pa.OSFile(str(p), "wb") as sink:
        w = pa.ipc.new_file(sink, table.schema) if kind == "file" else pa.ipc.new_stream(sink, table.schema)
        w.write_table(table)
        w.close()
    recs, _ = _read(p)
    assert [normalize(r).messages for r in recs[:2]] == MSGS
    assert recs[2].error and "row 2" in recs[2].where


def test_table_without_messages_column_is_a_clear_error(tmp_path):
    from common.errors import DataError

    p = tmp_path / "x.parquet"
    pq.write_table(pa.table({"text": ["a"]}), p)
    with pytest.raises(DataError, match=r"no 'messages' or 'conversations' column"):
        _read(p)
