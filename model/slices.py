"""Work done a slice at a time: a generator that yields between slices and returns its result, so a
caller can run it between other work (the decode thread runs a sleep between its steps) and a plain
call runs it whole (`run_to_end`). One code path either way."""

from __future__ import annotations

from collections.abc import Generator
from typing import TypeVar

Result = TypeVar("Result")
Slices = Generator[None, None, Result]


def run_to_end(slices: Slices[Result]) -> Result:
    """Run sliced work to its end and return its result (what `yield from` gives inside a generator)."""
    while True:
        try:
            next(slices)
        except StopIteration as end:
            return end.value
