"""Byte-level tokenizer: ids 0–255 are UTF-8 bytes, so any text round-trips; a few special tokens follow."""

from __future__ import annotations

import codecs

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


class ByteTokenizer:
    vocab_size = N_TOKENS

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """Bytes back to text; special tokens are dropped, broken UTF-8 becomes U+FFFD."""
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def encode_chat(self, messages: list[tuple[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """[(role, content)] -> <|role|>content<|end|>… then <|assistant|> when a reply is wanted."""
        ids: list[int] = []
        for role, content in messages:
            ids += [ROLE_TOKENS[role], *self.encode(content), END_OF_MESSAGE]
        if add_generation_prompt:
            ids.append(ROLE_TOKENS["assistant"])
        return ids


class StreamDecoder:
    """Turns generated ids into text pieces, holding back bytes of a character that is not yet complete."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(bytes([token_id])) if token_id < 256 else ""

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
