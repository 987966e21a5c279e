"""Readers for chat data in the formats users already have, normalized to one message shape.

Inputs (chosen by extension, JSON sniffed by its first character):
  *.json          a JSON array of records (streamed with raw_decode: a file truncated mid-record
                  yields every complete record, and the loss is reported), or JSON Lines
  *.jsonl/ndjson  one record per line
  *.parquet       rows with a `messages` (or `conversations`) column
  *.arrow/.feather/.ipc  the same, Arrow IPC file or stream
Records: ShareGPT `{"conversations": [{"from", "value"}]}` or OpenAI `{"messages": [{"role",
"content", "tool_calls"?}], "tools"?}`. `normalize()` maps both to messages
`{"role": system|user|assistant|tool, "content": str, ...}`; anything it cannot map is a
`BadRecord` naming the file and line/record, so the caller can stop or skip-and-count.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import DataError

ROLE_ALIASES = {
    "system": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant",
    "bard": "assistant", "model": "assistant",
    "tool": "tool", "function": "tool", "observation": "tool", "ipython": "tool",
}
REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")
_JSON_CHUNK = 8 << 20  # characters read per step when streaming a JSON array


class BadRecord(DataError):
    """One record cannot be used; `where` names the file and line/record."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where, self.reason = where, reason


@dataclass
class Record:
    """One raw record as read from a file (`raw` is None when it could not be decoded)."""

    where: str            # "file:line N" / "file:record N" / "file:row N"
    raw: Any = None
    error: str | None = None


@dataclass
class FileReport:
    """What reading one file produced; `lost_records`/`lost_bytes` describe a truncated tail."""

    path: str
    format: str
    records: int = 0
    lost_records: int = 0
    lost_bytes: int = 0
    note: str = ""


@dataclass
class Conversation:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    source_id: str | None = None
    where: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- readers

def detect_format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if name.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            head = f.read(4096).lstrip()
        return "json_array" if head.startswith("[") else "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".arrow", ".feather", ".ipc")):
        return "arrow"
    raise DataError(f"{path}: unknown input format; use .json (array or lines), .jsonl, .parquet or .arrow")


def read_records(path: str | Path, report: FileReport | None = None) -> Iterator[Record]:
    """Yield every record of one input file; fills `report` (counts, truncated tail) as it goes."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"input {path} does not exist or is not a file")
    fmt = detect_format(path)
    report = report if report is not None else FileReport(str(path), fmt)
    report.format = fmt
    reader = {"json_array": _read_json_array, "jsonl": _read_jsonl, "parquet": _read_table,
              "arrow": _read_table}[fmt]
    try:
        for rec in reader(path, report):
            report.records += 1
            yield rec
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason}) after record {report.records}; "
                        "re-encode the file as UTF-8") from None


def _read_jsonl(path: Path, report: FileReport) -> Iterator[Record]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield Record(where, error=f"not UTF-8 text ({e.reason} at byte {e.start})")
                continue
            if not line.strip():
                continue
            if not line.endswith("\n") and _is_truncated_json(line):
                report.lost_records, report.lost_bytes = 1, len(raw)
                report.note = f"last line {lineno} is cut off mid-record (file truncated): {len(raw)} bytes lost"
                return
            try:
                yield Record(where, json.loads(line))
            except json.JSONDecodeError as e:
                yield Record(where, error=f"invalid JSON ({e.msg} at column {e.colno})")


def _ran_out(e: json.JSONDecodeError, text: str) -> bool:
    """True when decoding failed only because the text ended (the value continues past it)."""
    return e.msg.startswith("Unterminated string") or e.pos >= len(text.rstrip())


def _is_truncated_json(text: str) -> bool:
    """True when `text` is a prefix of some JSON value (it fails only because it ends early)."""
    try:
        json.loads(text)
        return False
    except json.JSONDecodeError as e:
        return _ran_out(e, text)


def _read_json_array(path: Path, report: FileReport) -> Iterator[Record]:
    """Stream the elements of a top-level JSON array without loading it whole.

    A record that fails to decode only because the file ends inside it is the truncated tail
    (reported, not an error); any other failure is a bad record at a named line, after which
    reading resumes at the next element that starts on its own line at the elements' indentation.
    """
    dec = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf = f.read(_JSON_CHUNK)
        eof = len(buf) < _JSON_CHUNK

        def refill(keep_from: int) -> None:
            nonlocal buf, eof
            want = max(_JSON_CHUNK, len(buf) - keep_from)  # doubles for records larger than a chunk
            more = f.read(want)
            eof = len(more) < want
            buf = buf[keep_from:] + more

        pos = len(buf) - len(buf.lstrip())
        if not buf.startswith("[", pos):
            raise DataError(f"{path}: expected a JSON array starting with '['")
        pos += 1
        line = 1 + buf.count("\n", 0, pos)
        index = 0
        while True:
            n = len(buf)
            while pos < n and buf[pos] in " \t\r\n,":
                line += buf[pos] == "\n"
                pos += 1
            if pos >= n:
                if eof:
                    report.note = "array not closed with ']' (file truncated between records; nothing lost)"
                    return
                refill(pos)
                pos = 0
                continue
            if buf[pos] == "]":
                return
            where = f"{path}:record {index} (line {line})"
            if index == 0:  # elements start on their own line at this indentation (resync points)
                indent = buf[buf.rfind("\n", 0, pos) + 1 : pos]
                next_element = re.compile(r",[ \t\r]*\n" + re.escape(indent) + r"\{") if not indent.strip() else None
            try:
                obj, end = dec.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                if _ran_out(e, buf):
                    if not eof:
                        refill(pos)
                        pos = 0
                        continue
                    tail = buf[pos:]
                    report.lost_records, report.lost_bytes = 1, len(tail.encode())
                    report.note = (f"file ends inside record {index} (line {line}): 1 incomplete record, "
                                   f"{report.lost_bytes} bytes not recoverable")
                    return
                yield Record(where, error=f"invalid JSON ({e.msg} at line {line + buf.count(chr(10), pos, e.pos)})")
                m = None
                while next_element is not None and (m := next_element.search(buf, e.pos)) is None and not eof:
                    refill(pos)
                    e.pos -= pos
                    pos = 0
                if m is None:
                    report.lost_bytes = len(buf[pos:].encode()) + sum(len(b.encode()) for b in iter(lambda: f.read(_JSON_CHUNK), ""))
                    report.note = (f"cannot find where the record after bad record {index} starts (elements not "
                                   f"one per line): {report.lost_bytes} bytes after line {line} not read")
                    return
                line += buf.count("\n", pos, m.end() - 1)
                pos = m.end() - 1
                index += 1
                continue
            yield Record(where, obj)
            line += buf.count("\n", pos, end)
            pos = end
            index += 1


def _read_table(path: Path, report: FileReport) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if report.format == "parquet":
        pf = pq.ParquetFile(path)
        batches = pf.iter_batches(batch_size=1024)
        names = pf.schema_arrow.names
    else:
        source = pa.memory_map(str(path), "r")
        try:
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pa.ipc.open_stream(source)
            batches = iter(reader)
        names = reader.schema.names
    col = next((c for c in ("messages", "conversations") if c in names), None)
    if col is None:
        raise DataError(f"{path}: no 'messages' or 'conversations' column (columns: {names})")
    keep = [c for c in (col, "tools", "id") if c in names]
    row = 0
    for batch in batches:
        for rec in batch.select(keep).to_pylist():
            where = f"{path}:row {row}"
            row += 1
            value = rec[col]
            if isinstance(value, str):  # a JSON-encoded column
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as e:
                    yield Record(where, error=f"column {col!r} holds invalid JSON ({e.msg})")
                    continue
            rec[col] = value
            if isinstance(rec.get("tools"), str):
                try:
                    rec["tools"] = json.loads(rec["tools"])
                except json.JSONDecodeError as e:
                    yield Record(where, error=f"column 'tools' holds invalid JSON ({e.msg})")
                    continue
            yield Record(where, rec)


# ----------------------------------------------------------------------------- normalization

def normalize(rec: Record) -> Conversation:
    """One raw record -> a Conversation with normalized messages (BadRecord if it cannot be)."""
    if rec.error is not None:
        raise BadRecord(rec.where, rec.error)
    raw = rec.raw
    if not isinstance(raw, dict):
        raise BadRecord(rec.where, f"expected a JSON object, got {type(raw).__name__}")
    turns = raw.get("messages", raw.get("conversations"))
    if turns is None:
        raise BadRecord(rec.where, f"no 'messages' or 'conversations' field (keys: {sorted(raw)[:8]})")
    if not isinstance(turns, list):
        raise BadRecord(rec.where, f"'messages'/'conversations' must be a list, got {type(turns).__name__}")
    messages = [_normalize_message(m, rec.where, i) for i, m in enumerate(turns)]
    tools = raw.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise BadRecord(rec.where, "'tools' must be a list of tool schemas")
    sid = raw.get("id")
    return Conversation(messages=messages, tools=tools or None, source_id=None if sid is None else str(sid),
                        where=rec.where)


def _text(value: Any, where: str, i: int) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # OpenAI content parts
        out = []
        for part in value:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                out.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise BadRecord(where, f"message {i}: content part of type {kind!r} is not supported (text only)")
        return "".join(out)
    raise BadRecord(where, f"message {i}: content must be a string, got {type(value).__name__}")


def _normalize_message(m: Any, where: str, i: int) -> dict[str, Any]:
    if not isinstance(m, dict):
        raise BadRecord(where, f"message {i} is not an object")
    role_raw = m.get("role", m.get("from"))
    if not isinstance(role_raw, str):
        raise BadRecord(where, f"message {i} has no 'role'/'from'")
    role = ROLE_ALIASES.get(role_raw.strip().lower())
    if role is None:
        raise BadRecord(where, f"message {i}: unknown role {role_raw!r} (known: {sorted(ROLE_ALIASES)})")
    out: dict[str, Any] = {"role": role,
                           "content": _text(m.get("content", m.get("value", m.get("text"))), where, i)}
    if role == "assistant":
        calls = m.get("tool_calls")
        if calls is None and m.get("function_call") is not None:  # legacy OpenAI single call
            calls = [{"type": "function", "function": m["function_call"]}]
        if calls:
            out["tool_calls"] = [_normalize_tool_call(c, where, i) for c in calls]
        for key in REASONING_FIELDS:
            r = m.get(key)
            if isinstance(r, str) and r.strip():
                out["reasoning_content"] = r
                break
    elif role == "tool":
        for key in ("tool_call_id", "name"):
            if isinstance(m.get(key), str):
                out[key] = m[key]
    return out


def _normalize_tool_call(c: Any, where: str, i: int) -> dict[str, Any]:
    fn = c.get("function", c) if isinstance(c, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise BadRecord(where, f"message {i}: tool call without a function name")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise BadRecord(where, f"message {i}: tool call {fn['name']!r} has arguments that are not JSON ({e.msg})") from None
    if not isinstance(args, dict):
        raise BadRecord(where, f"message {i}: tool call {fn['name']!r} arguments must be an object")
    call: dict[str, Any] = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
    if isinstance(c.get("id"), str):
        call["id"] = c["id"]
    return call
