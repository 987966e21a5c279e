"""The held-out split of prepare-data: conversations kept for evaluation and never trained on.

The first `--holdout` usable conversations are held out (their first user turn becomes an
evaluation prompt); a training record overlaps them when it is another part of the same ShareGPT
conversation (`<id>_<part>`) or starts with the same first user turn, and is dropped as
`heldout_overlap`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from common.errors import DataError
from draft_trainer.data.chat import ChatEncoder, Drop
from draft_trainer.data.formats import BadRecord, Conversation, Record, normalize


def _conversation_key(source_id: str | None) -> str | None:
    """ShareGPT splits long chats into records `<id>_<part>`: the parts of one chat share a key."""
    return re.sub(r"_\d+$", "", source_id) if source_id else None


def _first_user_text(messages: list[dict[str, Any]]) -> str | None:
    return next((m["content"].strip() for m in messages if m["role"] == "user"), None)


@dataclass
class HeldOut:
    """Held-out conversations and what makes a training record overlap them."""

    conversations: list[dict[str, Any]] = field(default_factory=list)
    prompts: list[dict[str, Any]] = field(default_factory=list)
    keys: set[str] = field(default_factory=set)
    first_turns: set[str] = field(default_factory=set)

    def overlap(self, conv: Conversation) -> str:
        """Why a training conversation overlaps the held-out set ("" when it does not)."""
        key = _conversation_key(conv.source_id)
        if key is not None and key in self.keys:
            return f"part of held-out conversation {key}"
        first = _first_user_text(conv.messages)
        if first and first in self.first_turns:
            return "same first user turn as a held-out conversation"
        return ""


def take_heldout(records: Iterator[tuple[int, Record]], n: int, encoder: ChatEncoder,
                  max_length: int) -> tuple[HeldOut, list[tuple[int, Record]]]:
    """The first `n` usable conversations (a non-empty user turn the assistant answers, whose prompt
    fits in max_length), and the records passed over on the way (they go to training, in order)."""
    held, passed = HeldOut(), []
    for sid, rec in records:
        try:
            conv = normalize(rec)
            msgs, _ = encoder.prepare(conv)
            head = 1 if msgs[0]["role"] == "system" else 0
            prompt = msgs[: head + 1]
            usable = bool(prompt[-1]["content"].strip()) and len(encoder.prompt_ids(prompt)) < max_length
        except (BadRecord, Drop):
            usable = False
        except Exception:  # noqa: BLE001 - a template error: not a usable prompt; training reports it
            usable = False
        if not usable:
            passed.append((sid, rec))
            continue
        held.conversations.append({"id": sid, "source_id": conv.source_id, "where": rec.where, "messages": msgs})
        held.prompts.append({"id": sid, "messages": prompt})
        if (key := _conversation_key(conv.source_id)) is not None:
            held.keys.add(key)
        held.first_turns.add(_first_user_text(msgs))
        if len(held.prompts) == n:
            return held, passed
    raise DataError(f"--holdout {n}: the input has only {len(held.prompts)} usable conversations to hold out; "
                    "lower --holdout or add data")
