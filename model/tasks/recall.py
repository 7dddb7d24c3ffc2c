"""Recall across windows: facts stated in a chat, filler turns that push them out of the window several
times over, then a question about one of them (paper §3: the context the answer needs was evicted).

Layout of RecallTask(facts=2, min_filler=1, max_filler=3), window 31:

    context  "U: code for locker 49 is 6890. " "U: code for locker 97 is 0663. "  facts, whole per window
             "..............A: a walk later. " "..U: tell me a fact. A: it is. "
             "............U: tell me a fact. "                                  filler windows
    query    "U: code for locker 49? A: "
    answer   "6890"

Lockers are distinct two-digit numbers, codes four digits. The filler windows (the difficulty: how many
whole windows lie between the last fact and the question) are chat turns drawn from FILLER_TURNS,
left-padded with "." to the window; windows of filler before the facts make up the rest of max_filler,
so that every example has the same length. `questions` > 1 asks for several lockers at once, answered by their
codes joined with ",". `solve` answers from the text alone, as a check of the task.
"""

from __future__ import annotations

import random
import re

from model.tasks.base import Example, choose_difficulty, pad_window

FILLER_TURNS = (
    "A: noted. ",
    "U: how was your day? ",
    "A: quiet, thanks. ",
    "U: any plans? ",
    "A: a walk later. ",
    "U: nice weather. ",
    "A: it is. ",
    "U: tell me a fact. ",
    "A: owls can't move their eyes. ",
)
FACT = re.compile(r"code for locker (\d\d) is (\d{4})\.")


def fact_text(locker: int, code: int) -> str:
    return f"U: code for locker {locker:02d} is {code:04d}. "


def query_text(lockers: list[int]) -> str:
    return f"U: code for locker {','.join(f'{n:02d}' for n in lockers)}? A: "


class RecallTask:
    name = "recall"

    def __init__(
        self,
        facts: int = 2,
        min_filler: int = 1,
        max_filler: int = 4,
        questions: int = 1,
        window: int | None = None,
    ) -> None:
        if not 1 <= questions <= facts <= 100 or not 0 <= min_filler <= max_filler:
            raise ValueError("need 1 <= questions <= facts <= 100 and 0 <= min_filler <= max_filler")
        self.facts, self.questions = facts, questions
        self.difficulties = range(min_filler, max_filler + 1)
        longest_turn = max(len(turn) for turn in FILLER_TURNS)
        query = len(query_text(list(range(questions)))) + 5 * questions - 1
        natural = max(len(fact_text(0, 0)), longest_turn, query)
        if window is not None and window < natural:
            raise ValueError(f"window {window} is smaller than the layout needs ({natural})")
        self.window = natural if window is None else window

    def example(self, rng: random.Random, difficulty: int | None = None) -> Example:
        filler = choose_difficulty(rng, self.difficulties, difficulty)
        lockers = rng.sample(range(100), self.facts)
        codes = {n: rng.randrange(10_000) for n in lockers}
        # Filler before the facts too, so that every example has the same length whatever its distance.
        before = [self._filler_window(rng) for _ in range(self.difficulties[-1] - filler)]
        after = [self._filler_window(rng) for _ in range(filler)]
        windows = before + self._pack([fact_text(n, codes[n]) for n in lockers]) + after
        asked = rng.sample(lockers, self.questions)
        return Example(
            context="".join(windows),
            query=query_text(asked),
            answer=",".join(f"{codes[n]:04d}" for n in asked),
            difficulty=filler,
        )

    def _pack(self, pieces: list[str]) -> list[str]:
        """Whole pieces per window, each window left-padded to `window` characters."""
        windows, current = [], ""
        for piece in pieces:
            if current and len(current) + len(piece) > self.window:
                windows.append(pad_window(current, self.window))
                current = ""
            current += piece
        return [*windows, pad_window(current, self.window)]

    def _filler_window(self, rng: random.Random) -> str:
        text = ""
        while True:
            turn = rng.choice(FILLER_TURNS)
            if len(text) + len(turn) > self.window:
                return pad_window(text, self.window)
            text += turn


def solve(text: str) -> str:
    """The answer to a recall example's `context + query`, from the text alone."""
    context, question = text.rsplit("U: code for locker ", 1)
    codes = dict(FACT.findall(context))
    return ",".join(codes[n] for n in question.split("?")[0].split(","))
