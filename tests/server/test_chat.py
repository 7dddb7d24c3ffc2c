"""server/chat.py: a chat session feeds what the template renders for the whole conversation after what
it consumed, falls back to the new messages alone where the rendering departs from it, and a template
that refuses the messages is a 400."""

from __future__ import annotations

import pytest
from qwen_support import make_tokenizer

from model.tokenizer import END_OF_MESSAGE, ByteTokenizer, HFTokenizer
from server.chat import chat_turn, render
from server.errors import APIError
from server.sessions import ChatHistory

TOKENIZER = ByteTokenizer()
KEEP = 1024  # messages a session's history keeps


def test_turns_continue_the_rendering_of_the_whole_conversation():
    history = ChatHistory()
    first = [("system", "be brief"), ("user", "hi")]
    tokens, turn = chat_turn(TOKENIZER, history, first, [])
    assert turn.exact and tokens == TOKENIZER.encode_chat(first)
    reply = [*TOKENIZER.encode("hello"), END_OF_MESSAGE]  # as the model would end it
    turn.record(history, "hello", reply, KEEP)

    second = [("user", "and then?")]
    tokens, turn = chat_turn(TOKENIZER, history, second, [])
    whole = TOKENIZER.encode_chat([*first, ("assistant", "hello"), *second])
    assert turn.exact and TOKENIZER.encode_chat(first) + reply + tokens == whole
    assert history.conversation == [*first, ("assistant", "hello")]

    # A reply cut by max_tokens (no closing token): the next rendering closes it.
    turn.record(history, "ab", TOKENIZER.encode("ab"), KEEP)
    third = [("user", "go on")]
    tokens, turn = chat_turn(TOKENIZER, history, third, [])
    assert turn.exact and tokens[0] == END_OF_MESSAGE and tokens[1:] == TOKENIZER.encode_chat(third)


def test_a_reply_the_template_renders_otherwise_falls_back_to_the_new_messages():
    history = ChatHistory()
    _, turn = chat_turn(TOKENIZER, history, [("user", "hi")], [])
    turn.record(history, "\ufffd", [0xE6], KEEP)  # a broken character: its text re-encodes to other bytes
    tokens, turn = chat_turn(TOKENIZER, history, [("user", "next")], [])
    assert not turn.exact and tokens == TOKENIZER.encode_chat([("user", "next")])
    # the rendering is the reference again
    turn.record(history, "ok", [*TOKENIZER.encode("ok"), END_OF_MESSAGE], KEEP)
    tokens, turn = chat_turn(TOKENIZER, history, [("user", "last")], [])
    assert turn.exact and tokens == TOKENIZER.encode_chat([("user", "last")])


def test_a_conversation_past_the_history_bound_renders_the_new_messages_alone():
    history = ChatHistory()
    _, turn = chat_turn(TOKENIZER, history, [("user", "a"), ("user", "b")], [])
    turn.record(history, "ok", [*TOKENIZER.encode("ok"), END_OF_MESSAGE], keep=2)
    assert history.conversation is None
    tokens, turn = chat_turn(TOKENIZER, history, [("user", "c")], [])
    assert not turn.exact and tokens == TOKENIZER.encode_chat([("user", "c")])


def test_a_template_that_refuses_the_messages_is_a_bad_request(tmp_path):
    make_tokenizer(tmp_path)
    template = tmp_path / "chat_template.jinja"  # where transformers saves a tokenizer's template
    assert template.is_file()
    template.write_text("{{ raise_exception('System message must be at the beginning.') }}")
    tokenizer = HFTokenizer(tmp_path)
    with pytest.raises(APIError) as refused:
        render(tokenizer, [("user", "hi"), ("system", "late")])
    assert refused.value.status == 400 and "System message must be at the beginning" in refused.value.message
