"""Window boundaries: the engine's step loop calls `_consolidate` when a sequence's chunk is full.

With no executor the sequence sleeps right there, on the decode thread (`model.session.cross_boundary`).
With a `SleepExecutor` the sleep runs on its worker (a thread, or a child process on CPU), or
interleaved: on the decode thread, a few slices after each step, paced to the sleeps' deadlines
(`SleepExecutor.run_interleaved`). Either way the decode loop never waits for another session's sleep:
- `hard`: the sequence leaves the batch until its own sleep is done (a decode stall for it alone).
- `lagged`: the sleep on chunk j−1 starts when chunk j−1 completes and is due when chunk j completes,
  so it runs while chunk j is decoded. At that boundary the new memory is swapped in and the window is
  rebuilt from it: chunk j run once from M_{j−1} (the re-prefill, one pass over L known tokens, batched
  over every sequence crossing in the same step), the same window the synchronous path builds. A late
  sleep blocks the sequence (a counted deadline miss and a decode stall), never the others.

The engine inherits these methods (`Engine(WindowBoundaries)`): they work on its decode batch (`_rows`,
`_cache`), its running sequences and its failure and finish paths, and would need all of them back as
a separate object.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from model.hybrid import HybridLM, WindowCache
from model.session import apply_sleep, batch_memory, cross_boundary, open_windows, room_in_chunk
from scheduler.executor import SleepExecutor
from scheduler.jobs import ConsolidationJob
from scheduler.policy import DecodeRate, sleep_deadline
from server.metrics import Metrics
from server.sequence import PendingSleep, Sequence

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger("sleepserve.engine")


class WindowBoundaries:
    """The engine's window-boundary half: sleeps started, paced, collected and crossed."""

    # The engine's, which these methods share with its step loop.
    model: HybridLM
    passes: int | None
    executor: SleepExecutor | None
    metrics: Metrics
    running: list[Sequence]
    _rows: list[Sequence]
    _cache: WindowCache | None
    _rate: DecodeRate
    _crossed: bool
    _fail: Callable[..., None]
    _finish: Callable[[Sequence, str], None]
    _prompt_fed: Callable[[Sequence], None]
    _decode_clock: Callable[[], float]

    def _consolidate(self, seqs: list[Sequence]) -> None:
        """The current chunk of each of `seqs` is full."""
        if self.executor is None:
            for seq in seqs:
                try:
                    self._consolidate_inline(seq)
                except Exception as exc:
                    self._fail(seq, "its sleep failed", exc)
            return
        hard = self.model.config.schedule == "hard"
        starting, crossing = [], []
        for seq in seqs:
            if not hard and not seq.state.prev_len:
                seq.state.prev_len = len(seq.state.tail)  # the first chunk stays visible; it sleeps now
                starting.append(seq)
            elif hard and self.passes == 1:  # N = 1: the wake pass was the sleep, nothing to wait for
                self._consolidate_inline(seq)
            else:
                crossing.append(seq)
                if hard:
                    starting.append(seq)
        self._start_sleeps(starting)
        ready = []
        for seq in crossing:
            assert seq.sleep is not None
            if seq.sleep.future.done():
                ready.append(seq)
            else:  # the sleep is not done: this sequence (alone) waits for it, from now on
                seq.blocked_since = time.monotonic()
                # A decode stall: the sleep was due now, a missed deadline. (A prompt's boundaries
                # come a piece per step, faster than any deadline: due now too, not counted.)
                if seq.generated:
                    self.executor.due_now(seq.sleep.job)
                else:
                    self.executor.reschedule(seq.sleep.job, self._decode_clock())
        self._cross(ready)

    def _consolidate_inline(self, seq: Sequence) -> None:
        """Sleep now, on the decode thread, and rebuild the window."""
        start = time.perf_counter()
        rebuilt, report = cross_boundary(self.model, seq.state, self.passes, self._window(seq))
        if report is None:  # lagged's first chunk: it stays in the window, nothing to sleep on yet
            return
        self._install(seq, rebuilt)
        self._count_sleep(seq, report.tokens, report.passes, report.seconds)
        self.metrics.sleep_duration.labels(trigger="window_full").observe(report.seconds)
        self.metrics.sleep_passes.observe(report.passes)
        self.metrics.sleep_tokens.inc(report.tokens)
        if seq.generated:
            self.metrics.decode_stall.observe(time.perf_counter() - start)

    def _start_sleeps(self, seqs: list[Sequence]) -> None:
        """Submit, all at once (so that equal ones run as one batch), the sleep on each tail's first
        chunk: the previous chunk (lagged, due at the next boundary) or the full current one (hard,
        due now)."""
        if not seqs:
            return
        assert self.executor is not None
        model, now, jobs = self.model, self._decode_clock(), []
        lagged = model.config.schedule == "lagged"
        for seq in seqs:
            state = seq.state
            n_tokens = state.prev_len if lagged else len(state.tail)
            # Prompt tokens still to feed fill the room a piece per step, far faster than decoding:
            # only the rest of it is decoded (a deadline at the decode rate for all of it came long
            # after the session got there, and its sleep was paced too slowly).
            decoded = max(0, room_in_chunk(model, state) - seq.to_feed)
            deadline = sleep_deadline(model.config.schedule, now, decoded, self._rate.rate)
            tail, memory = state.tail[:n_tokens], list(state.memory)
            # lagged: due at the next boundary, tokens away (_consolidate knows when it comes)
            jobs.append(
                ConsolidationJob(seq.id, tail, memory, self.passes, deadline, deadline_estimated=lagged)
            )
        for seq, job, future in zip(seqs, jobs, self.executor.submit_all(jobs), strict=True):
            seq.sleep = PendingSleep(job, future)

    def _refresh_deadline(self, seq: Sequence, room: int) -> None:
        """Set the deadline of a decoding sequence's pending sleep anew from the `room` left before its
        boundary: the decode rate it was planned with drifts (a sleep that starts or ends changes the
        steps), and a plan that is late paces the sleep too slowly, so the session waits there; one
        that is early, too fast. Called when the room is a power of two (16, 8, 4, 2, 1 tokens): it
        closes in at a few reschedules per window."""
        assert self.executor is not None and seq.sleep is not None
        if not seq.sleep.future.done():
            now = self._decode_clock()
            deadline = sleep_deadline(self.model.config.schedule, now, room, self._rate.rate)
            self.executor.reschedule(seq.sleep.job, deadline)

    def _collect_sleeps(self) -> None:
        """Let the sequences that wait at a boundary for their sleep go on once it is done."""
        done = [
            s
            for s in self.running
            if s.blocked_since is not None and s.sleep is not None and s.sleep.future.done()
        ]
        for seq in done:
            self._unblock(seq)
        self._cross(done)
        for seq in done:
            if seq.done:  # its sleep failed
                continue
            if seq.finish_reason is not None and not seq.pending:
                self._finish(seq, seq.finish_reason)
            elif not seq.to_feed and not seq.pending:  # its prompt ended at the boundary
                self._prompt_fed(seq)

    def _unblock(self, seq: Sequence) -> None:
        assert seq.blocked_since is not None
        if seq.generated:
            self.metrics.decode_stall.observe(time.monotonic() - seq.blocked_since)
        seq.blocked_since = None

    def _cross(self, seqs: list[Sequence]) -> None:
        """Cross the boundary of each of `seqs` with its finished sleep (waiting for it if need be): swap
        in the new memory and rebuild the window from it, all of them in one batch."""
        if not seqs:
            return
        lagged = self.model.config.schedule == "lagged"
        assert self.executor is not None
        crossing = []
        for seq in seqs:
            assert seq.sleep is not None
            try:
                result, seq.sleep = self.executor.result(seq.sleep.future), None
            except Exception as exc:
                seq.sleep = None
                self._fail(seq, "its sleep failed", exc)
                continue
            crossing.append(seq)
            state = seq.state
            n_tokens = state.prev_len if lagged else len(state.tail)
            apply_sleep(state, result.memory, n_tokens, result.passes, result.seconds)
            self._count_sleep(seq, n_tokens, result.passes, result.seconds)
            if lagged:
                state.prev_len = len(state.tail)  # the chunk that just completed stays visible
        if not crossing:
            return
        if self.model.config.stale_kv:
            self._move_stale_windows(crossing)
        else:
            crossing = self._reopen_windows(crossing)
        if lagged:
            self._start_sleeps(crossing)  # on the chunks that just completed

    def _reopen_windows(self, seqs: list[Sequence]) -> list[Sequence]:
        """Rebuild the windows of `seqs` from their new memory, in batches; should that fail, each alone.
        Returns the sequences that go on."""
        try:
            windows = open_windows(self.model, [seq.state for seq in seqs])
        except Exception as exc:
            if len(seqs) == 1:
                self._fail(seqs[0], "its window could not be rebuilt after its sleep", exc)
                return []
            log.warning("rebuilding %d windows failed (%s): one by one", len(seqs), exc)
            return [kept for seq in seqs for kept in self._reopen_windows([seq])]
        for seq, (window, row) in zip(seqs, windows, strict=True):
            self._install(seq, window, row)
        return seqs

    def _move_stale_windows(self, seqs: list[Sequence]) -> None:
        """stale-kv's boundary for `seqs`, whose sleeps were just swapped in: each window keeps its
        completed chunk's keys and values and restarts its fast weights from the new memory
        (`HybridLM.move_stale`), in place: the decode batch's rows in one go per chunk length."""
        self._crossed = True
        in_batch: dict[int, list[Sequence]] = {}
        for seq in seqs:
            if seq.cache is None:
                in_batch.setdefault(len(seq.state.tail), []).append(seq)
            else:
                self._move_stale(seq.cache, [0], [seq])
        for group in in_batch.values():
            self._move_stale(self._cache, [self._rows.index(seq) for seq in group], group)

    def _move_stale(self, cache: WindowCache, rows: list[int], group: list[Sequence]) -> None:
        """`HybridLM.move_stale` for `group` (equal tails), the windows in `rows` of `cache`."""
        memory = batch_memory(self.model, [seq.state for seq in group])
        self.model.move_stale(cache, rows, memory, len(group[0].state.tail))

    def _settle(self, seq: Sequence) -> None:
        """Before a sequence ends: if it waits at a boundary, cross it (the session must be stored with
        a full chunk consolidated), waiting for the sleep if need be."""
        if seq.blocked_since is None:
            return
        self._unblock(seq)
        self._cross([seq])

    def _window(self, seq: Sequence) -> WindowCache:
        """The sequence's current window (a copy of its row when it is in the batch)."""
        if seq.cache is not None:
            return seq.cache
        assert self._cache is not None
        return self._cache.select([self._rows.index(seq)])

    def _install(self, seq: Sequence, window: WindowCache, source: int = 0) -> None:
        """Make row `source` of `window` the sequence's current window (copied once, into its row of
        the batch when it is in the batch)."""
        self._crossed = True  # a window is installed only when a sequence crosses a boundary
        if seq.cache is None:
            self._cache.write_row(self._rows.index(seq), window, source)
        else:
            seq.cache = window if window.lengths.shape[0] == 1 else window.select([source])

    def _count_sleep(self, seq: Sequence, tokens: int, passes: int, seconds: float) -> None:
        seq.stats.consolidated_tokens += tokens
        seq.stats.sleep_passes += passes
        seq.stats.sleep_seconds += seconds
