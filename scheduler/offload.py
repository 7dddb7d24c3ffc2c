"""Offloaded sleep: interleaved (`scheduler.interleaved`), with each pass of the rolling batch handed to
a `ProcessSleeper` child on the cores the server's threads leave free, at SCHED_IDLE (it takes only
time nobody else wants), its tensors in shared memory. The decode thread polls it after each step and
runs a pass itself only where the child is late with it (`_helper_late`: longer than its passes of that
shape take, or the deadline too close to wait), racing it: the first to finish ends the pass. Depth and
pace are still planned as if the decode thread ran every pass, as it must when the child cannot keep
up: the child only takes the work off it when a core is free. A child that dies is restarted (logged,
and counted in `sleepserve_sleeper_restarts_total`), its pass run on the decode thread meanwhile."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from model.hybrid import HybridLM
from scheduler.interleaved import PACE_TARGET, InterleavedExecutor, RollingBatch
from scheduler.jobs import ConsolidationJob
from scheduler.policy import PassCosts
from scheduler.process import ProcessSleeper

log = logging.getLogger("sleepserve.scheduler")

# Restarts of the helper without a pass answered in between, after which the decode thread runs every
# pass itself (a child that cannot start, or dies on every pass, would otherwise be restarted forever).
MOST_RESTARTS = 3


@dataclass
class _HelperPass:
    """The pass the helper process has (a `RollingBatch`'s, by identity), when it was sent and until
    when it has it alone (`OffloadExecutor._alone_until`), on the executor's clock; `timed`: its wall
    time teaches the helper's pass cost (not once the batch was dropped: nobody polls it promptly then)."""

    rolling: RollingBatch
    sent: float
    alone_until: float
    rows: int  # the batch's rows when it was sent (rows may leave before the helper answers)
    timed: bool = True


class OffloadExecutor(InterleavedExecutor):
    """Interleaved sleep that hands each pass to a child process (`ProcessSleeper`, with `idle`: on time
    no other thread wants, on `sleeper_cpus`; None: where the server runs) while that one is free; the
    decode thread runs a pass itself only where the child takes longer than its passes take
    (`_helper_late`): on a machine with a core to spare, the sleeps leave the decode thread."""

    isolation = "offload"

    def __init__(self, model: HybridLM, *, sleeper_cpus: set[int] | None = None, **kw) -> None:
        super().__init__(model, **kw)
        restarted = self.metrics.sleeper_restarts.inc if self.metrics is not None else None
        self._helper: ProcessSleeper | None = ProcessSleeper(
            model, cpus=sleeper_cpus, idle=True, pass_rows=self.max_batch, on_restart=restarted
        )
        self._helper_costs = PassCosts()  # the observed wall time of its passes
        self._at_helper: _HelperPass | None = None  # the pass it has
        self._restarts = 0  # of the helper since it last answered a pass
        self._fresh = True  # its first pass includes its start-up: not timed

    def reschedule(self, job: ConsolidationJob, deadline: float) -> None:
        """As `SleepExecutor.reschedule`, and how long the helper may keep its pass alone follows."""
        super().reschedule(job, deadline)
        at = self._at_helper
        if at is not None and any(row.job is job for row in at.rolling.rows):
            at.alone_until = self._alone_until(at.rolling, at.sent)

    def _stop(self, wait: bool, cancel_pending: bool) -> None:
        super()._stop(wait, cancel_pending)
        self._close_helper()  # a pass it still has is dropped with it

    def _drop_rolling(self, exc: BaseException) -> None:
        if self._at_helper is not None and self._at_helper.rolling is self._rolling:
            self._at_helper.timed = False  # its reply may wait for the next request's steps
        super()._drop_rolling(exc)

    def _send(self, rolling: RollingBatch) -> bool:
        """Hand the pass `rolling` starts to the helper if it is free and no row is due already (a
        session waits for it: `hard`'s every sleep, a late `lagged` one); whether it took it."""
        if self._helper is None or self._at_helper is not None:
            return False
        now = self.now()
        if any(row.job.deadline <= now for row in rolling.rows):
            return False
        try:
            if not self._helper.send_pass(rolling.h, rolling.fast, rolling.memory_only):
                return False  # larger than the helper takes
        except Exception as exc:
            self._helper_failed(exc)
            return False
        sent = self.clock()
        alone_until = self._alone_until(rolling, sent)
        self._at_helper = _HelperPass(rolling, sent, alone_until, len(rolling.rows), timed=not self._fresh)
        self._fresh = False
        return True

    def _alone_until(self, rolling: RollingBatch, sent: float) -> float:
        """When (on `clock`) the decode thread takes up the pass `rolling` it sent the helper at `sent`:
        once the helper has had it as long as its passes of that shape take (with the planning margin:
        see `PassCosts`), or once the rows could wait no longer without a pace at its most (`_pace`) to
        finish it and theirs here. Set when the pass is sent, or a row's deadline moves, not every step."""
        most, now = self._most / (1 - self._most), self.now()
        wait = min(
            row.job.deadline - now - row.passes_left * rolling.per_pass / (PACE_TARGET * most)
            for row in rolling.rows
        )
        return min(
            sent + self._helper_costs.pass_seconds(rolling.tokens, len(rolling.rows)), self.clock() + wait
        )

    def _collect(self) -> None:
        """Take the helper's pass once it is back. It ends the pass under way if that is still the one
        (the helper finished first); one that was finished here meanwhile, or dropped, is dropped. A
        pass the helper failed, or lost as it died (it is restarted), is run here."""
        at = self._at_helper
        if at is None:
            return
        assert self._helper is not None
        rolling = at.rolling
        try:
            reply = self._helper.pass_reply()
        except Exception as exc:
            self._at_helper = None
            if not self._helper.alive():
                self._helper_failed(exc)
            if rolling.current is None:
                rolling.current = self.model.pass_slices(
                    rolling.h, rolling.fast, memory_only=rolling.memory_only
                )
            return
        if reply is None:
            return
        self._at_helper, self._restarts = None, 0
        if at.timed:
            self._helper_costs.observe(rolling.tokens, 1, self.clock() - at.sent, at.rows)
        if self._rolling is rolling:
            self._end_pass(rolling, *reply)

    def _helper_late(self) -> bool:
        """Whether the decode thread runs the helper's pass too: the helper has had it alone as long as
        it may (`_alone_until`)."""
        return self._at_helper is None or self.clock() > self._at_helper.alone_until

    def _helper_failed(self, exc: BaseException) -> None:
        """The helper died or cannot be reached (`exc`): restart it (`ProcessSleeper.restart`), unless it
        was restarted `MOST_RESTARTS` times without answering a pass since; then the decode thread runs
        every pass from now on (interleaved)."""
        assert self._helper is not None
        self._at_helper = None
        if self._restarts >= MOST_RESTARTS:
            log.error(
                "the sleeper process failed (%r) %d times in a row: sleep passes run on the decode thread "
                "from now on",
                exc,
                self._restarts + 1,
            )
            self._close_helper()
            return
        self._restarts += 1
        self._helper.restart()
        self._fresh = True

    def _close_helper(self) -> None:
        """Stop the helper process (no more passes go to it)."""
        if self._helper is not None:
            self._helper.close()
        self._helper, self._at_helper = None, None
