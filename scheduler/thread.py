"""Sleep on worker threads: each pops the earliest job together with the queued jobs of the same chunk
length and depth and runs them as one batched `model.sleep` through its sleeper: `LocalSleeper` (the
thread sleeper: on the worker thread itself, under `torch.no_grad()`; on CUDA inside the worker's own
stream, synchronised before the result is published, so sleep overlaps the decode loop on the device)
or a child process's (`scheduler.process.ProcessSleeper`)."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future

import torch
from torch import Tensor

from model.hybrid import HybridLM
from scheduler.executor import Memory, Sleeper, SleepExecutor, SleepResult
from scheduler.jobs import ConsolidationJob

log = logging.getLogger("sleepserve.scheduler")


class LocalSleeper:
    """Runs `model.sleep` on the calling thread (on CUDA in that thread's own stream)."""

    def __init__(self, model: HybridLM) -> None:
        self.model = model
        self._streams = threading.local()

    def __call__(self, memory: Memory, chunk: Tensor, passes: int) -> Memory:
        device = self.model.device
        if device.type != "cuda":
            with torch.no_grad():
                return self.model.sleep(memory, chunk, passes)
        stream = getattr(self._streams, "stream", None)
        if stream is None:
            stream = self._streams.stream = torch.cuda.Stream(device)
        with torch.no_grad(), torch.cuda.stream(stream):
            stream.wait_stream(torch.cuda.default_stream(device))  # inputs were made on the decode stream
            out = self.model.sleep(memory, chunk, passes)
        stream.synchronize()
        for m in out:  # consumed on the default stream: free only after its use there
            m.record_stream(torch.cuda.default_stream(device))
        return out

    def close(self) -> None:
        pass


class WorkerExecutor(SleepExecutor):
    """Runs consolidation jobs on `workers` threads, each with a sleeper of its own from `make_sleeper`
    (isolation "thread": a `LocalSleeper`; "process": a `ProcessSleeper`, to which the worker thread
    hands its batches). A job without N gets the depth policy's choice at submission, from its slack
    and the work queued ahead of it (`_choose_passes`). A worker may hold the earliest job back up to
    `batch_wait` for equal jobs (of the same shape) to join its batch."""

    def __init__(
        self,
        model: HybridLM,
        make_sleeper: Callable[[], Sleeper],
        *,
        workers: int = 1,
        isolation: str = "thread",
        **kw,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be positive, got {workers}")
        super().__init__(model, **kw)
        self.isolation = isolation
        self._sleepers = [make_sleeper() for _ in range(workers)]
        self._threads = [
            threading.Thread(target=self._work, args=(sleeper,), name=f"sleepserve-sleep-{i}", daemon=True)
            for i, sleeper in enumerate(self._sleepers)
        ]
        for thread in self._threads:
            thread.start()

    def _timing_sleeper(self) -> Sleeper:
        return self._sleepers[0]

    def _plan(self, job: ConsolidationJob, rows: int) -> None:
        job.passes = self._choose_passes(job, rows)

    def _stop(self, wait: bool, cancel_pending: bool) -> None:
        if wait:
            for thread in self._threads:
                thread.join()
            for sleeper in self._sleepers:
                sleeper.close()

    def _choose_passes(self, job: ConsolidationJob, rows: int) -> int:
        """The policy's depth for `job` in a batch of `rows` equal chunks, or that of a deeper queued
        batch of equal chunks with room for it: riding along costs that batch little, where a batch of
        its own would cost a whole batch and make everything behind it later. It rides along only if
        it still finishes by its deadline: after the work due before it, plus that batch's own cost
        (one row more) where the batch was not due before it (EDF then runs the batch at the job's
        turn)."""
        assert self.policy is not None
        ahead = self._work_ahead(job.deadline)
        chosen = self.policy.choose(job.tokens, job.deadline, ahead, rows)
        batches: dict[int, list[float]] = {}  # passes -> deadlines of the queued equal jobs
        for j in self._queue.snapshot():
            if j.tokens == job.tokens and j.passes is not None:
                batches.setdefault(j.passes, []).append(j.deadline)
        for passes, deadlines in sorted(batches.items(), reverse=True):
            room = len(deadlines) % self.max_batch
            if passes <= chosen or not room:
                continue
            due_later = min(deadlines) > job.deadline
            own = self.policy.estimate(job.tokens, passes, room + 1) if due_later else 0.0
            if self.clock() + ahead + own <= job.deadline:
                return passes
        return chosen

    def _work_ahead(self, deadline: float) -> float:
        """Planned seconds of queued and running work that runs before a job due at `deadline`. Equal
        jobs run as one batch (of up to `max_batch`), which costs far less than its jobs one by one,
        so the work is counted in batches of their sizes, not in jobs."""
        assert self.policy is not None
        with self._cond:
            queued = [j for j in self._queue.snapshot() if j.deadline <= deadline]
            running = list(self._running.values())
        total = 0.0
        for jobs in (queued, running):
            for (tokens, passes), count in Counter(
                (j.tokens, j.passes or self.policy.min_passes) for j in jobs
            ).items():
                full, rest = divmod(count, self.max_batch)
                total += full * self.policy.estimate(tokens, passes, self.max_batch)
                total += self.policy.estimate(tokens, passes, rest) if rest else 0.0
        return total / len(self._threads)

    def _work(self, sleeper: Sleeper) -> None:
        while True:
            with self._cond:
                batch = self._next_batch()
                if not batch:
                    return  # closed and drained
                items = [(job, self._futures.pop(job.id)) for job in batch]
                items = [(job, f) for job, f in items if f.set_running_or_notify_cancel()]
                self._running.update((job.id, job) for job, _ in items)
                self._set_depth()
            try:
                if items:
                    self._run(items, sleeper)
            finally:
                self._release([job for job, _ in items])

    def _shed(self, jobs: list[ConsolidationJob]) -> None:
        """As a batch of adaptive jobs (their N the policy's) starts, cut its N to the passes that still
        fit before its earliest deadline (planned costs), never below `min_passes`: a shallower sleep on
        time rather than a deep one late, where the queue ahead of it took longer than planned. (Fixed
        depths are the operator's: never cut.)"""
        if self.policy is None or not all(job.adaptive for job in jobs):
            return
        per_pass = self.policy.pass_seconds(jobs[0].tokens, len(jobs))
        slack = min(job.deadline for job in jobs) - self.clock()
        fit = math.floor(slack / per_pass + 1e-9) if per_pass > 0 else self.policy.max_passes
        passes = max(self.policy.min_passes, min(jobs[0].passes or 1, fit))
        for job in jobs:
            job.passes = passes

    def _next_batch(self) -> list[ConsolidationJob]:
        """The next batch to run, held back up to `batch_wait`; empty once closed and drained. Called
        with `_cond` held."""
        while True:
            while not len(self._queue) and not self._closed:
                self._cond.wait()
            self._wait_for_batch()
            batch = self._queue.pop_batch(self.max_batch)
            if batch or self._closed:
                return batch  # else the jobs it waited on were cancelled meanwhile: wait again

    def _wait_for_batch(self) -> None:
        """Hold the earliest job back (see `batch_wait`); called with `_cond` held."""
        started = time.monotonic()
        while self.batch_wait and not self._closed:
            queued = self._queue.snapshot()
            if not queued:  # cancelled meanwhile
                return
            left = self._hold_left(queued, started)
            if left <= 0:
                return
            self._cond.wait(left)

    def _run(self, items: list[tuple[ConsolidationJob, Future[SleepResult]]], sleeper: Sleeper) -> None:
        jobs = [job for job, _ in items]
        assert jobs[0].passes is not None
        self._shed(jobs)
        start = self.clock()
        try:
            out = sleeper(*self._inputs(jobs), jobs[0].passes)
        except BaseException as exc:
            if len(items) == 1 or not isinstance(exc, Exception):
                self._fail(items, exc)
                return
            # Not tied to a job: run each alone, so that only the one that fails again fails.
            log.warning("a sleep batch of %d failed (%s): running its jobs one by one", len(items), exc)
            for item in items:
                self._run([item], sleeper)
            return
        self._publish(items, out, [self.clock() - start] * len(items))
