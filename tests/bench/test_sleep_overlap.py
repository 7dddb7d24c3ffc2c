"""bench.sleep_overlap's reading of a server's metrics: samples by label, engine steps pooled over rounds."""

from __future__ import annotations

import pytest

from bench.sleep_overlap import scrape, step_means, step_times

METRICS = """\
# HELP sleepserve_engine_step_seconds Duration of an engine iteration.
sleepserve_engine_step_seconds_count{boundary="none"} 90.0
sleepserve_engine_step_seconds_sum{boundary="none"} 0.18
sleepserve_engine_step_seconds_count{boundary="crossed"} 10.0
sleepserve_engine_step_seconds_sum{boundary="crossed"} 0.05
sleepserve_sleep_duration_seconds_count{trigger="idle"} 2.0
sleepserve_sleep_duration_seconds_count{trigger="window_full"} 3.0
sleepserve_sleep_deadline_misses_total 1.0
"""


def test_scrape_sums_the_label_sets_that_match() -> None:
    assert scrape(METRICS, "sleepserve_sleep_duration_seconds_count") == 5.0
    assert scrape(METRICS, "sleepserve_sleep_duration_seconds_count", trigger="idle") == 2.0
    assert scrape(METRICS, "sleepserve_sleep_deadline_misses_total") == 1.0
    assert scrape(METRICS, "sleepserve_engine_step_seconds_sum", boundary="crossed") == 0.05
    assert scrape(METRICS, "sleepserve_engine_step_seconds_sum", boundary="other") == 0.0


def test_step_means_pool_the_rounds() -> None:
    one = {"steps": step_times(lambda name, boundary: scrape(METRICS, name, boundary=boundary))}
    assert one["steps"] == {"none": [0.18, 90.0], "crossed": [0.05, 10.0]}
    idle = {"steps": {"none": [0.02, 10.0], "crossed": [0.0, 0.0]}}
    means = step_means([one, idle])
    assert means["step_ms_none"] == pytest.approx(2.0)  # 0.2 s over 100 steps
    assert means["step_ms_crossed"] == pytest.approx(5.0)
    assert means["crossing_steps"] == 10
    assert step_means([idle])["step_ms_crossed"] == 0.0  # no crossing step: no mean, no division
