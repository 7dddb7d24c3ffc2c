"""Log-probabilities: the engine's scoring of tokens (`TokenLogprob`), and OpenAI's two formats of them.

Completions: parallel lists of token texts, their log-probabilities (None for a first token that follows
nothing), dicts of the likeliest alternatives with the token itself, and where each token starts in the
choice's text. Chat: a list of entries, each with the token's UTF-8 bytes and its alternatives.

A token's text is its own decoding (as vLLM): one that holds part of a character shows U+FFFD.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from server.schemas import ChatLogprobs, CompletionLogprobs, TopLogprob
from server.schemas import TokenLogprob as ChatTokenLogprob

FLOOR = -9999.0  # JSON has no -inf: a token the model rules out gets this instead (as vLLM)


@dataclass(frozen=True)
class TokenLogprob:
    """A token, its log-probability and the likeliest alternatives at its position, as (id, logprob)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def token_logprobs(logits: Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """The log-probabilities of `tokens` [T] under logits [T, vocab] (row t predicts tokens[t]), each
    with its `top` likeliest alternatives."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
    values, ids = logp.topk(top, dim=-1) if top else (logp[:, :0], logp[:, :0].long())
    return [
        TokenLogprob(token, logprob, tuple(zip(row_ids, row_values, strict=True)))
        for token, logprob, row_ids, row_values in zip(
            tokens, chosen, ids.tolist(), values.tolist(), strict=True
        )
    ]


class LogprobFormatter:
    """Formats a request's scored tokens chunk by chunk; completions' text offsets run on across calls."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.offset = 0  # where the next token starts in the choice's text

    def text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def completion(self, tokens: list[int], entries: list[TokenLogprob | None]) -> CompletionLogprobs:
        """`tokens` with their `entries`, the first starting at `self.offset` in the choice's text."""
        texts = [self.text(token) for token in tokens]
        offsets = []
        for text in texts:
            offsets.append(self.offset)
            self.offset += len(text)
        return CompletionLogprobs(
            tokens=texts,
            token_logprobs=[None if e is None else max(e.logprob, FLOOR) for e in entries],
            top_logprobs=[None if e is None else self._alternatives(e) for e in entries],
            text_offset=offsets,
        )

    def _alternatives(self, entry: TokenLogprob) -> dict[str, float]:
        top = {self.text(token): max(logprob, FLOOR) for token, logprob in entry.top}
        return top | {self.text(entry.token): max(entry.logprob, FLOOR)}

    def chat(self, entries: list[TokenLogprob]) -> ChatLogprobs:
        return ChatLogprobs(
            content=[
                ChatTokenLogprob(
                    **self._entry(e.token, e.logprob).model_dump(),
                    top_logprobs=[self._entry(token, logprob) for token, logprob in e.top],
                )
                for e in entries
            ]
        )

    def _entry(self, token: int, logprob: float) -> TopLogprob:
        text = self.text(token)
        return TopLogprob(token=text, logprob=max(logprob, FLOOR), bytes=list(text.encode("utf-8")))
