"""Synthetic tasks: answers checked by independent solvers that parse the example text, plus layout invariants."""

from __future__ import annotations

import random
import re
import sys
from collections.abc import Callable

import pytest

from model.tasks import (
    TASKS,
    ChainsTask,
    Example,
    HopsTask,
    RecallTask,
    Rule110Task,
    Task,
    generate,
    make_task,
)
from model.tasks.recall import solve

COUNT = 200

CONFIGS: list[tuple[str, dict[str, int]]] = [
    ("rule110", {}),
    (
        "rule110",
        {"cells": 24, "strings": 4, "min_steps": 4, "max_steps": 4, "filler_windows": 0, "window": 24},
    ),
    ("rule110", {"cells": 24, "strings": 4, "min_steps": 0, "max_steps": 16, "filler_windows": 2}),
    ("rule110", {"cells": 8, "strings": 3, "min_steps": 2, "max_steps": 5, "window": 16}),
    ("hops", {}),
    ("hops", {"nodes": 7, "context_windows": 3, "max_hops": 9, "name_len": 1}),
    ("hops", {"nodes": 50, "context_windows": 4, "max_hops": 16, "window": 80}),
    ("chains", {}),
    ("chains", {"modulus": 10, "max_ops": 4, "context_windows": 2, "statements_per_window": 4}),
    ("chains", {"min_ops": 2, "max_ops": 12, "context_windows": 4, "statements_per_window": 5, "window": 60}),
    ("recall", {}),
    ("recall", {"facts": 6, "min_filler": 2, "max_filler": 8, "questions": 2, "window": 64}),
]
IDS = [f"{name}-{'-'.join(f'{k}{v}' for k, v in knobs.items()) or 'default'}" for name, knobs in CONFIGS]


def windows(ex: Example, window: int) -> list[str]:
    return [ex.context[i : i + window] for i in range(0, len(ex.context), window)]


NEIGHBOURHOOD = {
    "111": "0",
    "110": "1",
    "101": "1",
    "100": "0",
    "011": "1",
    "010": "1",
    "001": "1",
    "000": "0",
}


def solve_rule110(task: Task, ex: Example) -> tuple[str, int]:
    assert ex.query == "?"
    strings = [w.lstrip(".") for w in windows(ex, task.window) if w.strip(".")]
    assert len(strings) == len(ex.answer)
    labels, steps = "", set()
    for text in strings:
        if ":" in text:
            t_text, cells = text.split(":")
            t = int(t_text)
        else:
            cells, t = text, ex.difficulty  # t fixed by the config, not written
        assert set(cells) <= {"0", "1"}
        steps.add(t)
        for _ in range(t):
            n = len(cells)
            cells = "".join(NEIGHBOURHOOD[cells[i - 1] + cells[i] + cells[(i + 1) % n]] for i in range(n))
        labels += cells[0]
    assert len(steps) == 1  # one t per example
    return labels, steps.pop()


def solve_hops(task: Task, ex: Example) -> tuple[str, int]:
    for w in windows(ex, task.window):
        assert re.fullmatch(r"\.*([a-z]+>[a-z]+,)+", w), w
    edges = re.findall(r"([a-z]+)>([a-z]+),", ex.context)
    succ = dict(edges)
    assert len(succ) == len(edges) == len(set(succ.values()))  # each node has one successor, one predecessor
    node, seen = edges[0][0], set()
    while node not in seen:
        seen.add(node)
        node = succ[node]
    assert seen == set(succ)  # a single cycle through every node
    match = re.fullmatch(r"(\d+) hops after ([a-z]+)\?", ex.query)
    assert match
    k, node = int(match[1]), match[2]
    for _ in range(k):
        node = succ[node]
    return node, k


STATEMENT = r"([a-z]{2})=([a-z]{2}|\d{2})([-+*])([a-z]{2}|\d{2});"


def solve_chains(task: Task, ex: Example) -> tuple[str, int]:
    assert isinstance(task, ChainsTask)
    assert ex.query == "="
    first, *rest = windows(ex, task.window)
    match = re.fullmatch(rf"\.*\?([a-z]{{2}});({STATEMENT})*", first)
    assert match, first
    asked = match[1]
    for w in rest:
        assert re.fullmatch(rf"\.*({STATEMENT})+", w), w
    values: dict[str, int] = {}
    deps: dict[str, list[str]] = {}
    for name, a, op, b in re.findall(STATEMENT, ex.context):
        assert name not in values  # assigned once
        operands = [values[x] if x.isalpha() else int(x) for x in (a, b)]  # KeyError: used before assignment
        assert all(0 < int(x) < task.modulus for x in (a, b) if x.isdigit())
        x, y = operands
        values[name] = {"+": x + y, "-": x - y, "*": x * y}[op] % task.modulus
        deps[name] = [x for x in (a, b) if x.isalpha()]
    closure, todo = set(), [asked]
    while todo:
        name = todo.pop()
        if name not in closure:
            closure.add(name)
            todo += deps[name]
    return f"{values[asked]:02d}", len(closure)  # one operation per statement


def solve_recall(task: Task, ex: Example) -> tuple[str, int]:
    """Codes from the fact statements (each within one window), the distance as whole filler windows
    after the window of the last fact."""
    windows = [ex.context[i : i + task.window] for i in range(0, len(ex.context), task.window)]
    last_fact = max(i for i, w in enumerate(windows) if "locker" in w)
    codes = dict(re.findall(r"locker (\d\d) is (\d{4})\.", ex.context))
    asked = re.fullmatch(r"U: code for locker ([\d,]+)\? A: ", ex.query)[1].split(",")
    assert solve(ex.context + ex.query) == ",".join(codes[n] for n in asked)  # the module's own solver
    return ",".join(codes[n] for n in asked), len(windows) - 1 - last_fact


SOLVERS: dict[str, Callable[[Task, Example], tuple[str, int]]] = {
    "rule110": solve_rule110,
    "hops": solve_hops,
    "chains": solve_chains,
    "recall": solve_recall,
}


@pytest.mark.parametrize(("name", "knobs"), CONFIGS, ids=IDS)
def test_answers_layout_and_difficulties(name: str, knobs: dict[str, int]) -> None:
    task = make_task(name, **knobs)
    examples = generate(task, seed=0, count=COUNT)
    assert len(examples) == COUNT
    lengths = {(len(ex.context), len(ex.query), len(ex.answer)) for ex in examples}
    assert len(lengths) == 1  # batches stack without padding
    (context_len, query_len, answer_len) = lengths.pop()
    assert context_len % task.window == 0 and context_len >= task.window
    assert query_len + answer_len <= task.window and answer_len > 0
    for ex in examples:
        assert all(" " <= c <= "~" for c in ex.context + ex.query + ex.answer)
        assert (ex.answer, ex.difficulty) == SOLVERS[name](task, ex)
    assert {ex.difficulty for ex in examples} == set(task.difficulties)
    assert len({ex.answer for ex in examples}) > 1


@pytest.mark.parametrize(("name", "knobs"), CONFIGS, ids=IDS)
def test_forced_difficulty(name: str, knobs: dict[str, int]) -> None:
    task = make_task(name, **knobs)
    rng = random.Random(1)
    for d in task.difficulties:
        for _ in range(3):
            ex = task.example(rng, difficulty=d)
            assert ex.difficulty == d
            assert (ex.answer, d) == SOLVERS[name](task, ex)
    with pytest.raises(ValueError):
        task.example(rng, difficulty=task.difficulties[-1] + 1)


@pytest.mark.parametrize("name", TASKS)
def test_determinism_by_seed(name: str) -> None:
    task = make_task(name)
    state = random.getstate()
    assert generate(task, 7, 20) == generate(task, 7, 20)
    assert generate(task, 7, 20) != generate(task, 8, 20)
    assert random.getstate() == state  # no global RNG


def test_make_task_and_knobs() -> None:
    assert isinstance(make_task("rule110"), Rule110Task)
    assert isinstance(make_task("hops", nodes=10), HopsTask)
    assert isinstance(make_task("chains", modulus=10), ChainsTask)
    with pytest.raises(ValueError, match="unknown task"):
        make_task("sudoku")
    assert Rule110Task(cells=24, strings=4, min_steps=32, max_steps=32, filler_windows=0).window == 24
    assert Rule110Task(cells=24, strings=4, min_steps=4, max_steps=16).window == 27  # "16:" prefix
    with pytest.raises(ValueError):
        Rule110Task(cells=24, strings=4, min_steps=4, max_steps=16, window=24)
    with pytest.raises(ValueError):
        HopsTask(nodes=24, window=20)
    with pytest.raises(ValueError):
        ChainsTask(max_ops=10, context_windows=2, statements_per_window=4)


def test_paper_rule110_layout() -> None:
    """Paper §6.1: 4 strings of 24 cells, one per 24-token window, then the 4 labels (fixed t, not written)."""
    task = Rule110Task(cells=24, strings=4, min_steps=32, max_steps=32, filler_windows=0, window=24)
    ex = task.example(random.Random(0))
    assert len(ex.context) == 96 and set(ex.context) <= {"0", "1"}
    assert len(ex.answer) == 4 and ex.difficulty == 32


@pytest.mark.parametrize(
    ("task", "seed"),
    [
        (Rule110Task(cells=10, strings=2, min_steps=1, max_steps=6, filler_windows=1), 0),
        (HopsTask(nodes=6, context_windows=2, max_hops=4, name_len=1), 0),
        (ChainsTask(max_ops=3, context_windows=2, statements_per_window=3), 1),
        (RecallTask(facts=2, min_filler=1, max_filler=3), 0),
    ],
    ids=["rule110", "hops", "chains", "recall"],
)
def test_docstring_examples(task: Task, seed: int) -> None:
    """Each module docstring's literal example is what the task generates (seed as given, difficulty 3);
    a field may go on over lines that start with a quote."""
    doc = sys.modules[type(task).__module__].__doc__ or ""
    fields: dict[str, str] = {}
    for m in re.finditer(r"^ +(\w+)? +(\".*)$", doc, re.M):
        name = m[1] or list(fields)[-1]
        fields[name] = fields.get(name, "") + "".join(re.findall(r'"([^"]*)"', m[2]))
    ex = task.example(random.Random(seed), difficulty=3)
    assert fields == {"context": ex.context, "query": ex.query, "answer": ex.answer}
    assert f"window {task.window}:" in doc
