"""What every synthetic task shares: the Example record, the Task protocol and `generate`.

An example is the text ``context + query + answer``. The context is one or more windows of exactly
`window` characters (each is consolidated, then evicted); query + answer is the final, partial chunk, and
only the answer is supervised. For one task config every example has the same three lengths, so batches
stack without padding. All text is printable ASCII (byte tokenizer: one character is one token).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol

FILLER = "."  # pads windows and fills filler windows


@dataclass(frozen=True)
class Example:
    context: str  # len(context) is a multiple of the task's window; every window exactly `window` chars
    query: str  # starts the final chunk; the model then must produce `answer`
    answer: str  # supervised tokens; len(query) + len(answer) <= window
    difficulty: int  # the task's difficulty knob (rule110: steps t; hops: k; chains: operations)


class Task(Protocol):
    name: str
    window: int
    difficulties: range

    def example(self, rng: random.Random, difficulty: int | None = None) -> Example: ...


def generate(task: Task, seed: int, count: int) -> list[Example]:
    """`count` examples of `task`, the same for the same seed (a private random.Random, no global RNG)."""
    rng = random.Random(seed)
    return [task.example(rng) for _ in range(count)]


def choose_difficulty(rng: random.Random, difficulties: range, difficulty: int | None) -> int:
    """`difficulty` if given (it must be one the task samples), else a uniform draw from `difficulties`."""
    if difficulty is None:
        return rng.choice(difficulties)
    if difficulty not in difficulties:
        raise ValueError(f"difficulty {difficulty} not in {difficulties}")
    return difficulty


def pad_window(text: str, window: int) -> str:
    """Left-pad one window's text with FILLER to exactly `window` characters."""
    if len(text) > window:
        raise ValueError(f"{len(text)} characters do not fit a window of {window}")
    return text.rjust(window, FILLER)
