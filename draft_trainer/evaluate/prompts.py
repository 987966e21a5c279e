"""Evaluation prompts: a JSONL file rendered with the target's chat template."""

from __future__ import annotations

import json
from pathlib import Path

from common.errors import DataError


def load_prompts(path: str | Path, tokenizer) -> list[list[int]]:
    """JSONL: {"messages": [{"role":..,"content":..}, ...]} or {"prompt": "..."} per line.

    Both are rendered with the tokenizer's chat template (a plain prompt as one user turn) and
    the generation prompt; without a chat template a plain prompt is tokenized as is.
    """
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").split("\n")  # not splitlines(): U+2028 may sit inside a string
    except OSError as e:
        raise DataError(f"cannot read prompts file {p}: {e}") from None
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise DataError(f"{p}:{i}: not valid JSON ({e})") from None
        if isinstance(rec, dict) and isinstance(rec.get("messages"), list):
            msgs = rec["messages"]
        elif isinstance(rec, dict) and isinstance(rec.get("prompt"), str):
            msgs = [{"role": "user", "content": rec["prompt"]}]
        else:
            raise DataError(f'{p}:{i}: expected {{"messages": [...]}} or {{"prompt": "..."}}')
        if tokenizer.chat_template:
            try:
                ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                    return_dict=False)
            except Exception as e:  # template errors are data errors here (bad roles etc.)
                raise DataError(f"{p}:{i}: chat template failed: {e}") from None
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
        elif "prompt" in rec:
            ids = tokenizer(rec["prompt"], add_special_tokens=True)["input_ids"]
        else:
            raise DataError(f"{p}:{i}: chat messages need a tokenizer with a chat template")
        ids = list(ids[0] if ids and isinstance(ids[0], list) else ids)
        if not ids:
            raise DataError(f"{p}:{i}: prompt renders to no tokens")
        out.append(ids)
    if not out:
        raise DataError(f"prompts file {p} has no prompts")
    return out
