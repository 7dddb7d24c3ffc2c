"""The in-process sleep executor: worker threads that run consolidation jobs off the decode path.

`submit(job)` queues a job (EDF) and returns a `concurrent.futures.Future` of its `SleepResult`. A
worker pops the earliest job together with the queued jobs of the same chunk length and depth, runs
them as one batched `model.sleep` under `torch.no_grad()` (on CUDA inside the worker's own stream,
synchronised before the result is published) and completes each job's future. The engine polls
`future.done()` between decode steps and swaps the memory in; when a session cannot go on without it
(its deadline), `future.result()` blocks, and that wait is the decode stall.

CPU threads: the decode loop and the sleep workers share torch's process-wide intra-op thread pool.
We do not partition it: on CPU a running sleep slows decode while it runs; on GPU the two overlap on
separate streams.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from model.hybrid import HybridLM
from scheduler.jobs import ConsolidationJob, JobQueue
from scheduler.policy import DepthPolicy


class _Gauge(Protocol):
    def set(self, value: float) -> None: ...


class _Counter(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class _Histogram(Protocol):
    def observe(self, amount: float) -> None: ...


class _LabelledHistogram(Protocol):
    def labels(self, *values: str, **labels: str) -> _Histogram: ...


class SleepMetrics(Protocol):
    """The executor's part of the server's metrics (duck-typed: `server.metrics.Metrics` fits)."""

    sleep_queue_depth: _Gauge
    sleep_duration: _LabelledHistogram
    sleep_passes: _Histogram
    sleep_tokens: _Counter
    sleep_deadline_misses: _Counter


@dataclass
class SleepResult:
    """A finished job: the new memory (one [H, K, V] tensor per gdn layer, on the model's device)."""

    job_id: int
    session: str
    memory: list[Tensor]
    tokens: int
    passes: int
    seconds: float  # wall time of the batch that ran the job
    finished: float  # clock time
    deadline_missed: bool
    batch_size: int
    after: Any = None  # what job.after returned


class SleepExecutor:
    """Runs consolidation jobs on `workers` threads, batching up to `max_batch` equal jobs."""

    def __init__(
        self,
        model: HybridLM,
        *,
        max_batch: int = 8,
        workers: int = 1,
        policy: DepthPolicy | None = None,
        metrics: SleepMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_batch < 1 or workers < 1:
            raise ValueError("max_batch and workers must be positive")
        self.model, self.max_batch, self.clock = model, max_batch, clock
        self.policy, self.metrics = policy, metrics
        self._queue = JobQueue()
        self._futures: dict[int, Future[SleepResult]] = {}
        self._running: dict[int, ConsolidationJob] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"sleepserve-sleep-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def __len__(self) -> int:
        """Jobs queued (not yet running)."""
        return len(self._queue)

    def calibrate(self, tokens: int, repeats: int = 2) -> float:
        """Time one pass over a chunk of `tokens` tokens on this thread and seed the policy with it.
        Returns seconds per pass."""
        memory = self.model.empty_memory(1)
        chunk = torch.zeros(1, tokens, dtype=torch.long, device=self.model.device)
        best = float("inf")
        with torch.no_grad():
            for _ in range(repeats):
                start = time.perf_counter()
                self.model.sleep(memory, chunk, 1)
                if self.model.device.type == "cuda":
                    torch.cuda.synchronize(self.model.device)
                best = min(best, time.perf_counter() - start)
        if self.policy is not None:
            self.policy.seed(tokens, best)
        return best

    def submit(self, job: ConsolidationJob) -> Future[SleepResult]:
        """Queue `job` and return the future of its result. A job without `passes` gets the policy's
        choice now (from its slack and the work queued ahead of it)."""
        if not job.chunk:
            raise ValueError("a consolidation job needs at least one token")
        if job.passes is None:
            if self.policy is None:
                raise ValueError("job.passes is None and the executor has no depth policy")
            job.passes = self.policy.choose(job.tokens, job.deadline, self._work_ahead(job.deadline))
        if job.passes < 1:
            raise ValueError(f"sleep needs at least one pass, got {job.passes}")
        future: Future[SleepResult] = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the sleep executor is shut down")
            self._futures[job.id] = future
            self._queue.push(job)
            self._set_depth()
            self._cond.notify()
        return future

    def cancel_session(self, session: str) -> int:
        """Drop the queued jobs of `session` (their futures are cancelled); a running one finishes.
        Returns how many were dropped."""
        with self._cond:
            jobs = self._queue.cancel(session)
            for job in jobs:
                self._futures.pop(job.id).cancel()
            self._set_depth()
        return len(jobs)

    def shutdown(self, wait: bool = True, cancel_pending: bool = False) -> None:
        """Stop taking jobs; the workers finish the queued ones (or cancel them) and exit."""
        with self._cond:
            self._closed = True
            if cancel_pending:
                for job in self._queue.clear():
                    self._futures.pop(job.id).cancel()
                self._set_depth()
            self._cond.notify_all()
        if wait:
            for thread in self._threads:
                thread.join()

    # -- workers ------------------------------------------------------------------------------------

    def _work_ahead(self, deadline: float) -> float:
        """Estimated seconds of queued and running work that runs before a job due at `deadline`."""
        assert self.policy is not None
        with self._cond:
            jobs = [j for j in self._queue.snapshot() if j.deadline <= deadline]
            jobs += list(self._running.values())
        total = sum(self.policy.estimate(j.tokens, j.passes or self.policy.min_passes) for j in jobs)
        return total / len(self._threads)

    def _set_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.sleep_queue_depth.set(len(self._queue))

    def _work(self) -> None:
        device = self.model.device
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        while True:
            with self._cond:
                while not len(self._queue) and not self._closed:
                    self._cond.wait()
                batch = self._queue.pop_batch(self.max_batch)
                if not batch:
                    return  # closed and drained
                items = [(job, self._futures.pop(job.id)) for job in batch]
                items = [(job, f) for job, f in items if f.set_running_or_notify_cancel()]
                self._running.update((job.id, job) for job, _ in items)
                self._set_depth()
            try:
                if items:
                    self._run(items, stream)
            finally:
                with self._cond:
                    for job, _ in items:
                        self._running.pop(job.id, None)

    def _run(
        self, items: list[tuple[ConsolidationJob, Future[SleepResult]]], stream: torch.cuda.Stream | None
    ) -> None:
        jobs = [job for job, _ in items]
        passes, device = jobs[0].passes, self.model.device
        assert passes is not None
        start = self.clock()
        try:
            context = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
            with torch.no_grad(), context:
                if stream is not None:  # the inputs were made on the decode loop's (default) stream
                    stream.wait_stream(torch.cuda.default_stream(device))
                memory = [
                    torch.stack([job.memory[i].to(device) for job in jobs])
                    for i in range(len(jobs[0].memory))
                ]
                chunk = torch.tensor([job.chunk for job in jobs], dtype=torch.long, device=device)
                out = self.model.sleep(memory, chunk, passes)
                per_job = [[m[b].clone() for m in out] for b in range(len(jobs))]
                after = [
                    job.after(memory) if job.after else None
                    for job, memory in zip(jobs, per_job, strict=True)
                ]
                if stream is not None:
                    stream.synchronize()
                    for tensors in per_job:  # consumed on the default stream: free only after its use
                        for t in tensors:
                            t.record_stream(torch.cuda.default_stream(device))
        except BaseException as exc:
            for _, future in items:
                future.set_exception(exc)
            return
        finished = self.clock()
        seconds = finished - start
        missed = [finished > job.deadline for job in jobs]
        if self.policy is not None:
            self.policy.observe(jobs[0].tokens, passes, seconds)
            if any(missed):
                self.policy.record_miss()
        for (job, future), memory_out, late, extra in zip(items, per_job, missed, after, strict=True):
            if self.metrics is not None:
                self.metrics.sleep_duration.labels(trigger=job.trigger).observe(seconds)
                self.metrics.sleep_passes.observe(passes)
                self.metrics.sleep_tokens.inc(job.tokens)
                if late:
                    self.metrics.sleep_deadline_misses.inc()
            future.set_result(
                SleepResult(
                    job.id,
                    job.session,
                    memory_out,
                    job.tokens,
                    passes,
                    seconds,
                    finished,
                    late,
                    len(jobs),
                    extra,
                )
            )
