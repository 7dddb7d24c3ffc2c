"""The in-process sleep executor: consolidation jobs run off the decode path.

`submit(job)` queues a job (EDF) and returns a `concurrent.futures.Future` of its `SleepResult`. A
worker thread pops the earliest job together with the queued jobs of the same chunk length and depth
and runs them as one batched `model.sleep` through a sleeper:
- `LocalSleeper` (the thread sleeper): on the worker thread itself, under `torch.no_grad()`; on CUDA
  inside the worker's own stream, synchronised before the result is published, so sleep overlaps the
  decode loop on the device.
- `ProcessSleeper`: in a child process holding a copy of the weights. On CPU a small model's step is
  mostly Python, so a sleep on a thread of the server holds the GIL that the decode loop needs; in a
  child process it takes another core instead. Only the chunk, the memory and the new memory cross the
  pipe (a few kilobytes). With `nice` > 0 the child runs behind the server's threads (see
  `_background_priority`).
- `interleaved`: no worker at all. The decode thread runs the sleeps itself after each of its steps
  (`run_interleaved`), a slice at a time (a mixer, part of a gdn mixer or an MLP of one pass:
  `HybridLM.pass_slices`), paced so that each finishes a little before its deadline, as vLLM's chunked
  prefill spreads a prompt over decode steps. The sleeps of equal chunk length form one rolling batch:
  a pass runs over all of them at once, each at its own pass, and jobs join and leave between passes
  (continuous batching of sleep). A sleep then never competes with the decode loop and the event
  loop for a core or the GIL; it lengthens the steps it follows instead, evenly. Its deadlines count
  decode time only (`SleepExecutor.now`).
- `offload`: interleaved, with each pass of the rolling batch handed to a `ProcessSleeper` child on
  the cores the server's threads leave free, at SCHED_IDLE (it takes only time nobody else wants), its
  tensors in shared memory. The decode thread polls it after each step and runs a pass itself only
  where the child is late with it (`_helper_late`: longer than its passes of that shape take, or the
  deadline too close to wait), racing it: the first to finish ends the pass. Depth and pace are still
  planned as if the decode thread ran every pass, as it must when the child cannot keep up: the child
  only takes the work off it when a core is free.
The engine polls `future.done()` between decode steps and swaps the memory in; when a session cannot go
on without it (its deadline), `future.result()` blocks, and that wait is the decode stall.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import multiprocessing
import os
import platform
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Literal, Protocol, get_args

import torch
from torch import Tensor

from model.config import ModelConfig
from model.hybrid import HybridLM
from model.slices import Slices, run_to_end
from scheduler.jobs import ConsolidationJob, JobQueue
from scheduler.policy import DepthPolicy, PassCosts

log = logging.getLogger("sleepserve.scheduler")
Memory = list[Tensor]  # one [B, H, K, V] tensor per gdn layer
Isolation = Literal["thread", "process", "interleaved", "offload"]
ISOLATIONS: tuple[str, ...] = get_args(Isolation)


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


@dataclass
class _Row:
    """A job in the rolling batch: its own passes, the time of the passes it has taken part in."""

    job: ConsolidationJob
    future: Future[SleepResult]
    passes_left: int
    seconds: float = 0.0


@dataclass
class _HelperPass:
    """Offload: the pass the helper process has (`_Rolling`'s, by identity), when it was sent and until
    when it has it alone (`SleepExecutor._alone_until`), on the executor's clock; `timed`: its wall time
    teaches the helper's pass cost (not once the batch was dropped: nobody polls it promptly then)."""

    rolling: _Rolling
    sent: float
    alone_until: float
    timed: bool = True


@dataclass
class _Rolling:
    """Interleaved sleeps in progress, as one batch of chunks of equal length (continuous batching of
    sleep): a pass runs over every row at once, each row at its own pass (a block does not care which),
    and jobs join and leave between passes."""

    rows: list[_Row]
    h: Tensor  # [B, T, d] hidden states carried from pass to pass
    fast: Memory  # the fast weights so far, one [B, H, K, V] tensor per gdn layer
    current: Slices[tuple[Tensor, Memory]] | None  # the pass under way here; None: at the helper only
    memory_only: bool  # it is every row's last (see `HybridLM.pass_slices`)
    count: int  # its slices
    done: int = 0  # of them run
    seconds: float = 0.0  # spent on them
    last_pass: float = 0.0  # seconds of the last whole pass
    per_pass: float = 0.0  # expected seconds of this one, for the pace

    @property
    def tokens(self) -> int:
        return self.h.shape[1]


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


def _pass_size(config: ModelConfig, rows: int, tokens: int) -> int:
    """Numbers in a pass's h and fast weights (see `_pass_views`)."""
    return rows * (
        tokens * config.d_model + config.n_gdn * config.gdn_heads * config.gdn_key_dim * config.gdn_value_dim
    )


def _pass_views(shared: Tensor, config: ModelConfig, rows: int, tokens: int) -> tuple[Tensor, Memory]:
    """A pass's h [rows, tokens, d] and fast weights (one [rows, H, K, V] per gdn layer), laid out one
    after the other at the start of the flat buffer `shared`."""
    h_size = rows * tokens * config.d_model
    shape = (rows, config.gdn_heads, config.gdn_key_dim, config.gdn_value_dim)
    size = math.prod(shape)
    h = shared[:h_size].view(rows, tokens, config.d_model)
    fast = [shared[h_size + i * size : h_size + (i + 1) * size].view(shape) for i in range(config.n_gdn)]
    return h, fast


class ProcessSleeper:
    """Runs `model.sleep` in a child process with a copy of the weights (CPU only), at `nice` below the
    server's priority, or with `idle` only on time no other thread wants (SCHED_IDLE), on `cpus` (None:
    where the server runs). One call at a time; a child that dies is restarted and the call retried
    once. With `pass_rows`, it also runs single passes of up to that many chunks of up to a window's
    capacity without the caller waiting for them (`send_pass`, then `pass_reply`), for the offloading
    executor (which runs them itself from then on if the child fails): their tensors cross in shared
    memory, and the pipe carries a few bytes (pickled, a pass's 100 kB took 0.1-0.25 ms a way)."""

    def __init__(
        self,
        model: HybridLM,
        nice: int = 0,
        cpus: set[int] | None = None,
        idle: bool = False,
        pass_rows: int = 0,
    ) -> None:
        if model.device.type != "cpu":
            raise ValueError("the process sleeper runs on CPU; on CUDA use the thread sleeper (own stream)")
        if not 0 <= nice <= 19:
            raise ValueError(f"nice must lie in [0, 19], got {nice}")
        self.nice, self.cpus, self.idle = nice, cpus, idle
        self.config = model.config
        self._weights = {name: t.detach().clone() for name, t in model.state_dict().items()}
        size = _pass_size(model.config, pass_rows, model.config.window_capacity)
        with torch.inference_mode(False):  # written in place from the decode thread's inference mode
            self._shared = torch.zeros(size).share_memory_()
        self._lock = threading.Lock()
        self._start()

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")  # fork is unsafe in a process with threads
        self._conn, child = context.Pipe()
        weights = {name: t.numpy() for name, t in self._weights.items()}
        self._process = context.Process(
            target=_serve_sleeps,
            args=(child, self.config.to_dict(), weights, self._shared, self.nice, self.cpus, self.idle),
            name="sleepserve-sleeper",
            daemon=True,
        )
        self._process.start()
        child.close()

    def __call__(self, memory: Memory, chunk: Tensor, passes: int) -> Memory:
        request = ("sleep", [m.numpy() for m in memory], chunk.numpy(), passes)
        with self._lock:
            try:
                reply = self._ask(request)
            except (EOFError, OSError):
                log.warning("the sleeper process died (exit code %s); restarting it", self._process.exitcode)
                self._conn.close()
                self._process.join(timeout=5)
                self._start()
                reply = self._ask(request)
        if isinstance(reply, BaseException):
            raise reply
        return [torch.from_numpy(array) for array in reply]

    def _ask(self, request: tuple) -> object:
        self._conn.send(request)
        return self._conn.recv()

    def send_pass(self, h: Tensor, fast: Memory, memory_only: bool) -> bool:
        """Start one pass (`HybridLM.pass_slices`'s arguments: h [B, T, d], the fast weights) in the child
        and return at once; False if it is larger than `pass_rows` chunks of a window's capacity. One
        pass at a time: the next after `pass_reply` answered. Raises OSError where the child is gone (it
        is not restarted)."""
        rows, tokens, _ = h.shape
        if _pass_size(self.config, rows, tokens) > self._shared.numel():
            return False
        shared_h, shared_fast = _pass_views(self._shared, self.config, rows, tokens)
        shared_h.copy_(h)
        for shared, m in zip(shared_fast, fast, strict=True):
            shared.copy_(m)
        self._conn.send(("pass", rows, tokens, memory_only))
        return True

    def pass_reply(self) -> tuple[Tensor, Memory, float] | None:
        """The pass sent last, once the child finished it: (h, fast, its seconds of work); None while it
        runs. Raises what the pass raised, EOFError or OSError where the child is gone."""
        if not self._conn.poll():
            return None
        reply = self._conn.recv()
        if isinstance(reply, BaseException):
            raise reply
        rows, tokens, seconds = reply
        h, fast = _pass_views(self._shared, self.config, rows, tokens)
        return h.clone(), [m.clone() for m in fast], seconds

    def close(self) -> None:
        with self._lock, contextlib.suppress(EOFError, OSError):
            self._conn.send(None)
        self._process.join(timeout=5)
        if self._process.is_alive():
            self._process.kill()
        self._conn.close()


# The kernel's shortest time slice (struct sched_attr's sched_runtime for SCHED_OTHER, Linux ≥ 6.12) and
# the number of its sched_setattr system call, which Python's os module does not wrap.
_SHORTEST_SLICE_NS = 100_000
_SCHED_SETATTR = {"x86_64": 314, "aarch64": 274}


def _background_priority(nice: int) -> None:
    """Put this process behind the server's threads: `nice` lowers its share of a contended core, and
    the shortest time slice (where the kernel takes one: EEVDF, Linux ≥ 6.12) lets a thread that wakes
    up, as the event loop does to hand a step's tokens out, take the core from it at once. (Measured on
    2 cores: either alone left the loop waiting milliseconds for a core behind a sleep; both together
    did not.)"""
    os.nice(nice)
    number = _SCHED_SETATTR.get(platform.machine())
    if number is None:
        return
    # struct sched_attr, first version (48 bytes): size, policy, flags, nice, priority, runtime,
    # deadline, period.
    attr = struct.pack(
        "IIQiIQQQ", 48, os.SCHED_OTHER, 0, os.getpriority(os.PRIO_PROCESS, 0), 0, _SHORTEST_SLICE_NS, 0, 0
    )
    if ctypes.CDLL(None, use_errno=True).syscall(number, 0, ctypes.c_char_p(attr), 0) != 0:
        log.debug("sched_setattr: %s (an older kernel: nice alone applies)", os.strerror(ctypes.get_errno()))


def _serve_sleeps(
    conn: Connection,
    config: dict,
    weights: dict,
    shared: Tensor,
    nice: int,
    cpus: set[int] | None,
    idle: bool,
) -> None:
    """The child process of `ProcessSleeper`: answers ("sleep", memory, chunk, passes) with the new
    memory, and ("pass", rows, tokens, memory_only) with (rows, tokens, seconds of work) of one pass
    over the h and fast weights in `shared`, whose results it leaves there."""
    torch.set_num_threads(1)  # the sleeper takes one core beside the decode loop, no more
    if cpus:
        with contextlib.suppress(OSError):  # none of them is this container's: stay where the server is
            os.sched_setaffinity(0, cpus)
    if idle:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    elif nice:
        _background_priority(nice)
    model_config = ModelConfig.from_dict(config)
    model = HybridLM(model_config)
    model.load_state_dict({name: torch.from_numpy(array) for name, array in weights.items()})
    model.eval()
    while True:
        try:
            request = conn.recv()
        except EOFError:  # the server is gone
            return
        if request is None:
            return
        kind, *args = request
        try:
            with torch.inference_mode():
                if kind == "sleep":
                    memory, chunk, passes = args
                    out = model.sleep([torch.from_numpy(m) for m in memory], torch.from_numpy(chunk), passes)
                    conn.send([m.numpy() for m in out])
                else:
                    rows, tokens, memory_only = args
                    h, fast = _pass_views(shared, model_config, rows, tokens)
                    start = time.perf_counter()
                    h_out, fast_out = run_to_end(model.pass_slices(h, fast, memory_only=memory_only))
                    h.copy_(h_out)
                    for m, out in zip(fast, fast_out, strict=True):
                        m.copy_(out)
                    conn.send((rows, tokens, time.perf_counter() - start))
        except Exception as exc:  # the parent raises it in the job's future, or runs the pass itself
            conn.send(exc)


# Interleaved sleeps are paced to finish with 40% of the decode time to their deadline left.
_PACE_TARGET = 0.6


class SleepExecutor:
    """Runs consolidation jobs on `workers` threads, batching up to `max_batch` equal jobs. With
    isolation="process" each worker thread hands its batches to a child process of its own, run at
    `nice` below the server's priority (`ProcessSleeper`). With isolation="interleaved" there is no
    worker: the decode thread runs the sleeps a slice at a time (`run_interleaved`), paced to their
    deadlines; the depth policy (required) gives each job the N whose planned cost takes at most
    `share` of the thread's time, and a sleep that falls behind may take up to halfway from `share` to
    all of it to catch up. With isolation="offload", interleaved sleep hands each pass to a child process
    (`ProcessSleeper`, with `idle`: on time no other thread wants, on `sleeper_cpus`) while that one is
    free, and the decode thread runs a pass itself only where the child takes longer than its passes
    take (`_helper_late`): on a machine with a core to spare, the sleeps leave the decode thread.
    `sleeper_cpus`: the CPUs a sleeper process runs on (process, offload; None: where the server does).
    `batch_wait`: how long (seconds, of the real clock) a worker may hold the earliest job back for
    equal jobs to join its batch, as when sessions cross their boundaries a few steps apart; only while
    the job can still finish by its deadline (so never a job due now), and no longer once the batch is
    full. (Interleaved, it holds back a new rolling batch only, and only while its work fits in the
    most a pace may take of the time to the deadline: `_holding`; later jobs join the batch between
    passes, and run on after the rows that started it.)
    """

    def __init__(
        self,
        model: HybridLM,
        *,
        max_batch: int = 8,
        workers: int = 1,
        policy: DepthPolicy | None = None,
        metrics: SleepMetrics | None = None,
        isolation: Isolation = "thread",
        nice: int = 0,
        batch_wait: float = 0.0,
        share: float = 0.35,
        sleeper_cpus: set[int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_batch < 1 or workers < 1 or batch_wait < 0:
            raise ValueError("max_batch and workers must be positive, batch_wait not negative")
        if nice and isolation != "process":
            raise ValueError("nice sets the priority of a sleeper process: it needs isolation='process'")
        if not 0 < share < 1:
            raise ValueError(f"share must lie in (0, 1), got {share}")
        self.isolation = isolation
        self.interleaved = isolation in ("interleaved", "offload")
        if self.interleaved and policy is None:
            raise ValueError("interleaved sleep is paced by planned costs: it needs a depth policy")
        self.model, self.max_batch, self.batch_wait, self.clock = model, max_batch, batch_wait, clock
        self.policy, self.metrics, self.share = policy, metrics, share
        self._most = (1 + share) / 2  # interleaved: the largest share of the thread a pace may take
        self._sleepers: list[LocalSleeper | ProcessSleeper] = []
        if not self.interleaved:
            self._sleepers = [
                ProcessSleeper(model, nice, sleeper_cpus) if isolation == "process" else LocalSleeper(model)
                for _ in range(workers)
            ]
        self._rolling: _Rolling | None = None  # interleaved: the sleeps in progress
        # offload: the child that runs passes, their observed wall time, and the pass it has
        self._helper = None
        if isolation == "offload":
            self._helper = ProcessSleeper(model, cpus=sleeper_cpus, idle=True, pass_rows=max_batch)
        self._helper_costs = PassCosts()
        self._at_helper: _HelperPass | None = None
        self._credit = 0.0  # interleaved: seconds of sleep the decode thread owes the sleeps in progress
        self._slept = 0.0  # interleaved: seconds it has spent on them
        self._queue = JobQueue()
        self._futures: dict[int, Future[SleepResult]] = {}
        self._running: dict[int, ConsolidationJob] = {}
        self._cancelled: set[int] = set()  # running jobs whose session no longer wants them
        self._cond = threading.Condition()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, args=(sleeper,), name=f"sleepserve-sleep-{i}", daemon=True)
            for i, sleeper in enumerate(self._sleepers)
        ]
        for thread in self._threads:
            thread.start()

    def __len__(self) -> int:
        """Jobs queued (not yet running)."""
        return len(self._queue)

    def now(self) -> float:
        """The clock job deadlines are set on: `clock`; interleaved, minus the time the decode thread
        has spent on sleep slices, so that it counts decode time only. A deadline set as "after so
        many more tokens at the engine's decode rate" is then met by a pace that adds the sleep on
        top of the decoding, whatever share that pace takes."""
        return self.clock() - self._slept

    def calibrate(self, tokens: int, repeats: int = 2) -> float:
        """Time one pass over a chunk of `tokens` tokens, alone and in a full batch, through a worker's
        sleeper (a child process included) and seed the policy with both. Returns the seconds of one
        pass over one chunk. (Timed as half a 2-pass sleep: a sleep's last pass is shorter.)"""
        timings, sleeper = {}, self._sleepers[0] if self._sleepers else LocalSleeper(self.model)
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
        """Queue `jobs` at once and return the futures of their results: no worker starts on the first
        before the last is queued, so equal ones run as one batch. A job without `passes` gets the
        policy's choice now (from its slack and the work queued ahead of it, the jobs before it in
        this list included); interleaved, when it joins the rolling batch (`_roll`)."""
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
                if job.passes is None and not self.interleaved:
                    job.passes = self._choose_passes(job, min(together[job.tokens], self.max_batch))
                futures.append(Future())
                self._futures[job.id] = futures[-1]
                self._queue.push(job)
            self._set_depth()
            self._cond.notify_all()
        return futures

    def reschedule(self, job: ConsolidationJob, deadline: float) -> None:
        """`job` is due at `deadline` from now on (on `now`'s clock), a closer estimate of when its
        session needs it: it takes its place in the EDF queue, and interleaved, the pace follows it (and
        offloaded, how long the helper may keep its pass alone)."""
        with self._cond:
            job.deadline = deadline
            self._queue.reschedule(job)
        at = self._at_helper
        if at is not None and any(row.job is job for row in at.rolling.rows):
            at.alone_until = self._alone_until(at.rolling, at.sent)

    def due_now(self, job: ConsolidationJob) -> None:
        """Its session waits for `job`: it is due now and late when it ends, a missed deadline (which
        makes the policy shallower), whether its deadline was an estimate or not."""
        job.deadline_estimated = False
        self.reschedule(job, self.now())

    def cancel_session(self, session: str) -> int:
        """Drop the jobs of `session`: the queued ones are cancelled with their futures; a running one
        ends as a cancelled future, not as a sleep (no result, no miss: nobody waits for it), at the
        end of its batch, or interleaved, of the pass under way (at once when no other row is left in
        the rolling batch). Returns how many were dropped."""
        with self._cond:
            jobs = self._queue.cancel(session)
            for job in jobs:
                self._futures.pop(job.id).cancel()
            running = [job.id for job in self._running.values() if job.session == session]
            self._cancelled.update(running)
            self._set_depth()
        return len(jobs) + len(running)

    def shutdown(self, wait: bool = True, cancel_pending: bool = False) -> None:
        """Stop taking jobs; the workers finish the queued ones (or cancel them) and exit."""
        with self._cond:
            self._closed = True
            if cancel_pending:
                for job in self._queue.clear():
                    self._futures.pop(job.id).cancel()
                self._set_depth()
            self._cond.notify_all()
        if self.interleaved:  # the caller's thread is the worker: finish the jobs, or drop them
            if cancel_pending and self._rolling is not None:
                self._drop_rolling(RuntimeError("the sleep executor is shut down"))
            while wait and self._run_slice() is not None:
                pass
            self._close_helper()  # a pass it still has is dropped with it
        if wait:
            for thread in self._threads:
                thread.join()
            for sleeper in self._sleepers:
                sleeper.close()

    # -- workers ------------------------------------------------------------------------------------

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

    def _share_deadline(self, deadline: float, share: float) -> float:
        """Interleaved: when, on the policy's clock, the work for a job due at `deadline` must be done
        to take `share` of the decode thread's time, i.e. share / (1 - share) of the decode time until
        the deadline (see `now`)."""
        return self.clock() + share / (1 - share) * (deadline - self.now())

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

    def _set_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.sleep_queue_depth.set(len(self._queue))

    def _work(self, sleeper: LocalSleeper | ProcessSleeper) -> None:
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

    def _hold_left(self, queued: list[ConsolidationJob], since: float) -> float:
        """Seconds the earliest of `queued` (EDF order) may still wait, `since` it began to, for equal
        jobs to join its batch (at most 0: start it now): up to `batch_wait`, until the batch is full,
        and only while its work, with theirs, still fits before its deadline (interleaved: in the most a
        pace may take of the decode time to it, halfway from `share` to all: a job whose N is more than
        `share` allows, such as one held at `min_passes`, may wait too, and the few steps it waits
        cost less than the pass a late row adds), so never for a job due now. Equal: of the same
        shape for a worker's batched sleep, of the same chunk length for the rolling batch (its rows
        differ in passes)."""
        first = queued[0]
        key = (lambda job: job.tokens) if self.interleaved else (lambda job: job.shape)
        equal = sum(key(job) == key(first) for job in queued)
        if equal >= self.max_batch:
            return 0.0
        passes = first.passes or (self.policy.min_passes if self.policy else 1)
        cost = self.policy.estimate(first.tokens, passes, equal) if self.policy else 0.0
        due = self._share_deadline(first.deadline, self._most) if self.interleaved else first.deadline
        return min(self.batch_wait - (time.monotonic() - since), due - self.clock() - cost)

    def _run(
        self,
        items: list[tuple[ConsolidationJob, Future[SleepResult]]],
        sleeper: LocalSleeper | ProcessSleeper,
    ) -> None:
        jobs = [job for job, _ in items]
        assert jobs[0].passes is not None
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

    # -- interleaved: the decode thread is the worker ----------------------------------------------
    # Called from that one thread only (the engine's), so the rolling batch needs no lock.

    def run_interleaved(self, busy: float) -> None:
        """The decode thread's turn to sleep, after `busy` seconds of other work (a step): interleaved,
        run slices for the share of its time that keeps every sleep on pace for its deadline (`_pace`)
        (offloaded, only where the helper is late with its pass, `_helper_late`); with a worker,
        nothing (it runs on its own)."""
        if not self.interleaved:
            return
        self._drop_cancelled()
        self._collect()
        rolling = self._rolling
        if rolling is None and not len(self._queue):  # most steps of a quiet server
            self._credit = 0.0
            return
        if rolling is not None and rolling.current is None and not self._helper_late():
            self._credit = 0.0  # offload: the helper has the pass and keeps to its time
            return
        self._credit += busy * self._pace()
        while self._credit > 0:
            spent = self._run_slice(paced=True)
            if spent is None:  # nothing to run: no credit is kept for later work
                self._credit = 0.0
                return
            self._credit -= spent

    def wait(self, futures: list[Future[SleepResult]], timeout: float) -> None:
        """Wait until one of `futures` is done or `timeout` seconds pass; interleaved, by running
        slices (all of the caller's time: it has nothing else to do)."""
        if not self.interleaved:
            wait_futures(futures, timeout=timeout, return_when=FIRST_COMPLETED)
            return
        end = time.monotonic() + timeout
        while not any(f.done() for f in futures) and time.monotonic() < end:
            if self._run_slice() is None:
                return

    def result(self, future: Future[SleepResult]) -> SleepResult:
        """`future.result()`; interleaved, running slices until it is done."""
        while self.interleaved and not future.done():
            if self._run_slice() is None:
                raise RuntimeError("waiting for a sleep that is neither queued nor running")
        return future.result()

    def _pace(self) -> float:
        """Seconds of sleep per second of decoding that finish every sleep a little before its deadline
        (at `_PACE_TARGET` of the decode time left, see `now`), from the expected costs (no planning
        margin: a pace that falls behind rises by itself): a row of the rolling batch needs its passes
        left, which every pass advances for all rows at once; a queued job, in EDF order, what the
        batch has left plus the jobs due before it and its own. At most what gives sleep halfway from
        `share` to all of the thread's time."""
        assert self.policy is not None
        now, need, work = self.now(), 0.0, 0.0
        rolling = self._rolling
        if rolling is not None:
            into = rolling.done / rolling.count  # of the pass under way
            for row in rolling.rows:
                if row.job.id in self._cancelled:
                    continue
                row_work = (row.passes_left - into) * rolling.per_pass
                need = max(need, _ratio(row_work, _PACE_TARGET * (row.job.deadline - now)))
                work = max(work, row_work)
        queued = self._queue.snapshot() if len(self._queue) else []  # most steps: none
        equal = Counter(job.tokens for job in queued)
        for job in queued:
            rows = min(equal[job.tokens], self.max_batch)
            passes = job.passes or self.policy.min_passes
            work += self.policy.estimate(job.tokens, passes, rows, margin=False) / rows
            need = max(need, _ratio(work, _PACE_TARGET * (job.deadline - now)))
        return min(need, self._most / (1 - self._most))

    def _run_slice(self, paced: bool = False) -> float | None:
        """Run the next slice of the pass under way: between passes, rows that are done leave, queued
        jobs join, and the next pass starts; with no pass under way, a new rolling batch starts, unless
        (`paced`) its earliest job is held back for equal ones (`_holding`). A pass at the helper
        (offload) is left to it while it is on time (`paced`), else run here too: the first to finish
        ends it. Returns the slice's seconds, None if nothing ran."""
        self._drop_cancelled()
        self._collect()
        if self._rolling is None and ((paced and self._holding()) or not self._roll()):
            return None
        rolling = self._rolling
        assert rolling is not None
        if rolling.current is None:
            if paced and not self._helper_late():
                return None
            rolling.current = self.model.pass_slices(rolling.h, rolling.fast, memory_only=rolling.memory_only)
        start, ended, failed = time.perf_counter(), None, None
        try:
            with torch.no_grad():  # as the thread sleeper's; on the engine's thread, inference mode too
                next(rolling.current)
        except StopIteration as end:
            ended = end.value
        except BaseException as exc:
            failed = exc
        spent = time.perf_counter() - start
        self._slept += spent
        if failed is not None:  # a failing pass fails every row, as a failing batch does
            self._drop_rolling(failed)
            return spent
        rolling.done, rolling.seconds = rolling.done + 1, rolling.seconds + spent
        if ended is not None:
            self._end_pass(rolling, *ended)
        return spent

    def _end_pass(
        self, rolling: _Rolling, h: Tensor, fast: Memory, helper_seconds: float | None = None
    ) -> None:
        """A pass over every row is done (by the helper: in its `helper_seconds` of work): publish the
        rows with no pass left, keep the rest, let queued jobs join, start the next pass (or end the
        rolling batch)."""
        assert self.policy is not None
        spent = rolling.seconds if helper_seconds is None else helper_seconds
        if self.metrics is not None:
            runner = "decode_thread" if helper_seconds is None else "sleeper_process"
            self.metrics.sleep_rolling_passes.labels(runner=runner).inc()
        if helper_seconds is None:
            # Every pass run here teaches the policy, a sleep's last (memory-only, shorter) one too, as
            # `calibrate` times a pass: where every sleep takes one pass, the cost would never be
            # learnt otherwise.
            self.policy.observe(rolling.tokens, 1, rolling.seconds, len(rolling.rows))
            if not rolling.memory_only:
                rolling.last_pass = rolling.seconds
        for row in rolling.rows:
            row.passes_left -= 1
            row.seconds += spent
        finished = [  # and cancelled: _publish drops them
            b for b, row in enumerate(rolling.rows) if row.passes_left == 0 or row.job.id in self._cancelled
        ]
        if finished:
            done = [rolling.rows[b] for b in finished]
            items = [(row.job, row.future) for row in done]
            self._publish(
                items, [m[finished] for m in fast], [row.seconds for row in done], len(rolling.rows)
            )
            self._release([row.job for row in done])
        keep = [b for b in range(len(rolling.rows)) if b not in finished]
        rolling.rows = [rolling.rows[b] for b in keep]
        rolling.h, rolling.fast = (h[keep], [m[keep] for m in fast]) if finished else (h, fast)
        if not rolling.rows:  # the next batch starts at the next slice, which may hold it back
            self._rolling = None
            self._credit = max(self._credit, 0.0)  # no debt: the next sleep starts on its own pace
            return
        self._roll()

    def _drop_cancelled(self) -> None:
        """Drop the rolling batch if every session of it ended (a partly cancelled one goes on: its
        cancelled rows leave at the end of the pass under way, `_end_pass`)."""
        if self._rolling is not None and all(row.job.id in self._cancelled for row in self._rolling.rows):
            self._drop_rolling(CancelledError("every session of the rolling batch ended before its sleep"))

    def _drop_rolling(self, exc: BaseException) -> None:
        """End the rolling batch now, its rows' futures with `exc`."""
        assert self._rolling is not None
        if self._at_helper is not None and self._at_helper.rolling is self._rolling:
            self._at_helper.timed = False  # its reply may wait for the next request's steps
        rows, self._rolling = self._rolling.rows, None
        self._release([row.job for row in rows])
        self._fail([(row.job, row.future) for row in rows], exc)

    def _holding(self) -> bool:
        """Interleaved, before a new rolling batch: whether its earliest job waits for equal ones
        (`_hold_left`, since it was queued), as when sessions cross their boundaries a few steps apart.
        Rows that join a batch a pass late take one pass more of it than the others (measured on 8
        streams crossing together: 4-5 passes run for sleeps of 3); rows that wait run every pass
        together."""
        queued = self._queue.snapshot() if self.batch_wait and len(self._queue) else []
        return bool(queued) and self._hold_left(queued, queued[0].enqueued) > 0

    def _roll(self) -> bool:
        """Between passes: add the queued jobs that may join (the earliest ones of the batch's chunk
        length, ahead of any other length, up to `max_batch` rows; a job without N gets one from its
        slack and `share`), then start the next pass over every row: a memory-only pass where it is
        every row's last. False when nothing is left."""
        rolling = self._rolling
        rows: list[_Row] = list(rolling.rows) if rolling else []
        tokens = rolling.tokens if rolling else None
        joining: list[_Row] = []
        with self._cond:
            joinable: list[ConsolidationJob] = []
            for job in self._queue.snapshot():
                tokens = tokens or job.tokens  # a new batch takes the earliest job's length
                if job.tokens != tokens or len(rows) + len(joinable) == self.max_batch:
                    break
                joinable.append(job)
            self._queue.remove(joinable)
            for job in joinable:
                future = self._futures.pop(job.id)
                if future.set_running_or_notify_cancel():
                    joining.append(_Row(job, future, 0))
            self._running.update((row.job.id, row.job) for row in joining)
            self._set_depth()
        if joining:
            assert self.policy is not None
            for row in joining:  # planned as passes of a full batch: others may join it and slow it
                if row.job.passes is None:
                    due = self._share_deadline(row.job.deadline, self.share)
                    row.job.passes = self.policy.choose(row.job.tokens, due, 0.0, self.max_batch)
                row.passes_left = row.job.passes
            try:
                memory, chunk = self._inputs([row.job for row in joining])
                with torch.no_grad():
                    embedded = self.model.embed(chunk)
            except Exception as exc:  # a malformed job fails alone
                self._release([row.job for row in joining])
                self._fail([(row.job, row.future) for row in joining], exc)
                joining = []
        if joining:
            h, fast = embedded, memory
            if rolling is not None:
                h = torch.cat([rolling.h, h])
                fast = [torch.cat([mine, theirs]) for mine, theirs in zip(rolling.fast, memory, strict=True)]
            rows += joining
        elif rolling is not None:
            h, fast = rolling.h, rolling.fast
        else:
            return False
        last = all(row.passes_left == 1 for row in rows)
        count = self.model.pass_slice_count(memory_only=last) + 1  # its yields, then its return
        last_pass = rolling.last_pass if rolling else 0.0
        assert self.policy is not None
        expected = self.policy.pass_seconds(h.shape[1], len(rows), margin=False)
        per_pass = max(expected, last_pass)  # where passes run slower than the policy knows yet
        self._rolling = _Rolling(rows, h, fast, None, last, count, last_pass=last_pass, per_pass=per_pass)
        if not self._send(self._rolling):
            self._rolling.current = self.model.pass_slices(h, fast, memory_only=last)
        return True

    # -- offload: passes in the helper process ------------------------------------------------------

    def _send(self, rolling: _Rolling) -> bool:
        """Offload: hand the pass `rolling` starts to the helper if it is free and no row is due already
        (a session waits for it: `hard`'s every sleep, a late `lagged` one); whether it took it."""
        if self._helper is None or self._at_helper is not None:
            return False
        now = self.now()
        if any(row.job.deadline <= now for row in rolling.rows):
            return False
        try:
            if not self._helper.send_pass(rolling.h, rolling.fast, rolling.memory_only):
                return False  # larger than the helper takes
        except Exception as exc:
            self._stop_offloading(exc)
            return False
        sent = self.clock()
        self._at_helper = _HelperPass(rolling, sent, self._alone_until(rolling, sent))
        return True

    def _alone_until(self, rolling: _Rolling, sent: float) -> float:
        """When (on `clock`) the decode thread takes up the pass `rolling` it sent the helper at `sent`:
        once the helper has had it as long as its passes of that shape take (with the planning margin:
        see `PassCosts`), or once the rows could wait no longer without a pace at its most (`_pace`) to
        finish it and theirs here. Set when the pass is sent, or a row's deadline moves, not every step."""
        most, now = self._most / (1 - self._most), self.now()
        wait = min(
            row.job.deadline - now - row.passes_left * rolling.per_pass / (_PACE_TARGET * most)
            for row in rolling.rows
        )
        return min(
            sent + self._helper_costs.pass_seconds(rolling.tokens, len(rolling.rows)), self.clock() + wait
        )

    def _collect(self) -> None:
        """Offload: take the helper's pass once it is back. It ends the pass under way if that is still
        the one (the helper finished first); one that was finished here meanwhile, or dropped, is
        dropped. A pass the helper failed is run here."""
        at = self._at_helper
        if at is None:
            return
        assert self._helper is not None
        rolling = at.rolling
        try:
            reply = self._helper.pass_reply()
        except Exception as exc:
            self._stop_offloading(exc)
            if rolling.current is None:
                rolling.current = self.model.pass_slices(
                    rolling.h, rolling.fast, memory_only=rolling.memory_only
                )
            return
        if reply is None:
            return
        self._at_helper = None
        if at.timed:
            self._helper_costs.observe(rolling.tokens, 1, self.clock() - at.sent, len(rolling.rows))
        if self._rolling is rolling:
            self._end_pass(rolling, *reply)

    def _stop_offloading(self, exc: BaseException) -> None:
        """The helper failed: the decode thread runs every pass from now on (interleaved)."""
        log.error("the sleeper process failed (%r): sleep passes run on the decode thread from now on", exc)
        self._close_helper()

    def _close_helper(self) -> None:
        """Offload: stop the helper process (no more passes go to it)."""
        if self._helper is not None:
            self._helper.close()
        self._helper, self._at_helper = None, None

    def _helper_late(self) -> bool:
        """Offload: whether the decode thread runs the helper's pass too: the helper has had it alone as
        long as it may (`_alone_until`)."""
        return self._at_helper is None or self.clock() > self._at_helper.alone_until

    def _release(self, jobs: list[ConsolidationJob]) -> None:
        with self._cond:
            for job in jobs:
                self._running.pop(job.id, None)
                self._cancelled.discard(job.id)


def _ratio(work: float, time_left: float) -> float:
    return work / time_left if time_left > 0 else math.inf
