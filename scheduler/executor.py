"""The in-process sleep executor's common part: the queue of consolidation jobs and their planning.

`submit(job)` queues a job (EDF) and returns a `concurrent.futures.Future` of its `SleepResult`. How
the jobs then run is a subclass's (`scheduler.isolation.create_executor` picks one):
- `thread.WorkerExecutor`: worker threads pop the earliest job together with the queued jobs of the same
  chunk length and depth and run them as one batched `model.sleep` through a sleeper, on the thread
  itself (`thread.LocalSleeper`, on CUDA in its own stream) or in a child process
  (`process.ProcessSleeper`).
- `interleaved.InterleavedExecutor`: no worker; the decode thread runs the sleeps a slice at a time
  after each of its steps, paced to their deadlines, as one rolling batch.
- `offload.OffloadExecutor`: interleaved, each pass handed to a child process on the cores the server's
  threads leave free, the decode thread racing it where it is late.
The engine polls `future.done()` between decode steps and swaps the memory in; when a session cannot go
on without it (its deadline), `result(future)` blocks, and that wait is the decode stall.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from model.hybrid import HybridLM
from scheduler.jobs import ConsolidationJob, JobQueue
from scheduler.policy import DepthPolicy

Memory = list[Tensor]  # one [B, H, K, V] tensor per gdn layer


class _Gauge(Protocol):
    def set(self, value: float) -> None: ...


class _Counter(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class _LabelledCounter(Protocol):
    def labels(self, *values: str, **labels: str) -> _Counter: ...


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
    sleep_rolling_passes: _LabelledCounter
    sleeper_restarts: _Counter


class Sleeper(Protocol):
    """Runs a batched `model.sleep` (memory [B, H, K, V] per gdn layer, chunk [B, T], N)."""

    def __call__(self, memory: Memory, chunk: Tensor, passes: int) -> Memory: ...

    def close(self) -> None: ...


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


class SleepExecutor:
    """Queues consolidation jobs for a subclass to run, batching up to `max_batch` equal jobs.
    `batch_wait`: how long (seconds, of the real clock) the earliest job may be held back for equal
    jobs to join its batch, as when sessions cross their boundaries a few steps apart; only while the
    job can still finish by its deadline (so never a job due now), and no longer once the batch is
    full (`_hold_left`)."""

    isolation: str  # the way a sleep runs (`scheduler.isolation.Isolation`)
    interleaved = False  # whether the caller's thread runs the sleeps (`run_interleaved`)

    def __init__(
        self,
        model: HybridLM,
        *,
        max_batch: int = 8,
        policy: DepthPolicy | None = None,
        metrics: SleepMetrics | None = None,
        batch_wait: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_batch < 1 or batch_wait < 0:
            raise ValueError("max_batch must be positive, batch_wait not negative")
        self.model, self.max_batch, self.batch_wait, self.clock = model, max_batch, batch_wait, clock
        self.policy, self.metrics = policy, metrics
        self._queue = JobQueue()
        self._futures: dict[int, Future[SleepResult]] = {}
        self._running: dict[int, ConsolidationJob] = {}
        self._cancelled: set[int] = set()  # running jobs whose session no longer wants them
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        """Jobs queued (not yet running)."""
        return len(self._queue)

    def now(self) -> float:
        """The clock job deadlines are set on."""
        return self.clock()

    def calibrate(self, tokens: int, repeats: int = 2) -> float:
        """Time one pass over a chunk of `tokens` tokens, alone and in a full batch, through the sleeper
        the jobs run on (a child process included) and seed the policy with both. Returns the seconds
        of one pass over one chunk. (Timed as half a 2-pass sleep: a sleep's last pass is shorter.)"""
        timings, sleeper = {}, self._timing_sleeper()
        for rows in sorted({1, self.max_batch}):
            memory = self.model.empty_memory(rows)
            chunk = torch.zeros(rows, tokens, dtype=torch.long, device=self.model.device)
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                sleeper(memory, chunk, 2)
                best = min(best, (time.perf_counter() - start) / 2)
            timings[rows] = best
            if self.policy is not None:
                self.policy.seed(tokens, best, rows)
        return timings[1]

    def submit(self, job: ConsolidationJob) -> Future[SleepResult]:
        """Queue `job` and return the future of its result (see `submit_all`)."""
        return self.submit_all([job])[0]

    def submit_all(self, jobs: list[ConsolidationJob]) -> list[Future[SleepResult]]:
        """Queue `jobs` at once and return the futures of their results: nothing starts on the first
        before the last is queued, so equal ones run as one batch. A job without `passes` gets the
        policy's choice (`_plan`)."""
        if not jobs:
            return []
        for job in jobs:
            if not job.chunk:
                raise ValueError("a consolidation job needs at least one token")
            if job.passes is None and self.policy is None:
                raise ValueError("job.passes is None and the executor has no depth policy")
            if job.passes is not None and job.passes < 1:
                raise ValueError(f"sleep needs at least one pass, got {job.passes}")
        futures: list[Future[SleepResult]] = []
        together = Counter(job.tokens for job in jobs)  # equal chunks queued at once run as one batch
        with self._cond:
            if self._closed:
                raise RuntimeError("the sleep executor is shut down")
            for job in jobs:
                if job.passes is None:
                    job.adaptive = True
                    self._plan(job, min(together[job.tokens], self.max_batch))
                futures.append(Future())
                self._futures[job.id] = futures[-1]
                self._queue.push(job)
            self._set_depth()
            self._cond.notify_all()
        return futures

    def reschedule(self, job: ConsolidationJob, deadline: float) -> None:
        """`job` is due at `deadline` from now on (on `now`'s clock), a closer estimate of when its
        session needs it: it takes its place in the EDF queue."""
        with self._cond:
            job.deadline = deadline
            self._queue.reschedule(job)

    def due_now(self, job: ConsolidationJob) -> None:
        """Its session waits for `job`: it is due now and late when it ends, a missed deadline (which
        makes the policy shallower), whether its deadline was an estimate or not."""
        job.deadline_estimated = False
        self.reschedule(job, self.now())

    def cancel_session(self, session: str) -> int:
        """Drop the jobs of `session`: the queued ones are cancelled with their futures; a running one
        ends as a cancelled future, not as a sleep (no result, no miss: nobody waits for it), at the
        end of its batch (interleaved: of the pass under way). Returns how many were dropped."""
        with self._cond:
            jobs = self._queue.cancel(session)
            for job in jobs:
                self._futures.pop(job.id).cancel()
            running = [job.id for job in self._running.values() if job.session == session]
            self._cancelled.update(running)
            self._set_depth()
        return len(jobs) + len(running)

    def shutdown(self, wait: bool = True, cancel_pending: bool = False) -> None:
        """Stop taking jobs; finish the queued ones (or cancel them), then stop (`_stop`)."""
        with self._cond:
            self._closed = True
            if cancel_pending:
                for job in self._queue.clear():
                    self._futures.pop(job.id).cancel()
                self._set_depth()
            self._cond.notify_all()
        self._stop(wait, cancel_pending)

    def run_interleaved(self, busy: float) -> None:
        """The decode thread's turn to sleep, after `busy` seconds of other work (a step): nothing
        here, where the jobs run on their own (see `InterleavedExecutor`)."""

    def wait(self, futures: list[Future[SleepResult]], timeout: float) -> None:
        """Wait until one of `futures` is done or `timeout` seconds pass."""
        wait_futures(futures, timeout=timeout, return_when=FIRST_COMPLETED)

    def result(self, future: Future[SleepResult]) -> SleepResult:
        """`future.result()`, once the job ran."""
        return future.result()

    # -- what the ways of running a sleep fill in --------------------------------------------------

    def _timing_sleeper(self) -> Sleeper:
        """The sleeper `calibrate` times: the one the jobs run on."""
        raise NotImplementedError

    def _plan(self, job: ConsolidationJob, rows: int) -> None:
        """Give `job` (no `passes` yet) its N at submission, in a batch of `rows` equal chunks queued
        together; left to later where the N is chosen when the job starts. Called with `_cond` held."""

    def _stop(self, wait: bool, cancel_pending: bool) -> None:
        """Shutdown's part after the queue closed: finish (`wait`) or drop the work, free the sleepers."""
        raise NotImplementedError

    def _equal(self, job: ConsolidationJob, other: ConsolidationJob) -> bool:
        """Whether `other` may join the batch of `job`."""
        return job.shape == other.shape

    def _hold_until(self, job: ConsolidationJob) -> float:
        """When (on `clock`) the work for `job` must be done, as far as holding it back goes."""
        return job.deadline

    # -- shared by them -----------------------------------------------------------------------------

    def _hold_left(self, queued: list[ConsolidationJob], since: float) -> float:
        """Seconds the earliest of `queued` (EDF order) may still wait, `since` it began to, for equal
        jobs (`_equal`) to join its batch (at most 0: start it now): up to `batch_wait`, until the batch
        is full, and only while its work, with theirs, still fits before `_hold_until`, so never for a
        job due now."""
        first = queued[0]
        equal = sum(self._equal(first, job) for job in queued)
        if equal >= self.max_batch:
            return 0.0
        passes = first.passes or (self.policy.min_passes if self.policy else 1)
        cost = self.policy.estimate(first.tokens, passes, equal) if self.policy else 0.0
        return min(
            self.batch_wait - (time.monotonic() - since), self._hold_until(first) - self.clock() - cost
        )

    def _set_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.sleep_queue_depth.set(len(self._queue))

    def _inputs(self, jobs: list[ConsolidationJob]) -> tuple[Memory, Tensor]:
        """The batch's stacked memory (one [B, H, K, V] tensor per gdn layer) and chunks [B, T]."""
        device = self.model.device
        memory = [torch.stack([job.memory[i].to(device) for job in jobs]) for i in range(len(jobs[0].memory))]
        return memory, torch.tensor([job.chunk for job in jobs], dtype=torch.long, device=device)

    @staticmethod
    def _fail(items: list[tuple[ConsolidationJob, Future[SleepResult]]], exc: BaseException) -> None:
        for _, future in items:
            future.set_exception(exc)

    def _publish(
        self,
        items: list[tuple[ConsolidationJob, Future[SleepResult]]],
        out: Memory,
        seconds: list[float],
        rows: int | None = None,
    ) -> None:
        """Resolve finished jobs' futures with their rows of `out`, which took `seconds` of work each
        in a batch of `rows` (None: these jobs alone, one batch, whose cost the policy then learns; a
        rolling batch teaches it pass by pass). The policy hears how many finished and whether any was
        late (one miss)."""
        jobs = [job for job, _ in items]
        if self.policy is not None and rows is None:
            assert jobs[0].passes is not None
            self.policy.observe(jobs[0].tokens, jobs[0].passes, seconds[0], len(jobs))
        wanted = [job.id not in self._cancelled for job in jobs]
        finished = self.now()
        missed = [
            want and not job.deadline_estimated and finished > job.deadline
            for job, want in zip(jobs, wanted, strict=True)
        ]
        if self.policy is not None and any(wanted):
            self.policy.record(sum(wanted), any(missed))
        for b, ((job, future), want, late, spent) in enumerate(
            zip(items, wanted, missed, seconds, strict=True)
        ):
            if not want:
                future.set_exception(CancelledError(f"session {job.session} ended before its sleep"))
                continue
            passes = job.passes
            assert passes is not None
            if self.metrics is not None:
                self.metrics.sleep_duration.labels(trigger=job.trigger).observe(spent)
                self.metrics.sleep_passes.observe(passes)
                self.metrics.sleep_tokens.inc(job.tokens)
                if late:
                    self.metrics.sleep_deadline_misses.inc()
            memory = [m[b].clone() for m in out]
            future.set_result(
                SleepResult(
                    job.id,
                    job.session,
                    memory,
                    job.tokens,
                    passes,
                    spent,
                    finished,
                    late,
                    rows or len(jobs),
                )
            )

    def _release(self, jobs: list[ConsolidationJob]) -> None:
        with self._cond:
            for job in jobs:
                self._running.pop(job.id, None)
                self._cancelled.discard(job.id)
