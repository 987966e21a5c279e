"""Loss masks from chat templates: assistant content + its end-of-turn token, nothing else.

Real tokenizers: the tiny ChatML byte-level BPE (fixture tiny_llama) and SmolLM2-135M-Instruct's
(fixture smollm2_tokenizer_dir), plus two templates written here in the style models ship:
one with native tool calls and one that renders reasoning (<think>) only after the last user turn.
"""

import copy

import numpy as np
import pytest
from transformers import AutoTokenizer

from common.errors import DataError
from draft_trainer.data.chat import ChatEncoder, ChatOptions, Drop
from draft_trainer.data.formats import Conversation, Record, normalize

IM_END = "<|im_end|>"

# Reasoning + tools, in the style of recent ChatML models: reasoning is shown only for assistant
# turns after the last user message (history drops it), tool calls are rendered as JSON.
AGENT_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}"
    "{%- if tools -%}{{- '<|im_start|>system\nTools: ' + (tools | tojson) + '<|im_end|>\n' -}}{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}"
    "{{- '<|im_start|>assistant\n' -}}"
    "{%- set content = m.content -%}"
    "{%- set reasoning = m.reasoning_content if m.reasoning_content is defined and m.reasoning_content else '' -%}"
    "{%- if '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\n') -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\n') -%}"
    "{%- endif -%}"
    "{%- if loop.index0 > ns.last_user and reasoning -%}{{- '<think>\n' + reasoning + '\n</think>\n\n' -}}{%- endif -%}"
    "{{- content -}}"
    "{%- if m.tool_calls is defined and m.tool_calls -%}{%- for c in m.tool_calls -%}"
    "{{- '<tool_call>\n' + (c.function | tojson) + '\n</tool_call>' -}}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- elif m.role == 'tool' -%}"
    "{{- '<|im_start|>user\n<tool_response>\n' + m.content + '\n</tool_response><|im_end|>\n' -}}"
    "{%- else -%}{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)


@pytest.fixture(scope="module")
def tiny_tok(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture(scope="module")
def agent_tok(tiny_tok):
    tok = copy.deepcopy(tiny_tok)
    tok.chat_template = AGENT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def smol_tok(smollm2_tokenizer_dir):
    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


def conv(*turns, tools=None):
    msgs = [t if isinstance(t, dict) else {"role": t[0], "content": t[1]} for t in turns]
    return Conversation(messages=msgs, tools=tools)


def supervised_runs(tok, ids, mask) -> list[str]:
    """Decoded text of each maximal run of supervised tokens."""
    runs, cur = [], []
    for t, m in zip(ids.tolist(), mask.tolist()):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


def chatml_rule_mask(tok, ids) -> np.ndarray:
    """Independent oracle for ChatML: after the '<|im_start|>assistant\\n' tokens up to and
    including '<|im_end|>' (token-level rule, no template or offsets involved)."""
    start = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    end_id = tok.convert_tokens_to_ids(IM_END)
    ids = list(ids)
    mask = np.zeros(len(ids), dtype=np.uint8)
    inside = False
    for t in range(len(ids)):
        if not inside and ids[max(0, t - len(start)) : t] == start:
            inside = True
        if inside:
            mask[t] = 1
            if ids[t] == end_id:
                inside = False
    return mask


def template_ids(tok, msgs, **kw):
    return tok.apply_chat_template(msgs, tokenize=True, **kw)["input_ids"]


# ----------------------------------------------------------------------------- ChatML basics

def test_multi_turn_with_system_on_tiny_chatml(tiny_tok):
    enc = ChatEncoder(tiny_tok)
    c = conv(("system", "Be brief."), ("user", "What is the capital of France?"), ("assistant", "Paris."),
             ("user", "And of Italy?"), ("assistant", "Rome, of course."))
    e = enc.encode(c)
    assert e.input_ids.tolist() == template_ids(tiny_tok, c.messages)   # the template's own rendering
    assert supervised_runs(tiny_tok, e.input_ids, e.loss_mask) == ["Paris.<|im_end|>", "Rome, of course.<|im_end|>"]
    assert np.array_equal(e.loss_mask, chatml_rule_mask(tiny_tok, e.input_ids))
    assert enc.eot == IM_END and enc.eot_token_ids == [tiny_tok.convert_tokens_to_ids(IM_END)]


def test_smollm2_default_system_prompt_is_never_supervised(smol_tok):
    enc = ChatEncoder(smol_tok)
    c = conv(("user", "hi"), ("assistant", "Hello! How can I help?"))
    e = enc.encode(c)
    text = smol_tok.decode(e.input_ids)
    assert "You are a helpful AI assistant named SmolLM" in text  # injected by SmolLM2's template
    assert e.input_ids.tolist() == template_ids(smol_tok, c.messages)
    assert supervised_runs(smol_tok, e.input_ids, e.loss_mask) == ["Hello! How can I help?<|im_end|>"]


def test_system_prompt_option_only_fills_a_missing_system_turn(smol_tok):
    enc = ChatEncoder(smol_tok, ChatOptions(system_prompt="You are terse."))
    e = enc.encode(conv(("user", "hi"), ("assistant", "Hey.")))
    assert e.messages[0] == {"role": "system", "content": "You are terse."}
    assert "SmolLM" not in smol_tok.decode(e.input_ids)
    e2 = enc.encode(conv(("system", "Own prompt."), ("user", "hi"), ("assistant", "Hey.")))
    assert [m["content"] for m in e2.messages if m["role"] == "system"] == ["Own prompt."]


def test_smollm2_on_real_sharegpt_matches_oracle_and_exact_method(smol_tok):
    """150 real ShareGPT conversations: the fast marker path gives the same spans as the exact
    prefix-rendering definition, the mask equals the token-level ChatML rule, and each
    supervised run decodes to exactly one assistant message + <|im_end|>."""
    from draft_trainer.assets.fetch import locate_sharegpt
    from draft_trainer.data.formats import read_records

    enc = ChatEncoder(smol_tok, ChatOptions(max_length=1 << 20))
    checked = 0
    for rec in read_records(locate_sharegpt()):
        if checked == 150:
            break
        try:
            c = normalize(rec)
            msgs, ev = enc.prepare(c)
        except Drop:
            continue
        if ev.get("empty_assistant_turns"):
            continue  # the rule oracle would supervise an empty turn's <|im_end|>; we do not (tested below)
        full = enc.render(msgs)
        turns = enc.supervised_turns(msgs)
        fast = enc._spans_by_markers(msgs, full, None, turns)
        assert fast is not None and fast == enc._spans_exact(msgs, full, None, turns)
        e = enc.encode(c)
        assert np.array_equal(e.loss_mask, chatml_rule_mask(smol_tok, e.input_ids)), rec.where
        want = [m["content"] + IM_END for m in msgs if m["role"] == "assistant"]
        assert supervised_runs(smol_tok, e.input_ids, e.loss_mask) == want, rec.where
        checked += 1
    assert checked == 150


# ----------------------------------------------------------------------------- tools

def test_tool_calls_native_template(agent_tok):
    enc = ChatEncoder(agent_tok)
    assert enc.supports_tool_calls
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    c = conv(("user", "Weather in Paris?"),
             {"role": "assistant", "content": "", "tool_calls": [
                 {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
             {"role": "tool", "content": "18C and sunny"},
             ("assistant", "It is 18C and sunny."), tools=tools)
    e = enc.encode(c)
    assert e.input_ids.tolist() == template_ids(agent_tok, c.messages, tools=tools)
    runs = supervised_runs(agent_tok, e.input_ids, e.loss_mask)
    assert runs == ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
                    "It is 18C and sunny.<|im_end|>"]
    assert "Tools:" in agent_tok.decode(e.input_ids)  # the schema is rendered, unsupervised


def test_tool_calls_inlined_when_the_template_has_no_tool_syntax(tiny_tok):
    enc = ChatEncoder(tiny_tok)
    assert not enc.supports_tool_calls
    c = conv(("user", "Add 2 and 3."),
             {"role": "assistant", "content": "Calling.", "tool_calls": [
                 {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
             {"role": "tool", "content": "5"}, ("assistant", "5"))
    e = enc.encode(c)
    assert e.events["tool_calls_inlined"] == 1
    assert supervised_runs(tiny_tok, e.input_ids, e.loss_mask) == [
        'Calling.\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>', "5<|im_end|>"]
    assert "<|im_start|>tool\n5<|im_end|>" in tiny_tok.decode(e.input_ids)  # tool result: context only


# ----------------------------------------------------------------------------- empty turns, order

def test_empty_assistant_turn_is_rendered_but_not_supervised(tiny_tok):
    enc = ChatEncoder(tiny_tok)
    e = enc.encode(conv(("user", "one"), ("assistant", "  "), ("user", ""), ("assistant", "two")))
    assert e.events["empty_assistant_turns"] == 1
    assert supervised_runs(tiny_tok, e.input_ids, e.loss_mask) == ["two<|im_end|>"]
    assert "<|im_start|>user\n<|im_end|>" in tiny_tok.decode(e.input_ids)  # the empty user turn stays


@pytest.mark.parametrize("turns,reason", [
    ([], "empty"),
    ([("user", " "), ("assistant", "")], "empty"),
    ([("user", "a"), ("user", "b"), ("assistant", "c")], "role_order"),
    ([("user", "a"), ("assistant", "b"), ("assistant", "c")], "role_order"),
    ([("user", "a"), ("system", "late"), ("assistant", "c")], "role_order"),
    ([("user", "a"), ("tool", "no call"), ("assistant", "c")], "role_order"),
    ([("user", "only a question")], "no_supervised_tokens"),
    ([("assistant", "an answer to nothing")], "no_supervised_tokens"),
    ([("user", "a"), ("assistant", "")], "no_supervised_tokens"),
])
def test_drop_reasons(tiny_tok, turns, reason):
    with pytest.raises(Drop) as e:
        ChatEncoder(tiny_tok).encode(conv(*turns))
    assert e.value.reason == reason


def test_leading_answer_and_trailing_question_are_trimmed(tiny_tok):
    e = ChatEncoder(tiny_tok).encode(conv(("assistant", "orphan"), ("user", "q"), ("assistant", "a"), ("user", "dangling")))
    assert [m["content"] for m in e.messages] == ["q", "a"]
    assert e.events["leading_turns_trimmed"] == 1 and e.events["trailing_turns_trimmed"] == 1


# ----------------------------------------------------------------------------- options

def test_last_turn_only(tiny_tok):
    e = ChatEncoder(tiny_tok, ChatOptions(last_turn_only=True)).encode(
        conv(("user", "a"), ("assistant", "first"), ("user", "b"), ("assistant", "second")))
    assert supervised_runs(tiny_tok, e.input_ids, e.loss_mask) == ["second<|im_end|>"]


def test_truncation_min_supervised_and_too_long(tiny_tok):
    c = conv(("user", "a " * 40), ("assistant", "The quick brown fox jumps over the lazy dog."))
    full = ChatEncoder(tiny_tok).encode(c)
    n_user = int(np.argmax(full.loss_mask))  # first supervised position
    e = ChatEncoder(tiny_tok, ChatOptions(max_length=n_user + 3)).encode(c)
    assert len(e.input_ids) == n_user + 3 and e.truncated and e.full_length == len(full.input_ids)
    assert int(e.loss_mask.sum()) == 3 and np.array_equal(e.input_ids, full.input_ids[: n_user + 3])
    with pytest.raises(Drop) as d:
        ChatEncoder(tiny_tok, ChatOptions(max_length=n_user)).encode(c)
    assert d.value.reason == "too_long"
    with pytest.raises(Drop) as d:
        ChatEncoder(tiny_tok, ChatOptions(min_supervised_tokens=int(full.loss_mask.sum()) + 1)).encode(c)
    assert d.value.reason == "no_supervised_tokens"


# ----------------------------------------------------------------------------- reasoning

REASONING_CONV = [("user", "2+2?"), ("assistant", "<think>\nsmall sum\n</think>\n\n4"),
                  ("user", "3+3?"), ("assistant", "<think>\nalso small\n</think>\n\n6")]


def test_reasoning_template_keep(agent_tok):
    enc = ChatEncoder(agent_tok)
    assert enc.supports_reasoning
    c = conv(*REASONING_CONV)
    e = enc.encode(c)
    assert e.input_ids.tolist() == template_ids(agent_tok, c.messages)
    # The template drops history reasoning (as at inference); the last turn keeps its <think> block.
    assert supervised_runs(agent_tok, e.input_ids, e.loss_mask) == [
        "4<|im_end|>", "<think>\nalso small\n</think>\n\n6<|im_end|>"]
    assert e.messages[3]["reasoning_content"] == "also small" and e.messages[3]["content"] == "6"
    # The marker fast path must not be taken when the template inspects content.
    full = enc.render(e.messages)
    assert enc.supervised_spans(e.messages, full) == enc._spans_exact(e.messages, full, None, [1, 3])


def test_reasoning_template_drop(agent_tok):
    e = ChatEncoder(agent_tok, ChatOptions(drop_reasoning=True)).encode(conv(*REASONING_CONV))
    assert "<think>" not in agent_tok.decode(e.input_ids)
    assert supervised_runs(agent_tok, e.input_ids, e.loss_mask) == ["4<|im_end|>", "6<|im_end|>"]
    assert e.events["reasoning_turns"] == 2


def test_reasoning_field_and_plain_chatml(tiny_tok):
    msgs = [("user", "q"), {"role": "assistant", "content": "answer", "reasoning_content": "why"}]
    keep = ChatEncoder(tiny_tok).encode(conv(*msgs))
    assert supervised_runs(tiny_tok, keep.input_ids, keep.loss_mask) == ["<think>\nwhy\n</think>\n\nanswer<|im_end|>"]
    drop = ChatEncoder(tiny_tok, ChatOptions(drop_reasoning=True)).encode(conv(*msgs))
    assert supervised_runs(tiny_tok, drop.input_ids, drop.loss_mask) == ["answer<|im_end|>"]
    inline = ChatEncoder(tiny_tok).encode(conv(*REASONING_CONV))  # ChatML keeps inline blocks verbatim
    assert supervised_runs(tiny_tok, inline.input_ids, inline.loss_mask) == [
        "<think>\nsmall sum\n</think>\n\n4<|im_end|>", "<think>\nalso small\n</think>\n\n6<|im_end|>"]


# ----------------------------------------------------------------------------- template problems

def test_template_that_rejects_a_conversation_is_a_counted_drop(tiny_tok):
    tok = copy.deepcopy(tiny_tok)
    tok.chat_template = ("{% for m in messages %}{% if 'forbidden' in m.content %}"
                         "{{ raise_exception('no forbidden words') }}{% endif %}"
                         "{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    with pytest.raises(Drop) as e:
        ChatEncoder(tok).encode(conv(("user", "a forbidden word"), ("assistant", "b")))
    assert e.value.reason == "template_error" and "no forbidden words" in e.value.detail


def test_tokenizer_without_chat_template_is_a_clear_error(tiny_tok):
    tok = copy.deepcopy(tiny_tok)
    tok.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        ChatEncoder(tok)


def test_normalized_sharegpt_roles_render(tiny_tok):
    raw = {"conversations": [{"from": "human", "value": "hi"}, {"from": "bard", "value": "hello"}]}
    e = ChatEncoder(tiny_tok).encode(normalize(Record("f", raw)))
    assert supervised_runs(tiny_tok, e.input_ids, e.loss_mask) == ["hello<|im_end|>"]
