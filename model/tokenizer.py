"""Tokenizers behind one interface (`Tokenizer`): the native byte-level one and Hugging Face's.

`ByteTokenizer` (family `sleepy`): ids 0–255 are UTF-8 bytes, so any text round-trips; a few special
tokens follow. `HFTokenizer` (Hugging Face checkpoints): `transformers.AutoTokenizer` with the
checkpoint's own chat template and stop tokens.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

SPECIAL_TOKENS: dict[str, int] = {
    "<|bos|>": 256,
    "<|eos|>": 257,
    "<|system|>": 258,
    "<|user|>": 259,
    "<|assistant|>": 260,
    "<|end|>": 261,  # end of a chat message
}
BOS, EOS = SPECIAL_TOKENS["<|bos|>"], SPECIAL_TOKENS["<|eos|>"]
ROLE_TOKENS: dict[str, int] = {
    role: SPECIAL_TOKENS[f"<|{role}|>"] for role in ("system", "user", "assistant")
}
END_OF_MESSAGE = SPECIAL_TOKENS["<|end|>"]
N_TOKENS = 262  # ids in use; ModelConfig.vocab_size may round this up

# A chat message: an OpenAI dict {"role", "content"} or (role, content).
Message = dict[str, str] | tuple[str, str]


class TextStream(Protocol):
    """Incremental detokenization: text pieces that never end inside a character."""

    def push(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


class Tokenizer(Protocol):
    eos_ids: frozenset[int]  # ids that end a reply
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def encode_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]: ...

    def stream_decoder(self) -> TextStream: ...


def _role_and_content(message: Message) -> tuple[str, str]:
    if isinstance(message, dict):
        return message["role"], message["content"]
    return message


class ByteTokenizer:
    vocab_size = N_TOKENS
    eos_ids = frozenset({EOS, END_OF_MESSAGE})

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes back to text; special tokens are dropped, broken UTF-8 becomes U+FFFD."""
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def encode_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        """<|role|>content<|end|>… then <|assistant|> when a reply is wanted."""
        ids: list[int] = []
        for message in messages:
            role, content = _role_and_content(message)
            ids += [ROLE_TOKENS[role], *self.encode(content), END_OF_MESSAGE]
        if add_generation_prompt:
            ids.append(ROLE_TOKENS["assistant"])
        return ids

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder()


class StreamDecoder:
    """Turns generated ids into text pieces, holding back bytes of a character that is not yet complete."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(bytes([token_id])) if token_id < 256 else ""

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class HFTokenizer:
    """A Hugging Face checkpoint's tokenizer (`tokenizer.json`, `tokenizer_config.json`, its chat
    template), with the stop tokens of its `generation_config.json` and its own eos token."""

    def __init__(self, folder: str | Path) -> None:
        from transformers import AutoTokenizer  # a second or two to import: only where it is used

        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.vocab_size = len(self.tokenizer)
        self.eos_ids = frozenset(_generation_eos(Path(folder)) | _ids(self.tokenizer.eos_token_id))

    def encode(self, text: str) -> list[int]:
        """The text's ids, with no special tokens added (a prompt may continue a session)."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def encode_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        """The checkpoint's chat template over the messages, tokenised as `apply_chat_template` does."""
        conversation = [dict(zip(("role", "content"), _role_and_content(m), strict=True)) for m in messages]
        return list(
            self.tokenizer.apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
            )
        )

    def stream_decoder(self) -> HFStreamDecoder:
        return HFStreamDecoder(self)


class HFStreamDecoder:
    """Incremental detokenization as vLLM and TGI do it: decode the last few ids with and without the
    new one and emit the difference, holding it back while it ends in U+FFFD (a character whose bytes
    are split over tokens) or adds nothing yet (a piece of a word a tokenizer may merge)."""

    def __init__(self, tokenizer: HFTokenizer) -> None:
        self._decode = tokenizer.decode
        self._ids: list[int] = []
        self._emitted = 0  # ids whose text went out; _ids[:_start] are context only
        self._start = 0

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        before = self._decode(self._ids[self._start : self._emitted])
        text = self._decode(self._ids[self._start :])
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""
        self._start, self._emitted = self._emitted, len(self._ids)
        del self._ids[: self._start]  # only the last emitted piece is kept as context
        self._emitted -= self._start
        self._start = 0
        return text[len(before) :]

    def flush(self) -> str:
        before = self._decode(self._ids[self._start : self._emitted])
        text = self._decode(self._ids[self._start :])
        self._ids, self._start, self._emitted = [], 0, 0
        return text[len(before) :]


def _ids(value: int | list[int] | None) -> set[int]:
    if value is None:
        return set()
    return {value} if isinstance(value, int) else set(value)


def _generation_eos(folder: Path) -> set[int]:
    path = folder / "generation_config.json"
    return _ids(json.loads(path.read_text()).get("eos_token_id")) if path.is_file() else set()
