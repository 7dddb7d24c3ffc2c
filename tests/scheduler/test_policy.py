from __future__ import annotations

import pytest

from scheduler.policy import DecodeRate, DepthPolicy, sleep_deadline


def policy(clock, **kwargs) -> DepthPolicy:
    p = DepthPolicy(1, 8, clock=clock, **kwargs)
    p.seed(8, 0.01)  # one pass over 8 tokens: 10 ms
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
    p = policy(clock, ema=0.5)
    p.observe(8, passes=4, seconds=0.08)  # 20 ms per pass: EMA 10 -> 15 ms
    assert p.pass_seconds(8) == pytest.approx(0.015)
    assert p.pass_seconds(16) == pytest.approx(0.030)  # unseen length: nearest, scaled
    assert DepthPolicy(1, 4, token_pass_seconds=1e-3, clock=clock).pass_seconds(8) == pytest.approx(0.008)
    assert p.estimate(8, 3) == pytest.approx(0.045)


def test_a_missed_deadline_makes_the_next_jobs_shallower_for_a_while(clock) -> None:
    p = policy(clock, miss_penalty=2.0, penalty_half_life=10.0)
    before = p.choose(8, clock() + 0.06)
    assert before == 6
    p.record_miss()
    assert p.choose(8, clock() + 0.06) == 4
    p.record_miss()
    assert p.choose(8, clock() + 0.06) == 2
    clock.advance(10.0)  # penalty 4 -> 2
    assert p.choose(8, clock() + 0.06) == 4
    clock.advance(100.0)
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


def test_decode_rate_ema() -> None:
    rate = DecodeRate(initial=50.0, ema=0.5)
    assert rate.rate == 50.0
    rate.observe(10, 0.1)  # first observation replaces the guess
    assert rate.rate == pytest.approx(100.0)
    rate.observe(20, 0.1)
    assert rate.rate == pytest.approx(150.0)
    rate.observe(0, 0.0)  # ignored
    assert rate.rate == pytest.approx(150.0)
