"""Chat sessions: which messages a session has consumed, and the tokens a new turn feeds.

A session's tokens are what the model's chat template renders for the whole conversation, whatever the
template: each turn renders the conversation so far (the session's messages, its replies included, then
the new ones, then the generation prompt) and feeds what follows the tokens the session already
consumed, once it has checked that the rendering starts with exactly those tokens (by a digest: the
session keeps their count and a SHA-256 of them, not the tokens). Where the check fails (a template that
rewrites past turns, such as one that drops a reply's reasoning, a reply whose tokens are not how the
tokenizer would encode its text, or a completion or an aborted turn in between), the new messages are
rendered on their own and fed, and the session takes the rendering as its reference from then on.

The messages themselves are kept (a template needs them all): the session record grows with the
conversation's text, its state blob does not.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Protocol

from jinja2 import TemplateError

from server.errors import APIError, bad_request

Message = tuple[str, str]  # (role, content), as chat templates take them


class ChatTokenizer(Protocol):
    def encode_chat(self, messages: list[Message], add_generation_prompt: bool = True) -> list[int]: ...


def token_digest(tokens: list[int]) -> str:
    return hashlib.sha256(b"".join(t.to_bytes(4, "little") for t in tokens)).hexdigest()


@dataclass
class ChatHistory:
    """What a session consumed as chat: its messages, and the count and digest of the tokens they (with
    the replies' own tokens) rendered to."""

    messages: list[Message] = field(default_factory=list)
    tokens: int = 0
    digest: str = token_digest([])

    def to_json(self) -> dict:
        return {"messages": [list(m) for m in self.messages], "tokens": self.tokens, "digest": self.digest}

    @classmethod
    def from_json(cls, data: dict) -> ChatHistory:
        return cls([(role, content) for role, content in data["messages"]], data["tokens"], data["digest"])


@dataclass
class ChatTurn:
    """A chat request's new messages and the rendering of the whole conversation it feeds up to."""

    messages: list[Message]
    rendered: list[int]
    exact: bool  # whether the tokens fed continue the session's own tokens as the template renders them

    def record(self, history: ChatHistory, reply: str | None, reply_tokens: list[int]) -> None:
        """Add this turn to `history`: its messages, the reply (None: no reply), the tokens consumed."""
        history.messages += self.messages
        if reply is not None:
            history.messages.append(("assistant", reply))
        consumed = self.rendered + reply_tokens
        history.tokens, history.digest = len(consumed), token_digest(consumed)


def new_messages(messages: list[Message], history: list[Message]) -> int:
    """Index of the first message the session has not consumed.

    Either the request re-sends the consumed history (and adds to it), or it holds only new messages.
    A request that starts like the history but departs from it contradicts the session: 409.
    """
    n = len(history)
    if not history or messages[0] != history[0]:
        return 0
    if messages[:n] == history and len(messages) > n:
        return n
    differ = next((i for i, (a, b) in enumerate(zip(messages, history, strict=False)) if a != b), None)
    if differ is None:
        message = (
            f"messages re-send the {n} messages this session consumed but add no new one"
            if len(messages) == n
            else f"messages re-send only {len(messages)} of the {n} messages this session consumed"
        )
    else:
        message = (
            f"messages[{differ}] ({messages[differ][0]}) differs from the message this session consumed at "
            f"that position: the history contradicts the session (send only the new messages, or the history "
            f"exactly as the session saw it, its replies included)"
        )
    raise APIError(409, message, param="messages", code="session_history_mismatch")


def render(tokenizer: ChatTokenizer, messages: list[Message]) -> list[int]:
    """The chat template's tokens for `messages`, ready for the reply; 400 where the template refuses
    them (a Hugging Face template may raise, e.g. on a system message that is not the first)."""
    try:
        return tokenizer.encode_chat(messages)
    except TemplateError as exc:
        raise bad_request(f"the model's chat template refused the messages: {exc}", "messages") from exc


def chat_turn(
    tokenizer: ChatTokenizer, history: ChatHistory, new: list[Message]
) -> tuple[list[int], ChatTurn]:
    """The tokens a session with `history` feeds for the `new` messages, and the turn to record."""
    rendered = render(tokenizer, [*history.messages, *new])
    consumed = history.tokens
    if len(rendered) > consumed and token_digest(rendered[:consumed]) == history.digest:
        return rendered[consumed:], ChatTurn(new, rendered, exact=True)
    return render(tokenizer, new), ChatTurn(new, rendered, exact=False)
