"""Adaptive sleep depth and sleep deadlines: pure logic, driven by a clock that tests can fake.

Depth: N is the largest number of passes whose estimated completion (the work queued ahead plus N
passes over the chunk) fits in the slack to the deadline, clamped to [min_passes, max_passes], minus a
penalty after a missed deadline that halves every `penalty_half_life` seconds. The cost of a pass is an
EMA of observed timings per chunk length, seeded by a measurement (`seed`) or a per-token default.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable


class DepthPolicy:
    """Chooses the sleep depth N from the slack to a deadline, the queue ahead and observed pass costs."""

    def __init__(
        self,
        min_passes: int,
        max_passes: int,
        *,
        token_pass_seconds: float = 1e-4,
        ema: float = 0.3,
        miss_penalty: float = 2.0,
        penalty_half_life: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1 <= min_passes <= max_passes:
            raise ValueError(f"need 1 <= min_passes <= max_passes, got {min_passes}, {max_passes}")
        self.min_passes, self.max_passes = min_passes, max_passes
        self.token_pass_seconds = token_pass_seconds  # default cost of one pass, per chunk token
        self.ema, self.miss_penalty, self.penalty_half_life = ema, miss_penalty, penalty_half_life
        self.clock = clock
        self._pass_seconds: dict[int, float] = {}  # chunk length -> EMA of seconds per pass
        self._penalty, self._penalty_at = 0.0, 0.0
        self._lock = threading.Lock()  # observed from worker threads, read from the submitter

    def seed(self, tokens: int, seconds_per_pass: float) -> None:
        """Set the cost of one pass over `tokens` tokens (a measurement), replacing the estimate."""
        with self._lock:
            self._pass_seconds[tokens] = seconds_per_pass

    def observe(self, tokens: int, passes: int, seconds: float) -> None:
        """Fold in a finished sleep of `passes` passes over chunks of `tokens` tokens (one batch)."""
        per_pass = seconds / passes
        with self._lock:
            old = self._pass_seconds.get(tokens)
            self._pass_seconds[tokens] = per_pass if old is None else old + self.ema * (per_pass - old)

    def record_miss(self) -> None:
        """A sleep finished after its deadline: make the next ones shallower for a while."""
        with self._lock:
            now = self.clock()
            self._penalty = self._decayed(now) + self.miss_penalty
            self._penalty_at = now

    def penalty(self) -> float:
        """Passes currently taken off for recent misses."""
        with self._lock:
            return self._decayed(self.clock())

    def pass_seconds(self, tokens: int) -> float:
        """Estimated seconds of one pass over `tokens` tokens: its EMA, else the nearest observed
        length scaled linearly, else the per-token default."""
        with self._lock:
            if tokens in self._pass_seconds:
                return self._pass_seconds[tokens]
            if self._pass_seconds:
                near = min(self._pass_seconds, key=lambda t: abs(t - tokens))
                return self._pass_seconds[near] * tokens / near
        return self.token_pass_seconds * tokens

    def estimate(self, tokens: int, passes: int) -> float:
        """Estimated seconds of a sleep of `passes` passes over `tokens` tokens."""
        return passes * self.pass_seconds(tokens)

    def choose(self, tokens: int, deadline: float, work_ahead: float = 0.0) -> int:
        """N for a chunk of `tokens` tokens due at `deadline` (clock time), behind `work_ahead` seconds
        of queued work."""
        slack = deadline - self.clock() - work_ahead
        fit = math.floor(slack / self.pass_seconds(tokens) + 1e-9) if slack > 0 else 0  # 1e-9: float noise
        depth = fit - round(self.penalty())
        return max(self.min_passes, min(self.max_passes, depth))

    def _decayed(self, now: float) -> float:
        if self._penalty <= 0:
            return 0.0
        return self._penalty * 0.5 ** ((now - self._penalty_at) / self.penalty_half_life)


class DecodeRate:
    """EMA of one session's decode rate in tokens per second, `initial` until observed."""

    def __init__(self, initial: float, ema: float = 0.2) -> None:
        if initial <= 0:
            raise ValueError(f"initial decode rate must be positive, got {initial}")
        self.rate, self.ema, self._observed = initial, ema, False

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        sample = tokens / seconds
        self.rate = sample if not self._observed else self.rate + self.ema * (sample - self.rate)
        self._observed = True


def sleep_deadline(schedule: str, now: float, tokens_until_due: int, tokens_per_second: float) -> float:
    """When a sleep submitted `now` must be finished.

    `hard`: immediately (the session waits for its memory before its next token). `lagged`: when the
    chunk after next starts, i.e. after `tokens_until_due` more tokens of this session (the room left
    in its current chunk) at its observed decode rate.
    """
    if schedule == "hard":
        return now
    if schedule != "lagged":
        raise ValueError(f"unknown schedule {schedule!r}")
    return now + max(0, tokens_until_due) / tokens_per_second
