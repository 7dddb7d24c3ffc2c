"""Turning logits into tokens: sampling (greedy, temperature, top-k, top-p), the finite-logits check,
and stop strings found as the text arrives."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from server.sequence import SamplingParams


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from finite logits [vocab]: argmax at temperature 0, else top-k / top-p sampling.
    Safe at any temperature > 0: the logits are shifted to a maximum of 0 before the division, so they
    scale to [-inf, 0] and the likeliest token keeps probability > 0; a temperature below float32's
    smallest normal number (which float32 would round to 0) divides as that number, greedy either way."""
    if params.temperature == 0:
        return int(logits.argmax())
    logits = logits.float()
    logits = (logits - logits.max()) / max(params.temperature, _FLOAT32_TINY)
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        probs = ordered.softmax(-1)
        drop = probs.cumsum(-1) - probs > params.top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


_FLOAT32_TINY = torch.finfo(torch.float32).tiny


class StopMatcher:
    """Finds stop strings in text that arrives piece by piece, in time linear in the text: one
    Knuth-Morris-Pratt automaton per stop string, each in the state "the longest prefix of the stop
    string that the text ends with"."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.fallback = [_prefix_function(stop) for stop in stops]
        self.matched = [0] * len(stops)

    def feed(self, piece: str, offset: int) -> int | None:
        """Feed `piece`, which starts at `offset` of the text: where the first stop string to complete
        begins (the longest, when several complete at one character), or None."""
        for i, char in enumerate(piece):
            longest = 0
            for j, stop in enumerate(self.stops):
                k = self.matched[j]
                while k and stop[k] != char:
                    k = self.fallback[j][k - 1]
                k += stop[k] == char
                if k == len(stop):
                    longest = max(longest, k)
                    k = self.fallback[j][k - 1]  # the automaton stays usable past a match
                self.matched[j] = k
            if longest:
                return offset + i + 1 - longest
        return None

    @property
    def partial(self) -> int:
        """Characters at the end of the text that may still grow into a stop string."""
        return max(self.matched, default=0)


def _prefix_function(pattern: str) -> list[int]:
    """KMP: for each prefix of `pattern`, the length of its longest proper border."""
    border = [0] * len(pattern)
    k = 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = border[k - 1]
        k += pattern[i] == pattern[k]
        border[i] = k
    return border


def finite_rows(logits: Tensor) -> list[bool]:
    """Whether each row of logits [B, vocab] is finite: one check (and one device sync) per batch."""
    return torch.isfinite(logits).all(-1).tolist()
