"""Scheduler test fixtures: one CPU thread (the machine is shared), a tiny model that may consolidate
early (variable_chunks), and a fake clock."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_checkpoint
from model.hybrid import HybridLM

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def variable_checkpoint(tiny_checkpoint: Callable[..., Path]) -> Path:
    """A tiny lagged checkpoint (d_model 32, window 8) with variable_chunks=True."""
    return tiny_checkpoint(schedule="lagged", variable_chunks=True)


@pytest.fixture(scope="session")
def model(variable_checkpoint: Path) -> HybridLM:
    return load_checkpoint(variable_checkpoint)


class FakeClock:
    """A clock that only moves when told."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
