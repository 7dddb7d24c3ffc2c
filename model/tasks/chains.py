"""GSM-Infinite-like arithmetic (paper §6.3): question first, then assignments mod 23 with distractors.

Layout of ChainsTask(max_ops=3, context_windows=2, statements_per_window=3), window 31:

    context  "?tn;fh=04-07;wk=fh+09;cm=01*04;" "....kb=18-01;eq=22-kb;tn=17-eq;"
    query    "="
    answer   "12"                              tn = 17 - (22 - (18 - 1)) mod 23, 3 operations

The first window opens with the question "?v;" naming the variable asked for. Every statement is one
binary operation "v=a op b;" with op in "+", "-", "*" (computed mod `modulus`, default 23), operands
either variables defined earlier or constants 1..modulus-1. Names are two distinct lowercase letters,
constants and the answer are two zero-padded digits, so every statement is 9 characters and windows
after the first are left-padded with "." to `window`. The asked variable's chain has exactly
`difficulty` operations: its statements use only the previous chain variable, earlier chain variables
and constants. The other statements are distractors (over constants and any earlier variables), and
the chain statements are scattered among them at random positions.
"""

from __future__ import annotations

import itertools
import random
import string

from model.tasks.base import Example, choose_difficulty, pad_window

QUERY = "="
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
NAMES = ["".join(p) for p in itertools.product(string.ascii_lowercase, repeat=2)]


class ChainsTask:
    name = "chains"

    def __init__(
        self,
        modulus: int = 23,
        min_ops: int = 1,
        max_ops: int = 8,
        context_windows: int = 3,
        statements_per_window: int = 6,
        window: int | None = None,
    ) -> None:
        self.statements = context_windows * statements_per_window
        if not 2 <= modulus <= 100 or not 1 <= min_ops <= max_ops <= self.statements <= len(NAMES):
            raise ValueError("need 2 <= modulus <= 100 and 1 <= min_ops <= max_ops <= statements <= 676")
        self.modulus = modulus
        self.statements_per_window = statements_per_window
        self.difficulties = range(min_ops, max_ops + 1)
        natural = len("?xx;") + statements_per_window * len("xx=xx+xx;")
        if window is not None and window < natural:
            raise ValueError(f"window {window} is smaller than the layout needs ({natural})")
        self.window = natural if window is None else window

    def example(self, rng: random.Random, difficulty: int | None = None) -> Example:
        ops = choose_difficulty(rng, self.difficulties, difficulty)
        names = rng.sample(NAMES, self.statements)
        on_chain = set(rng.sample(range(self.statements), ops))
        values: dict[str, int] = {}
        chain: list[str] = []
        statements = []
        for i, name in enumerate(names):
            if i in on_chain:
                a = chain[-1] if chain else self._constant(rng)
                b = rng.choice(chain[:-1]) if len(chain) > 1 and rng.random() < 0.5 else self._constant(rng)
                chain.append(name)
            else:
                a, b = (
                    rng.choice(list(values)) if values and rng.random() < 0.5 else self._constant(rng)
                    for _ in "ab"
                )
            if rng.random() < 0.5:
                a, b = b, a
            op = rng.choice(list(OPS))
            values[name] = OPS[op](*(values[x] if x.isalpha() else int(x) for x in (a, b))) % self.modulus
            statements.append(f"{name}={a}{op}{b};")
        asked = chain[-1]
        per = self.statements_per_window
        chunks = ["".join(statements[i : i + per]) for i in range(0, self.statements, per)]
        chunks[0] = f"?{asked};" + chunks[0]
        context = "".join(pad_window(chunk, self.window) for chunk in chunks)
        return Example(context=context, query=QUERY, answer=f"{values[asked]:02d}", difficulty=ops)

    def _constant(self, rng: random.Random) -> str:
        return f"{rng.randrange(1, self.modulus):02d}"
