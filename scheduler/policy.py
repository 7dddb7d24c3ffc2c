"""Adaptive sleep depth and sleep deadlines: pure logic, driven by a clock that tests can fake.

Depth: N is the largest number of passes whose planned completion (the work queued ahead plus N
passes over the batch) fits in the slack to the deadline, clamped to [min_passes, max_passes], minus a
penalty after a missed deadline that halves with every `penalty_half_life` sleeps that finish: it
counts in sleeps, not seconds, so a burst of misses makes the next few sleeps shallower however often
sleeps come, and load that stays too high keeps it up by missing again.

The cost of a pass depends on the batch's shape, chunk length and rows (a batch of several chunks
costs more than one chunk, if far less than one per chunk), so it is kept per shape: an EMA of the
observed seconds per pass and one of their deviation from it, as TCP keeps its round-trip time (RFC
6298; the deviation starts at half the first timing). Plans use mean + `deviations` × deviation, so a
cost that varies (a busy machine), or that is known from one quiet calibration only, is planned with a
margin. An unseen shape borrows the nearest observed one: more rows cost at least as much (scaled
linearly from fewer rows); an unseen length is scaled from the nearest length.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _PassCost:
    mean: float  # seconds per pass
    deviation: float  # mean absolute deviation of the observations from `mean`

    @classmethod
    def first(cls, seconds: float) -> _PassCost:
        """From one timing: its deviation starts at half of it (RFC 6298's first RTTVAR), so a cost
        known from one quiet measurement is planned with room until the load shows what it is."""
        return cls(seconds, seconds / 2)


class PassCosts:
    """Observed seconds of one pass by batch shape (chunk length, rows), as TCP keeps its round-trip time
    (see the module's docstring); thread-safe."""

    def __init__(self, token_pass_seconds: float = 1e-4, ema: float = 0.3, deviations: float = 2.0) -> None:
        self.token_pass_seconds = token_pass_seconds  # default cost of one pass, per chunk token and row
        self.ema, self.deviations = ema, deviations
        self._costs: dict[tuple[int, int], _PassCost] = {}  # (chunk length, rows) -> cost of a pass
        self._lock = threading.Lock()  # observed from worker threads, read from the submitter

    def seed(self, tokens: int, seconds_per_pass: float, rows: int = 1) -> None:
        """Set the cost of one pass over a batch of `rows` chunks of `tokens` tokens (a measurement),
        replacing the estimate."""
        with self._lock:
            self._costs[tokens, rows] = _PassCost.first(seconds_per_pass)

    def observe(self, tokens: int, passes: int, seconds: float, rows: int = 1) -> None:
        """Fold in a finished sleep of `passes` passes over a batch of `rows` chunks of `tokens` tokens."""
        per_pass = seconds / passes
        with self._lock:
            cost = self._costs.get((tokens, rows))
            if cost is None:
                self._costs[tokens, rows] = _PassCost.first(per_pass)
                return
            cost.deviation += self.ema * (abs(per_pass - cost.mean) - cost.deviation)
            cost.mean += self.ema * (per_pass - cost.mean)

    def pass_seconds(self, tokens: int, rows: int = 1, margin: bool = True) -> float:
        """Planned seconds of one pass over a batch of `rows` chunks of `tokens` tokens: the observed
        mean plus (`margin`) `deviations` deviations, borrowed from the nearest observed shape when this
        one is unseen, else the per-token default."""
        with self._lock:
            if not self._costs:
                return self.token_pass_seconds * tokens * rows
            lengths = {t for t, _ in self._costs}
            near_length = min(lengths, key=lambda t: (abs(t - tokens), t))
            near_rows = min(
                (r for t, r in self._costs if t == near_length), key=lambda r: (r < rows, abs(r - rows))
            )  # the closest batch at least as large, else the largest smaller one
            cost = self._costs[near_length, near_rows]
        planned = cost.mean + self.deviations * cost.deviation if margin else cost.mean
        return planned * tokens / near_length * max(1.0, rows / near_rows)


class DepthPolicy:
    """Chooses the sleep depth N from the slack to a deadline, the queue ahead and observed pass costs
    (`costs`: its `seed`, `observe` and `pass_seconds` are the table's)."""

    def __init__(
        self,
        min_passes: int,
        max_passes: int,
        *,
        token_pass_seconds: float = 1e-4,
        ema: float = 0.3,
        deviations: float = 2.0,
        miss_penalty: float = 2.0,
        penalty_half_life: float = 8.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1 <= min_passes <= max_passes:
            raise ValueError(f"need 1 <= min_passes <= max_passes, got {min_passes}, {max_passes}")
        self.min_passes, self.max_passes = min_passes, max_passes
        self.costs = PassCosts(token_pass_seconds, ema, deviations)
        self.miss_penalty, self.penalty_half_life = miss_penalty, penalty_half_life
        self.clock = clock
        self._penalty = 0.0
        self._lock = threading.Lock()  # recorded from worker threads, read from the submitter

    @property
    def token_pass_seconds(self) -> float:
        return self.costs.token_pass_seconds

    def seed(self, tokens: int, seconds_per_pass: float, rows: int = 1) -> None:
        self.costs.seed(tokens, seconds_per_pass, rows)

    def observe(self, tokens: int, passes: int, seconds: float, rows: int = 1) -> None:
        self.costs.observe(tokens, passes, seconds, rows)

    def pass_seconds(self, tokens: int, rows: int = 1, margin: bool = True) -> float:
        return self.costs.pass_seconds(tokens, rows, margin)

    def record(self, sleeps: int, missed: bool) -> None:
        """`sleeps` sleeps finished (one batch's, or the rows that leave a rolling batch), `missed` if
        any was late: each takes back some of the penalty, and a miss adds `miss_penalty` passes to it
        for the next ones."""
        with self._lock:
            self._penalty *= 0.5 ** (sleeps / self.penalty_half_life)
            if missed:
                self._penalty += self.miss_penalty

    def penalty(self) -> float:
        """Passes currently taken off for recent misses."""
        with self._lock:
            return self._penalty

    def estimate(self, tokens: int, passes: int, rows: int = 1, margin: bool = True) -> float:
        """Planned seconds of a sleep of `passes` passes over a batch of `rows` chunks of `tokens` tokens
        (`margin`: see `pass_seconds`)."""
        return passes * self.pass_seconds(tokens, rows, margin)

    def choose(self, tokens: int, deadline: float, work_ahead: float = 0.0, rows: int = 1) -> int:
        """N for a chunk of `tokens` tokens due at `deadline` (clock time), in a batch of `rows` chunks,
        behind `work_ahead` seconds of queued work."""
        slack = deadline - self.clock() - work_ahead
        per_pass = self.pass_seconds(tokens, rows)
        if slack <= 0:
            fit = 0
        elif per_pass <= 0:  # only a clock that stands still (tests) times a pass at nothing
            fit = self.max_passes
        else:
            fit = math.floor(slack / per_pass + 1e-9)  # 1e-9: float noise
        depth = fit - round(self.penalty())
        return max(self.min_passes, min(self.max_passes, depth))


class DecodeRate:
    """The engine's decode rate: tokens per second of a decoding sequence, which gets one token per
    decode step, so the inverse of the `quantile` (default: the first quartile) of the intervals
    between consecutive decode steps over the last `window` of them; until `window` are observed, of
    the shortest (`initial` before any).

    A lagged sleep's deadline converts the tokens left until the next boundary to time at this rate,
    and a deadline set too late makes the session wait there. So the estimate errs early: steps vary
    with what they carry (a prompt's piece, a boundary, a small batch), and an EMA of the last few
    intervals (per session, as it was) or even a window's mean put deadlines late: sessions waited at
    1-10% of their boundaries in bench/sleep_overlap.py (2 CPU cores); at under 2% of them with the
    median, which half of the next steps still beat. Under the soak's load (bench/soak.py), where the
    batch changes at every step, 1.0-2.3% of the sleeps missed with the median, 0.05-0.4% with the
    first quartile (two servers loaded at once, on 2 shared cores), at shallower depths (mean N
    1.2-1.3 against 1.6-2.0) and no higher inter-token latency.
    """

    def __init__(self, initial: float, window: int, quantile: float = 0.25) -> None:
        if initial <= 0 or window < 1 or not 0 <= quantile <= 1:
            raise ValueError(
                f"need a positive initial rate and window, a quantile in [0, 1], got {initial}, {window}, {quantile}"
            )
        self.initial, self.quantile = initial, quantile
        self._intervals: deque[float] = deque(maxlen=window)

    @property
    def rate(self) -> float:
        if not self._intervals:
            return self.initial
        full = len(self._intervals) == self._intervals.maxlen
        if not full:
            return 1.0 / min(self._intervals)
        ordered = sorted(self._intervals)
        return 1.0 / ordered[int(self.quantile * (len(ordered) - 1))]

    def observe(self, seconds: float) -> None:
        """The interval between two consecutive decode steps."""
        if seconds > 0:
            self._intervals.append(seconds)


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
