"""Interleaved sleep: no worker at all. The decode thread runs the sleeps itself after each of its steps
(`run_interleaved`), a slice at a time (a mixer, part of a gdn mixer or an MLP of one pass:
`HybridLM.pass_slices`), paced so that each finishes a little before its deadline (`_pace`), as vLLM's
chunked prefill spreads a prompt over decode steps. The sleeps of equal chunk length form one rolling
batch: a pass runs over all of them at once, each at its own pass, and jobs join and leave between
passes (continuous batching of sleep). A sleep then never competes with the decode loop and the event
loop for a core or the GIL; it lengthens the steps it follows instead, evenly. Its deadlines count
decode time only (`now`)."""

from __future__ import annotations

import math
import time
from collections import Counter
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass

import torch
from torch import Tensor

from model.hybrid import HybridLM
from model.slices import Slices
from scheduler.executor import Memory, Sleeper, SleepExecutor, SleepResult
from scheduler.jobs import ConsolidationJob
from scheduler.thread import LocalSleeper

# Interleaved sleeps are paced to finish with 40% of the decode time to their deadline left.
PACE_TARGET = 0.6


@dataclass
class _Row:
    """A job in the rolling batch: its own passes, the time of the passes it has taken part in."""

    job: ConsolidationJob
    future: Future[SleepResult]
    passes_left: int
    seconds: float = 0.0


@dataclass
class RollingBatch:
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


class InterleavedExecutor(SleepExecutor):
    """The decode thread runs the sleeps a slice at a time (`run_interleaved`), paced to their
    deadlines; the depth policy (required) gives each job, when it joins the rolling batch, the N whose
    planned cost takes at most `share` of the thread's time, and a sleep that falls behind may take up
    to halfway from `share` to all of it to catch up. `batch_wait` holds back a new rolling batch only,
    and only while its work fits in the most a pace may take of the time to the deadline (`_holding`);
    later jobs join the batch between passes, and run on after the rows that started it. Called from
    that one thread only (the engine's), so the rolling batch needs no lock."""

    isolation = "interleaved"
    interleaved = True

    def __init__(self, model: HybridLM, *, share: float = 0.35, **kw) -> None:
        if not 0 < share < 1:
            raise ValueError(f"share must lie in (0, 1), got {share}")
        if kw.get("policy") is None:
            raise ValueError("interleaved sleep is paced by planned costs: it needs a depth policy")
        super().__init__(model, **kw)
        self.share = share
        self._most = (1 + share) / 2  # the largest share of the thread a pace may take
        self._rolling: RollingBatch | None = None  # the sleeps in progress
        self._credit = 0.0  # seconds of sleep the decode thread owes the sleeps in progress
        self._slept = 0.0  # seconds it has spent on them

    def now(self) -> float:
        """`clock` minus the time the decode thread has spent on sleep slices, so that it counts decode
        time only. A deadline set as "after so many more tokens at the engine's decode rate" is then
        met by a pace that adds the sleep on top of the decoding, whatever share that pace takes."""
        return self.clock() - self._slept

    def run_interleaved(self, busy: float) -> None:
        """The decode thread's turn to sleep, after `busy` seconds of other work (a step): run slices
        for the share of its time that keeps every sleep on pace for its deadline (`_pace`)."""
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
        """Wait until one of `futures` is done or `timeout` seconds pass, by running slices (all of the
        caller's time: it has nothing else to do)."""
        end = time.monotonic() + timeout
        while not any(f.done() for f in futures) and time.monotonic() < end:
            if self._run_slice() is None:
                return

    def result(self, future: Future[SleepResult]) -> SleepResult:
        """`future.result()`, running slices until it is done."""
        while not future.done():
            if self._run_slice() is None:
                raise RuntimeError("waiting for a sleep that is neither queued nor running")
        return future.result()

    # -- SleepExecutor's hooks ----------------------------------------------------------------------

    def _timing_sleeper(self) -> Sleeper:
        return LocalSleeper(self.model)

    def _stop(self, wait: bool, cancel_pending: bool) -> None:
        """The caller's thread is the worker: finish the jobs, or drop them."""
        if cancel_pending and self._rolling is not None:
            self._drop_rolling(RuntimeError("the sleep executor is shut down"))
        while wait and self._run_slice() is not None:
            pass

    def _equal(self, job: ConsolidationJob, other: ConsolidationJob) -> bool:
        return job.tokens == other.tokens  # the rolling batch's rows differ in passes

    def _hold_until(self, job: ConsolidationJob) -> float:
        # At the most a pace may take (halfway from `share` to all): a job whose N is more than `share`
        # allows, such as one held at `min_passes`, may wait too, and the few steps it waits cost less
        # than the pass a late row adds. Of the decode time a pace would finish it in (`PACE_TARGET` of
        # that to the deadline), as the pace keeps the rest for the estimate's errors: a hold to the
        # very end of the deadline made 0.5% of the soak's sleeps miss it.
        now = self.now()
        return self._share_deadline(now + PACE_TARGET * (job.deadline - now), self._most)

    # -- offload's hooks (`scheduler.offload`): here every pass runs on the decode thread ------------

    def _send(self, rolling: RollingBatch) -> bool:
        """Hand the pass `rolling` starts to a helper; whether one took it."""
        return False

    def _collect(self) -> None:
        """Take a helper's pass once it is back."""

    def _helper_late(self) -> bool:
        """Whether the decode thread runs the pass under way (no helper has it on time)."""
        return True

    # -- the rolling batch ---------------------------------------------------------------------------

    def _share_deadline(self, deadline: float, share: float) -> float:
        """When, on the policy's clock, the work for a job due at `deadline` must be done to take `share`
        of the decode thread's time, i.e. share / (1 - share) of the decode time until the deadline
        (see `now`)."""
        return self.clock() + share / (1 - share) * (deadline - self.now())

    def _pace(self) -> float:
        """Seconds of sleep per second of decoding that finish every sleep a little before its deadline
        (at `PACE_TARGET` of the decode time left, see `now`), from the expected costs (no planning
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
                need = max(need, _ratio(row_work, PACE_TARGET * (row.job.deadline - now)))
                work = max(work, row_work)
        queued = self._queue.snapshot() if len(self._queue) else []  # most steps: none
        equal = Counter(job.tokens for job in queued)
        for job in queued:
            rows = min(equal[job.tokens], self.max_batch)
            passes = job.passes or self.policy.min_passes
            work += self.policy.estimate(job.tokens, passes, rows, margin=False) / rows
            need = max(need, _ratio(work, PACE_TARGET * (job.deadline - now)))
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
        self, rolling: RollingBatch, h: Tensor, fast: Memory, helper_seconds: float | None = None
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
        self._shed(rolling)
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

    def _shed(self, rolling: RollingBatch) -> None:
        """Between passes, cut an adaptive row's passes left to those that still fit before its deadline
        at the most a pace may take (`_pace`'s cap), never below `min_passes` in all: a shallower sleep
        on time rather than a deep one late (its session would wait at its boundary). A row cut to none
        left ends with this pass: the fast weights after k passes are sleep(N = k)'s. Its job's N
        becomes the passes it runs. (Fixed depths are the operator's: never cut.)"""
        assert self.policy is not None
        most, now = self._most / (1 - self._most), self.now()
        for row in rolling.rows:
            if not row.job.adaptive or not row.passes_left:
                continue
            assert row.job.passes is not None
            done = row.job.passes - row.passes_left
            fit = (
                math.floor(most * (row.job.deadline - now) / rolling.per_pass) if rolling.per_pass > 0 else 0
            )
            keep = max(self.policy.min_passes - done, min(row.passes_left, fit), 0)
            if keep < row.passes_left:
                row.job.passes -= row.passes_left - keep
                row.passes_left = keep

    def _drop_cancelled(self) -> None:
        """Drop the rolling batch if every session of it ended (a partly cancelled one goes on: its
        cancelled rows leave at the end of the pass under way, `_end_pass`)."""
        if self._rolling is not None and all(row.job.id in self._cancelled for row in self._rolling.rows):
            self._drop_rolling(CancelledError("every session of the rolling batch ended before its sleep"))

    def _drop_rolling(self, exc: BaseException) -> None:
        """End the rolling batch now, its rows' futures with `exc`."""
        assert self._rolling is not None
        rows, self._rolling = self._rolling.rows, None
        self._release([row.job for row in rows])
        self._fail([(row.job, row.future) for row in rows], exc)

    def _holding(self) -> bool:
        """Before a new rolling batch: whether its earliest job waits for equal ones (`_hold_left`, since
        it was queued), as when sessions cross their boundaries a few steps apart. Rows that join a
        batch a pass late take one pass more of it than the others (measured on 8 streams crossing
        together: 4-5 passes run for sleeps of 3); rows that wait run every pass together."""
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
        self._rolling = RollingBatch(rows, h, fast, None, last, count, last_pass=last_pass, per_pass=per_pass)
        if not self._send(self._rolling):
            self._rolling.current = self.model.pass_slices(h, fast, memory_only=last)
        return True


def _ratio(work: float, time_left: float) -> float:
    return work / time_left if time_left > 0 else math.inf
