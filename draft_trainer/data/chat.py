"""Render a conversation with the tokenizer's own chat template and mark what the loss falls on.

The supervised part of assistant turn i is, by definition, what the model itself would generate:
  render(messages[:i+1])  minus  render(messages[:i], add_generation_prompt=True),
cut after the end-of-turn marker (e.g. `<|im_end|>`, found once by probing the template), so the
header and any trailing newline stay unsupervised and tool calls / `<think>` blocks the template
renders inside the turn are supervised. Templates that re-render history differently (e.g. drop
old reasoning) are handled by locating the turn's text in the full rendering. Character spans
become token masks through the fast tokenizer's offsets (`char_to_token`), exact by construction.

Every conversation either encodes or raises `Drop(reason)`; reasons are `DROP_REASONS`.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.errors import DataError
from draft_trainer.data.formats import Conversation

DROP_REASONS = ("malformed", "empty", "role_order", "template_error", "too_long", "no_supervised_tokens")
_THINK = re.compile(r"^\s*<think>(.*?)</think>\s*", re.DOTALL)
_PROBE_USER, _PROBE_ANSWER = "Ping?", "Pong7Xq"


class Drop(Exception):
    """This conversation cannot be a training sample; `reason` is one of DROP_REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class ChatOptions:
    max_length: int = 2048
    last_turn_only: bool = False
    min_supervised_tokens: int = 1
    system_prompt: str | None = None
    drop_reasoning: bool = False


@dataclass
class Encoded:
    input_ids: np.ndarray          # int32 [T], T <= max_length
    loss_mask: np.ndarray          # uint8 [T]
    full_length: int               # tokens before truncation
    messages: list[dict[str, Any]]  # what was rendered, before for_template (tool calls structured)
    events: Counter = field(default_factory=Counter)

    @property
    def truncated(self) -> bool:
        return self.full_length > len(self.input_ids)


def split_reasoning(content: str) -> tuple[str | None, str]:
    """A leading `<think>...</think>` block -> (reasoning, answer); (None, content) without one."""
    m = _THINK.match(content)
    if m is None:
        return None, content
    return m.group(1).strip("\n"), content[m.end():]


def _common_prefix_len(a: str, b: str) -> int:
    if b.startswith(a):
        return len(a)
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:  # binary search over slice equality: C-speed comparisons
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class ChatEncoder:
    """Conversation -> (input_ids, loss_mask) for one tokenizer + template + options."""

    def __init__(self, tokenizer: Any, options: ChatOptions = ChatOptions()) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise DataError("prepare-data needs a fast tokenizer (a tokenizer.json) for exact character offsets; "
                            "convert the tokenizer with transformers' AutoTokenizer and save it")
        template = tokenizer.chat_template
        if isinstance(template, dict):
            template = template.get("default") or next(iter(template.values()))
        if not template:
            raise DataError("the tokenizer has no chat template; add the model's template to tokenizer_config.json "
                            "(chat_template) so training data is rendered exactly as served")
        self.tokenizer = tokenizer
        self.template: str = template
        self.options = options
        self._backend = tokenizer.backend_tokenizer
        self.supports_tool_calls = "tool_calls" in template
        self.supports_tools_schema = "tools" in template
        self.supports_reasoning = "reasoning_content" in template
        self.eot, self.eot_token_ids = self._probe_end_of_turn()
        self.generation_prompt = self._probe_generation_prompt()

    # ------------------------------------------------------------------ template
    def render(self, messages: list[dict[str, Any]], *, generation_prompt: bool = False,
               tools: list[dict[str, Any]] | None = None) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tools=tools if self.supports_tools_schema else None, tokenize=False,
            add_generation_prompt=generation_prompt, chat_template=self.template)

    def _turn_text(self, messages: list[dict[str, Any]], i: int, tools) -> tuple[int, str]:
        """(start, text) of assistant turn i as rendered when it is the last message."""
        prompt = self.render(messages[:i], generation_prompt=True, tools=tools)
        upto = self.render(messages[: i + 1], tools=tools)
        start = _common_prefix_len(prompt, upto)
        return start, upto[start:]

    def _cut_after_eot(self, text: str) -> int:
        if self.eot:
            k = text.rfind(self.eot)
            if k >= 0:
                return k + len(self.eot)
        return len(text.rstrip())

    def _probe_end_of_turn(self) -> tuple[str, list[int]]:
        """The marker the template closes an assistant turn with, and its special token ids."""
        msgs = [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_ANSWER}]
        try:
            _, turn = self._turn_text(msgs, 1, None)
        except Exception as e:  # noqa: BLE001 - any template failure here means we cannot use it
            raise DataError(f"the chat template cannot render a user/assistant exchange: {e}") from None
        k = turn.find(_PROBE_ANSWER)
        if k < 0:
            raise DataError("the chat template does not render assistant content verbatim; cannot build loss masks")
        suffix = turn[k + len(_PROBE_ANSWER):]
        specials = {t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special}
        specials |= set(self.tokenizer.all_special_tokens)
        best = None
        for s in specials:
            j = suffix.find(s)
            if j >= 0 and (best is None or (j, -len(s)) < (best[0], -len(best[1]))):
                best = (j, s)
        if best is None:
            eot = suffix.rstrip()
            ids: list[int] = []
        else:
            eot = suffix[: best[0] + len(best[1])]
            ids = [self.tokenizer.convert_tokens_to_ids(best[1])]
        eos = self.tokenizer.eos_token_id
        if eos is not None and eos not in ids:
            ids.append(int(eos))
        return eot, ids

    def _probe_generation_prompt(self) -> str | None:
        """The header add_generation_prompt appends (None if it is not a plain suffix)."""
        msgs = [{"role": "user", "content": _PROBE_USER}]
        try:
            with_header = self.render(msgs, generation_prompt=True)
            without = self.render(msgs)
        except Exception:  # noqa: BLE001 - no fast path then; the exact path reports errors
            return None
        if not with_header.startswith(without) or len(with_header) == len(without):
            return None
        return with_header[len(without):]

    # ------------------------------------------------------------------ messages
    def prepare(self, conv: Conversation) -> tuple[list[dict[str, Any]], Counter]:
        """Apply the options and check the turn structure; returns what will be rendered."""
        ev: Counter = Counter()
        msgs = [dict(m) for m in conv.messages]
        if not any(m["content"].strip() or m.get("tool_calls") or m.get("reasoning_content") for m in msgs):
            raise Drop("empty", "no message has any content")
        if self.options.system_prompt is not None and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": self.options.system_prompt})
        head = 1 if msgs[0]["role"] == "system" else 0
        # Split conversations (ShareGPT) often start mid-way with an answer to an unseen prompt.
        first_user = next((k for k in range(head, len(msgs)) if msgs[k]["role"] == "user"), len(msgs))
        ev["leading_turns_trimmed"] += first_user - head
        msgs = msgs[:head] + msgs[first_user:]
        last_assistant = max((k for k, m in enumerate(msgs) if m["role"] == "assistant"), default=-1)
        if last_assistant < 0:
            raise Drop("no_supervised_tokens", "no assistant turn answers a user turn")
        ev["trailing_turns_trimmed"] += len(msgs) - last_assistant - 1
        msgs = msgs[: last_assistant + 1]
        self._check_order(msgs)
        for m in msgs:
            if m["role"] != "assistant":
                continue
            self._apply_reasoning(m, ev)
            if m.get("tool_calls") and not self.supports_tool_calls:
                ev["tool_calls_inlined"] += 1
            if not (m["content"].strip() or m.get("tool_calls") or m.get("reasoning_content")):
                ev["empty_assistant_turns"] += 1
        return msgs, ev

    def for_template(self, msgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """What the template is given: tool calls become text when it has no syntax for them."""
        if self.supports_tool_calls or not any(m.get("tool_calls") for m in msgs):
            return msgs
        out = []
        for m in msgs:
            if m.get("tool_calls"):
                # No tool-call syntax in the template: write the calls in the widespread Hermes
                # form so they are still trained on.
                calls = "\n".join("<tool_call>\n" + json.dumps({"name": c["function"]["name"],
                                                                "arguments": c["function"]["arguments"]},
                                                               ensure_ascii=False) + "\n</tool_call>"
                                  for c in m["tool_calls"])
                m = {k: v for k, v in m.items() if k != "tool_calls"}
                m["content"] = f"{m['content']}\n{calls}" if m["content"].strip() else calls
            out.append(m)
        return out

    @staticmethod
    def _check_order(msgs: list[dict[str, Any]]) -> None:
        prev: dict[str, Any] | None = None
        for k, m in enumerate(msgs):
            r = m["role"]
            p = prev["role"] if prev else None
            ok = {
                "system": k == 0,
                "user": p in (None, "system", "assistant") and not (prev or {}).get("tool_calls"),
                "assistant": p in ("user", "tool"),
                "tool": p == "tool" or (p == "assistant" and bool(prev.get("tool_calls"))),
            }[r]
            if not ok:
                raise Drop("role_order", f"message {k} ({r}) cannot follow {p or 'the start'}")
            prev = m

    def _apply_reasoning(self, m: dict[str, Any], ev: Counter) -> None:
        field_r = m.pop("reasoning_content", None)
        inline_r, answer = split_reasoning(m["content"])
        if field_r is None and inline_r is None:
            return
        ev["reasoning_turns"] += 1
        if self.options.drop_reasoning:
            m["content"] = answer
        elif self.supports_reasoning:  # the template formats reasoning itself
            m["reasoning_content"] = field_r if field_r is not None else inline_r
            m["content"] = answer
        elif field_r is not None:
            m["content"] = f"<think>\n{field_r.strip()}\n</think>\n\n{m['content']}"

    # ------------------------------------------------------------------ spans + tokens
    def supervised_turns(self, msgs: list[dict[str, Any]]) -> list[int]:
        turns = [k for k, m in enumerate(msgs) if m["role"] == "assistant"
                 and (m["content"].strip() or m.get("tool_calls") or m.get("reasoning_content"))]
        if self.options.last_turn_only:
            turns = turns[-1:] if turns and turns[-1] == len(msgs) - 1 else []
        return turns

    def supervised_spans(self, msgs: list[dict[str, Any]], full: str, tools=None,
                         method: str = "auto") -> list[tuple[int, int]]:
        """Character spans [a, b) of `full` the loss falls on.

        `exact` renders two prefixes per assistant turn (the definition). `auto` first tries one
        extra render with every message content replaced by a unique marker: if putting the
        contents back reproduces `full` exactly, the template treats content as opaque text and
        each turn runs from the generation header before its content to the first end-of-turn
        marker after it, the same spans for 2 renders instead of 1 + 2 per turn (tests check the
        two agree on real data). Otherwise it falls back to `exact`.
        """
        turns = self.supervised_turns(msgs)
        if method == "auto" and turns:
            spans = self._spans_by_markers(msgs, full, tools, turns)
            if spans is not None:
                return spans
        return self._spans_exact(msgs, full, tools, turns)

    def _spans_by_markers(self, msgs, full: str, tools, turns: list[int]) -> list[tuple[int, int]] | None:
        header, eot = self.generation_prompt, self.eot
        if header is None or not eot or any("\ue000" in m["content"] for m in msgs):
            return None
        marks = [f"\ue000{k}\ue001" for k in range(len(msgs))]
        marked = self.render([dict(m, content=mk) for m, mk in zip(msgs, marks)], tools=tools)
        pieces, starts, ends = [], [], []
        prev, shift = 0, 0
        for m, mk in zip(msgs, marks):
            p = marked.find(mk, prev)
            if p < 0:
                return None
            pieces += [marked[prev:p], m["content"]]
            starts.append(p + shift)
            shift += len(m["content"]) - len(mk)
            ends.append(p + shift + len(mk))
            prev = p + len(mk)
        pieces.append(marked[prev:])
        if "".join(pieces) != full:
            return None
        spans = []
        for i in turns:
            h = full.rfind(header, ends[i - 1] if i else 0, starts[i] + 1)
            e = full.find(eot, ends[i], starts[i + 1] if i + 1 < len(msgs) else len(full))
            if h < 0 or e < 0:
                return None
            spans.append((h + len(header), e + len(eot)))
        return spans

    def _spans_exact(self, msgs, full: str, tools, turns: list[int]) -> list[tuple[int, int]]:
        spans, cursor = [], 0
        for i in turns:
            start, text = self._turn_text(msgs, i, tools)
            end = self._cut_after_eot(text)
            if start >= cursor and full.startswith(text[:end], start):
                pos = start
            else:  # history rendered differently (e.g. reasoning removed): find the turn as it appears
                pos = full.find(text[:end], cursor)
                if pos < 0:
                    plain = dict(msgs[i], content=split_reasoning(msgs[i]["content"])[1])
                    plain.pop("reasoning_content", None)
                    _, alt = self._turn_text(msgs[:i] + [plain], i, tools)
                    end = self._cut_after_eot(alt)
                    text = alt
                    pos = full.find(alt[:end], cursor)
                if pos < 0:
                    raise Drop("template_error", f"assistant turn {i} does not appear in the rendered conversation")
            if end > 0:
                spans.append((pos, pos + end))
            cursor = pos + end
        return spans

    def encode_text(self, text: str, spans: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        enc = self._backend.encode(text, add_special_tokens=False)
        ids = np.asarray(enc.ids, dtype=np.int32)
        mask = np.zeros(len(ids), dtype=np.uint8)
        for a, b in spans:
            t0 = next((t for c in range(a, b) if (t := enc.char_to_token(c)) is not None), None)
            t1 = next((t for c in range(b - 1, a - 1, -1) if (t := enc.char_to_token(c)) is not None), None)
            if t0 is not None and t1 is not None and t1 >= t0:
                mask[t0 : t1 + 1] = 1
        return ids, mask

    def encode(self, conv: Conversation) -> Encoded:
        msgs, ev = self.prepare(conv)
        shown = self.for_template(msgs)
        try:
            full = self.render(shown, tools=conv.tools)
            spans = self.supervised_spans(shown, full, conv.tools)
        except Drop:
            raise
        except Exception as e:  # noqa: BLE001 - a template may raise anything (raise_exception, type errors)
            raise Drop("template_error", f"the chat template rejected the conversation: {e}") from None
        ids, mask = self.encode_text(full, spans)
        opts = self.options
        n_full, sup_full = len(ids), int(mask.sum())
        if n_full > opts.max_length:
            ids, mask = ids[: opts.max_length], mask[: opts.max_length]
        sup = int(mask.sum())
        if sup < max(1, opts.min_supervised_tokens):
            if sup_full >= max(1, opts.min_supervised_tokens):
                raise Drop("too_long", f"{n_full} tokens; no supervised tokens left within --max-length {opts.max_length}")
            raise Drop("no_supervised_tokens", f"{sup_full} supervised tokens (minimum {opts.min_supervised_tokens})")
        return Encoded(ids, mask, n_full, msgs, ev)

    def prompt_ids(self, msgs: list[dict[str, Any]], tools=None) -> list[int]:
        """Token ids of the conversation so far followed by the assistant header (for generation)."""
        text = self.render(self.for_template(msgs), generation_prompt=True, tools=tools)
        return list(self._backend.encode(text, add_special_tokens=False).ids)
