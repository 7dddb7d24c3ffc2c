from __future__ import annotations

import pytest

from scheduler.policy import DecodeRate, DepthPolicy, sleep_deadline


def policy(clock, **kwargs) -> DepthPolicy:
    """Plans at the mean cost unless told otherwise, the seed being 10 ms a pass over 8 tokens."""
    p = DepthPolicy(1, 8, clock=clock, **{"deviations": 0.0, **kwargs})
    p.seed(8, 0.01)
    return p


def test_idle_goes_deep_and_load_goes_shallow(clock) -> None:
    p = policy(clock)
    assert p.choose(8, deadline=clock() + 10.0) == 8  # empty queue, lots of slack
    assert p.choose(8, deadline=clock() + 0.055) == 5  # 5 passes of 10 ms fit in 55 ms
    assert p.choose(8, deadline=clock() + 10.0, work_ahead=9.99) == 1  # heavy queue ahead
    assert p.choose(8, deadline=clock() + 0.001) == 1  # tight slack
    assert p.choose(8, deadline=clock() - 1.0) == 1  # already late


def test_depth_is_monotone_in_slack_and_queue(clock) -> None:
    p = policy(clock)
    by_slack = [p.choose(8, clock() + slack) for slack in [i * 0.005 for i in range(30)]]
    assert by_slack == sorted(by_slack) and by_slack[0] == 1 and by_slack[-1] == 8
    by_queue = [p.choose(8, clock() + 0.1, work_ahead=q * 0.01) for q in range(12)]
    assert by_queue == sorted(by_queue, reverse=True) and by_queue[-1] == 1


def test_cost_estimates_follow_observations(clock) -> None:
    p = policy(clock, ema=0.5, deviations=0.0)
    p.observe(8, passes=4, seconds=0.08)  # 20 ms per pass: EMA 10 -> 15 ms
    assert p.pass_seconds(8) == pytest.approx(0.015)
    assert p.pass_seconds(16) == pytest.approx(0.030)  # unseen length: nearest, scaled
    assert DepthPolicy(1, 4, token_pass_seconds=1e-3, clock=clock).pass_seconds(8) == pytest.approx(0.008)
    assert p.estimate(8, 3) == pytest.approx(0.045)


def test_costs_are_kept_per_batch_size(clock) -> None:
    """A batch of several chunks costs more than one chunk and is planned with its own cost; an unseen
    size borrows the closest batch at least as large, else scales the largest smaller one linearly."""
    p = policy(clock, deviations=0.0)  # 10 ms a pass over one chunk of 8
    p.seed(8, 0.025, rows=7)
    assert p.pass_seconds(8, rows=4) == pytest.approx(0.025)
    assert p.pass_seconds(8, rows=14) == pytest.approx(0.050)
    p.observe(8, passes=2, seconds=0.06, rows=7)  # 30 ms a pass: only the 7-chunk estimate moves
    assert p.pass_seconds(8, rows=7) == pytest.approx(0.025 + 0.3 * 0.005)
    assert p.pass_seconds(8, rows=1) == pytest.approx(0.010)
    assert p.choose(8, clock() + 0.06) == 6
    assert p.choose(8, clock() + 0.06, rows=7) == 2
    assert p.estimate(8, 2, rows=7) == pytest.approx(2 * 0.0265)
    p.observe(8, passes=1, seconds=0.0, rows=2)  # a clock standing still: a free pass, not a crash
    assert p.choose(8, clock() + 0.06, rows=2) == 8


def test_a_varying_cost_is_planned_with_a_margin(clock) -> None:
    """Pass costs that vary are planned at mean + `deviations` × their deviation, as TCP plans its
    retransmission timer: steady timings plan at their mean, scattered ones of the same mean further
    out, so the depth chosen for the same slack is shallower."""
    steady, scattered = policy(clock, ema=0.25, deviations=2.0), policy(clock, ema=0.25, deviations=2.0)
    assert steady.pass_seconds(8) == pytest.approx(0.02)  # one timing: its deviation starts at half of it
    for _ in range(20):
        for seconds in (0.01, 0.01):
            steady.observe(8, 1, seconds)
        for seconds in (0.005, 0.015):
            scattered.observe(8, 1, seconds)
    assert steady.pass_seconds(8) == pytest.approx(0.01, rel=1e-3)
    assert scattered.pass_seconds(8) > 0.015  # mean ~10 ms, deviation ~5 ms
    assert steady.choose(8, clock() + 0.055) == 5
    assert scattered.choose(8, clock() + 0.055) < 4


def test_a_missed_deadline_makes_the_next_jobs_shallower_for_a_few_sleeps(clock) -> None:
    p = policy(clock, miss_penalty=2.0, penalty_half_life=4.0)
    before = p.choose(8, clock() + 0.06)
    assert before == 6
    p.record(1, missed=True)
    assert p.choose(8, clock() + 0.06) == 4
    p.record(1, missed=True)  # 2 * 2^(-1/4) + 2
    assert p.choose(8, clock() + 0.06) == 2
    clock.advance(3600.0)  # time alone takes nothing back
    assert p.choose(8, clock() + 0.06) == 2
    p.record(4, missed=False)  # a half-life of sleeps on time: penalty 3.7 -> 1.8
    assert p.choose(8, clock() + 0.06) == 4
    p.record(40, missed=False)
    assert p.choose(8, clock() + 0.06) == before


def test_policy_bounds_are_checked() -> None:
    with pytest.raises(ValueError):
        DepthPolicy(3, 2)
    with pytest.raises(ValueError):
        DepthPolicy(0, 2)


def test_sleep_deadlines() -> None:
    assert sleep_deadline("hard", 5.0, 8, 100.0) == 5.0
    assert sleep_deadline("lagged", 5.0, 8, 100.0) == pytest.approx(5.08)
    assert sleep_deadline("lagged", 5.0, 0, 100.0) == 5.0
    with pytest.raises(ValueError):
        sleep_deadline("soft", 5.0, 8, 100.0)


def test_decode_rate_is_the_first_quartile_step_once_a_window_is_observed_the_fastest_before() -> None:
    """A lagged deadline must not come late: a young estimate takes the shortest interval seen, a full
    window its first quartile, which a few slow steps (boundaries) do not move, as they would a mean,
    and which half the steps do not beat, as they do a median."""
    rate = DecodeRate(initial=50.0, window=5)
    assert rate.rate == 50.0
    rate.observe(0.004)
    rate.observe(0.002)
    rate.observe(0.0)  # ignored: no time passed
    assert rate.rate == pytest.approx(500.0)  # young: the fastest step
    for seconds in (0.010, 0.002, 0.003):
        rate.observe(seconds)
    assert rate.rate == pytest.approx(1 / 0.002)  # the quartile of 4, 2, 10, 2, 3 ms (the median is 3)
    assert DecodeRate(50.0, window=5, quantile=0.5).rate == 50.0
    median = DecodeRate(50.0, window=5, quantile=0.5)
    for seconds in (0.004, 0.002, 0.010, 0.002, 0.003):
        median.observe(seconds)
    assert median.rate == pytest.approx(1 / 0.003)  # (the mean, 4.2 ms, is late)
    for _ in range(5):
        rate.observe(0.008)  # the window moves on
    assert rate.rate == pytest.approx(125.0)
    with pytest.raises(ValueError):
        DecodeRate(initial=50.0, window=5, quantile=1.5)
    with pytest.raises(ValueError):
        DecodeRate(initial=50.0, window=0)
