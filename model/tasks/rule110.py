"""Rule 110 (paper §4, §6.1): K random binary strings, one per window; predict cell 0 of each after t steps.

Layout of Rule110Task(cells=10, strings=2, min_steps=1, max_steps=6, filler_windows=1), window 12:

    context  "3:1101111110" "3:0100101001" "............"   one string per window, then filler windows
    query    "?"
    answer   "01"                                           cell 0 of string i after t steps, i = 0..K-1

The step count t (the difficulty) is drawn per example and shared by all its strings. When
min_steps < max_steps it is written before every string as zero-padded decimal (as many digits as
max_steps) and ":"; when min_steps == max_steps it is fixed and not written. The paper's config,
Rule110Task(cells=24, strings=4, min_steps=t, max_steps=t, filler_windows=0), has window 24: 96 state
characters, "?" and 4 labels. A `window` wider than the layout left-pads each string window with ".".

Boundary is periodic; new[i] = f(old[i-1], old[i], old[i+1]) with the rule table
111→0, 110→1, 101→1, 100→0, 011→1, 010→1, 001→1, 000→0 (the bits of 110).
"""

from __future__ import annotations

import random

from model.tasks.base import FILLER, Example, choose_difficulty, pad_window

QUERY = "?"
RULE = 110


def rule110_step(cells: list[int]) -> list[int]:
    """One Rule 110 step with periodic boundary."""
    n = len(cells)
    return [(RULE >> (4 * cells[i - 1] + 2 * cells[i] + cells[(i + 1) % n])) & 1 for i in range(n)]


class Rule110Task:
    name = "rule110"

    def __init__(
        self,
        cells: int = 10,
        strings: int = 2,
        min_steps: int = 1,
        max_steps: int = 6,
        filler_windows: int = 1,
        window: int | None = None,
    ) -> None:
        if cells < 1 or strings < 1 or filler_windows < 0 or not 0 <= min_steps <= max_steps:
            raise ValueError(
                "need cells >= 1, strings >= 1, filler_windows >= 0, 0 <= min_steps <= max_steps"
            )
        self.cells, self.strings, self.filler_windows = cells, strings, filler_windows
        self.difficulties = range(min_steps, max_steps + 1)
        self.step_digits = len(str(max_steps)) if min_steps < max_steps else 0
        prefix = self.step_digits + 1 if self.step_digits else 0
        natural = max(prefix + cells, len(QUERY) + strings)
        if window is not None and window < natural:
            raise ValueError(f"window {window} is smaller than the layout needs ({natural})")
        self.window = natural if window is None else window

    def example(self, rng: random.Random, difficulty: int | None = None) -> Example:
        t = choose_difficulty(rng, self.difficulties, difficulty)
        prefix = f"{t:0{self.step_digits}d}:" if self.step_digits else ""
        windows, labels = [], []
        for _ in range(self.strings):
            cells = [rng.randrange(2) for _ in range(self.cells)]
            windows.append(pad_window(prefix + "".join(map(str, cells)), self.window))
            for _ in range(t):
                cells = rule110_step(cells)
            labels.append(str(cells[0]))
        windows += [FILLER * self.window] * self.filler_windows
        return Example(context="".join(windows), query=QUERY, answer="".join(labels), difficulty=t)
