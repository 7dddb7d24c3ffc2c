"""Chat sessions: the tokens a new turn feeds.

A session's tokens are what the model's chat template renders for the whole conversation, whatever the
template: each turn renders the conversation so far (the session's messages, its replies included, then
the new ones, then the generation prompt) and feeds what follows the tokens the session already
consumed, once it has checked that the rendering starts with exactly those tokens (by a digest: the
session keeps their count and a SHA-256 of them, not the tokens). Where the check fails (a template that
rewrites past turns, such as one that drops a reply's reasoning, or a reply whose tokens are not how the
tokenizer would encode its text), the new messages are rendered on their own and fed, and the session
takes the rendering as its reference from then on. Tokens a session takes outside its chat turns (a
completion on it, a prompt cut short by a disconnect) stay in its context: the check does not see them.

The messages themselves are kept (a template needs them all), within the bound on a session's chat
history (`history_limit` messages: past it the new messages are always rendered alone): the session
record grows with the conversation's text, its state blob does not.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from jinja2 import TemplateError

from server.errors import bad_request

if TYPE_CHECKING:
    from server.sessions import ChatHistory

Message = tuple[str, str]  # (role, content), as chat templates take them


class ChatTokenizer(Protocol):
    def encode_chat(self, messages: list[Message], add_generation_prompt: bool = True) -> list[int]: ...


def token_digest(tokens: list[int]) -> str:
    return hashlib.sha256(b"".join(t.to_bytes(4, "little") for t in tokens)).hexdigest()


EMPTY_DIGEST = token_digest([])


@dataclass
class ChatTurn:
    """A chat request's new messages (and their hashes) and the rendering of the whole conversation it
    feeds up to."""

    messages: list[Message]
    hashes: list[str]
    rendered: list[int]
    exact: bool  # whether the tokens fed continue the session's own tokens as the template renders them

    def record(self, history: ChatHistory, reply: str | None, reply_tokens: list[int], keep: int) -> None:
        """Add this turn's conversation to `history` (the hashes are `ChatHistory.add`'s): its messages,
        the reply (None: no reply), the count and digest of the tokens consumed; past `keep` messages
        the conversation is no longer kept."""
        new = self.messages + ([("assistant", reply)] if reply is not None else [])
        conversation = None if history.conversation is None else history.conversation + new
        history.conversation = (
            conversation if conversation is not None and len(conversation) <= keep else None
        )
        consumed = self.rendered + reply_tokens
        history.tokens, history.digest = len(consumed), token_digest(consumed)


def render(tokenizer: ChatTokenizer, messages: list[Message]) -> list[int]:
    """The chat template's tokens for `messages`, ready for the reply; 400 where the template refuses
    them (a Hugging Face template may raise, e.g. on a system message that is not the first)."""
    try:
        return tokenizer.encode_chat(messages)
    except TemplateError as exc:
        raise bad_request(f"the model's chat template refused the messages: {exc}", "messages") from exc


def chat_turn(
    tokenizer: ChatTokenizer, history: ChatHistory, new: list[Message], hashes: list[str]
) -> tuple[list[int], ChatTurn]:
    """The tokens a session with `history` feeds for the `new` messages (whose hashes are `hashes`),
    and the turn to record."""
    if history.conversation is None:  # too long to keep: the new messages alone, the rendering theirs
        tokens = render(tokenizer, new)
        return tokens, ChatTurn(new, hashes, tokens, exact=False)
    rendered = render(tokenizer, [*history.conversation, *new])
    consumed = history.tokens
    if len(rendered) > consumed and token_digest(rendered[:consumed]) == history.digest:
        return rendered[consumed:], ChatTurn(new, hashes, rendered, exact=True)
    return render(tokenizer, new), ChatTurn(new, hashes, rendered, exact=False)
