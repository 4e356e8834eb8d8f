"""Conversations in datafiles/ (issue 21): messages with tool calls, text parts and train
marks read and checked; each assistant turn's span found by prefix renderings of the chat
template (datafiles/conversation.py), with Qwen3's way of dropping earlier reasoning, and
the views' spans checked to be equal. Tokenizer only: no model runs here."""

from __future__ import annotations

import pytest

from datafiles.conversation import SpanError, aligned, encode, render_conversation, span_ids
from datafiles.formats import Fields, read_examples
from datafiles.views import teacher_messages
from tests.fixtures.tiny_model import tiny_model_dir
from tests.precompute_helpers import QWEN3_LIKE_TEMPLATE, conversation, write_jsonl

CALL = {"type": "function", "function": {"name": "look", "arguments": {"at": "desk"}}}
AGENT = [
    {"role": "system", "content": "You act in a house."},
    {"role": "user", "content": [{"type": "text", "text": "Find "},
                                 {"type": "text", "text": "a mug."}]},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "content": "A mug is on the desk.", "tool_call_id": "c0", "name": "look"},
    {"role": "assistant", "content": "I take the mug.", "train": False},
    {"role": "user", "content": "Now what?"},
    {"role": "assistant", "content": "Done.", "tool_calls": [
        {"type": "function", "function": {"name": "stop", "arguments": "{\"ok\": true}"}}]},
]  # fmt: skip


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir())


@pytest.fixture(scope="module")
def qwen3_like():
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tiny_model_dir())
    t.chat_template = QWEN3_LIKE_TEMPLATE
    return t


# ---- reading ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("which", "trained"), [("all", (2, 4, 6)), ("last", (6,)), ("marked", (2, 6))]
)
def test_agent_conversations_are_read_whole_with_their_trained_turns(tmp_path, which, trained):
    path = write_jsonl(tmp_path / "a.jsonl", [{"id": "ep0", "messages": AGENT}])
    (ex,), rejects, _ = read_examples(path, "train", Fields(train_turns=which), "score")
    assert rejects == [] and ex.trained == trained
    assert len(ex.conversation) == 7 and ex.conversation[1]["content"] == "Find a mug."
    assert ex.conversation[2] == {"role": "assistant", "content": "", "tool_calls": [CALL]}
    assert ex.conversation[3]["tool_call_id"] == "c0" and "train" not in ex.conversation[4]
    # The string arguments are kept as given, for the chat template.
    assert ex.conversation[6]["tool_calls"][0]["function"]["arguments"] == '{"ok": true}'


def test_generate_mode_keeps_its_meaning_with_tool_calls(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"messages": AGENT}])
    (ex,), rejects, _ = read_examples(path, "train", Fields(), "generate")
    assert rejects == [] and ex.conversation == () and ex.trained == ()
    assert list(ex.messages) == list(
        read_examples(path, "train", Fields(), "score")[0][0].conversation[:6]
    )
    assert ex.answer == "Done."


def test_the_experience_goes_to_the_first_user_turn_of_a_conversation():
    chat = conversation(1, turns=2)
    for position, text in (("prefix", "E\n\nWhat is 1 + 0?"), ("suffix", "What is 1 + 0?\n\nE")):
        t = teacher_messages(chat, "E", position)
        assert t[1]["content"] == text  # the task, not the last user turn
        assert t[:1] + t[2:] == chat[:1] + chat[2:]


# ---- spans --------------------------------------------------------------------------------


def test_each_assistant_turn_is_a_span_through_its_eos(tok):
    chat = conversation(3, turns=3)
    r = render_conversation(tok, chat, [2, 4, 6])
    assert r.ids == encode(tok, chat, None, False)
    eos = tok.eos_token_id
    for (s, n), j in zip(r.spans, (2, 4, 6), strict=True):
        # Written out: the content's own tokens, then the end-of-turn token.
        assert r.ids[s : s + n] == tok(chat[j]["content"], add_special_tokens=False)[
            "input_ids"
        ] + [eos]
        # The span starts right after the turns before it with the generation prompt.
        assert r.ids[:s] == encode(tok, chat[:j], None, True)
    starts = [s for s, _ in r.turns]
    assert [role for _, role in r.turns] == [m["role"] for m in chat]
    assert starts[0] == 0 and starts == sorted(starts)
    assert all(tok.decode(r.ids[a]) == "<|im_start|>" for a in starts)
    for k in range(1, len(chat)):
        assert r.ids[: starts[k]] == encode(tok, chat[:k], None, False)


def test_reasoning_of_earlier_turns_is_dropped_in_both_views(qwen3_like):
    chat = [
        {"role": "user", "content": "Task: 2 + 2?"},
        {"role": "assistant", "content": "<think>\nadd\n</think>\n\nIt is 4."},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": "<think>\nadd again\n</think>\n\nIt is 6."},
    ]
    s = render_conversation(qwen3_like, chat, [1, 3])
    t_chat = teacher_messages(chat, "Add the numbers.", "system")
    t = render_conversation(qwen3_like, t_chat, [2, 4])
    first, last = (qwen3_like.decode(x) for x in span_ids(s))
    assert first == "It is 4.<|im_end|>"  # the template dropped the earlier reasoning
    assert last == "<think>\nadd again\n</think>\n\nIt is 6.<|im_end|>"
    aligned(qwen3_like, s, t, [1, 3])  # the same ids in both views
    # Where the turns before a message render differently (the earlier turn would keep its
    # reasoning as the last one), the message starts after the previous end of turn.
    start = s.turns[2][0]
    assert qwen3_like.decode(s.ids[start]) == "<|im_start|>"
    assert qwen3_like.decode(s.ids[start - 2 : start]) == "<|im_end|>\n"


def test_a_generation_prompt_that_is_not_a_prefix_is_refused_with_the_turn(qwen3_like):
    chat = conversation(2, turns=2)
    off = {"enable_thinking": False}
    # One turn: the last turn's empty think block matches the generation prompt's.
    render_conversation(qwen3_like, chat[:3], [2], off)
    with pytest.raises(SpanError) as e:
        render_conversation(qwen3_like, chat, [2, 4], off)
    assert e.value.turn == 2
    assert "not a prefix of the whole conversation" in e.value.reason
    # The whole conversation's token (the answer's first) against the prefix's (the empty
    # think block's first), decoded.
    assert e.value.reason.endswith("at token 43: '2' (id 20) vs '<' (id 30)"), e.value.reason


def test_spans_that_differ_between_the_views_are_refused(tok):
    # A template that writes the system message into every assistant turn.
    tok = tok.__class__.from_pretrained(tiny_model_dir())
    tok.chat_template = (
        "{%- for m in messages -%}{{- '<|im_start|>' + m.role + '\\n' + m.content -}}"
        "{%- if m.role == 'assistant' and messages[0].role == 'system' -%}"
        "{{- ' (' + messages[0].content + ')' -}}{%- endif -%}{{- '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )
    chat = conversation(1, turns=2)
    s = render_conversation(tok, chat, [2, 4])
    t = render_conversation(tok, teacher_messages(chat, "Hint.", "system"), [2, 4])
    with pytest.raises(SpanError) as e:
        aligned(tok, s, t, [2, 4])
    assert e.value.turn == 2 and "differ between the views" in e.value.reason
    # The student's system message ends where the teacher's goes on with the experience.
    assert e.value.reason.endswith("at token 22: ')' (id 11) vs '\\n' (id 201)"), e.value.reason
