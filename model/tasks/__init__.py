"""Synthetic tasks for training and evaluating sleeping models; each module documents its text format."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from model.tasks.base import Example, Task, generate
from model.tasks.chains import ChainsTask
from model.tasks.hops import HopsTask
from model.tasks.recall import RecallTask
from model.tasks.rule110 import Rule110Task

TASKS: dict[str, Callable[..., Task]] = {
    "rule110": Rule110Task,
    "hops": HopsTask,
    "chains": ChainsTask,
    "recall": RecallTask,
}


def make_task(name: str, **knobs: Any) -> Task:
    """The task called `name` (a key of TASKS) built with `knobs`."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name](**knobs)


__all__ = [
    "TASKS",
    "ChainsTask",
    "Example",
    "HopsTask",
    "RecallTask",
    "Rule110Task",
    "Task",
    "generate",
    "make_task",
]
