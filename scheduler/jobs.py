"""Consolidation jobs and their earliest-deadline-first queue."""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor

Trigger = Literal["window_full", "idle", "explicit"]

_ids = itertools.count(1)


@dataclass
class ConsolidationJob:
    """Sleep on `chunk` starting from `memory` (one [H, K, V] tensor per gdn layer, not modified).

    `passes` is N; None lets the executor's depth policy choose it (`adaptive`: it did, and may shed
    passes that would miss the deadline, down to `min_passes`). `deadline` is a
    `time.monotonic()` instant: when the session needs the result. `deadline_estimated`: only an
    estimate of it (a lagged session's next boundary, tokens away at the decode rate): the job is then
    late only if its session comes to wait for it (`SleepExecutor.due_now`), not if it ends after the
    estimate but before its session gets there.
    """

    session: str
    chunk: list[int]
    memory: list[Tensor]
    passes: int | None
    deadline: float
    trigger: Trigger = "window_full"
    deadline_estimated: bool = False
    adaptive: bool = False
    id: int = field(default_factory=lambda: next(_ids))
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def tokens(self) -> int:
        return len(self.chunk)

    @property
    def shape(self) -> tuple[int, int | None]:
        """Jobs of equal shape (chunk length, passes) run as one batched sleep."""
        return self.tokens, self.passes


class JobQueue:
    """Thread-safe EDF queue: earliest deadline first, ties in enqueue order."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, ConsolidationJob]] = []
        self._order = itertools.count()
        self._lock = threading.Lock()

    def push(self, job: ConsolidationJob) -> None:
        with self._lock:
            heapq.heappush(self._heap, (job.deadline, next(self._order), job))

    def pop_batch(self, max_batch: int) -> list[ConsolidationJob]:
        """The earliest job plus up to `max_batch - 1` more with the same chunk length and passes, in
        EDF order (they run as one batched `model.sleep`). Empty when the queue is."""
        with self._lock:
            if not self._heap:
                return []
            first = heapq.heappop(self._heap)[2]
            batch, rest = [first], []
            for entry in sorted(self._heap):
                job = entry[2]
                if len(batch) < max_batch and job.shape == first.shape:
                    batch.append(job)
                else:
                    rest.append(entry)
            if len(batch) > 1:
                self._heap = rest
                heapq.heapify(self._heap)
            return batch

    def remove(self, jobs: list[ConsolidationJob]) -> None:
        """Remove these queued jobs."""
        ids = {job.id for job in jobs}
        self._take(lambda job: job.id in ids)

    def reschedule(self, job: ConsolidationJob) -> None:
        """Put `job` back in EDF order after its deadline changed (nothing if it is not queued)."""
        with self._lock:
            for i, (_, order, queued) in enumerate(self._heap):
                if queued.id == job.id:
                    self._heap[i] = (job.deadline, order, queued)
                    heapq.heapify(self._heap)
                    return

    def cancel(self, session: str) -> list[ConsolidationJob]:
        """Remove and return the queued jobs of `session`."""
        return self._take(lambda job: job.session == session)

    def _take(self, match: Callable[[ConsolidationJob], bool]) -> list[ConsolidationJob]:
        """Remove and return the queued jobs that `match`."""
        with self._lock:
            taken = [entry[2] for entry in self._heap if match(entry[2])]
            if taken:
                self._heap = [entry for entry in self._heap if not match(entry[2])]
                heapq.heapify(self._heap)
            return taken

    def clear(self) -> list[ConsolidationJob]:
        """Remove and return every queued job (EDF order)."""
        with self._lock:
            jobs = [entry[2] for entry in sorted(self._heap)]
            self._heap = []
            return jobs

    def snapshot(self) -> list[ConsolidationJob]:
        """The queued jobs in EDF order (a copy)."""
        with self._lock:
            return [entry[2] for entry in sorted(self._heap)]

    def __len__(self) -> int:
        with self._lock:
            return len(self._heap)
