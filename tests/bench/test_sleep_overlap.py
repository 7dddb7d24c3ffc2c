"""bench.sleep_overlap's reading of a server's metrics: samples by label, engine steps and output
hand-offs pooled over rounds."""

from __future__ import annotations

import pytest

from bench.sleep_overlap import rounds_in_turn, scrape, server_means, server_times

METRICS = """\
# HELP sleepserve_engine_step_seconds Duration of an engine iteration.
sleepserve_engine_step_seconds_count{boundary="none"} 90.0
sleepserve_engine_step_seconds_sum{boundary="none"} 0.18
sleepserve_engine_step_seconds_count{boundary="crossed"} 10.0
sleepserve_engine_step_seconds_sum{boundary="crossed"} 0.05
sleepserve_sleep_duration_seconds_count{trigger="idle"} 2.0
sleepserve_sleep_duration_seconds_count{trigger="window_full"} 3.0
sleepserve_sleep_deadline_misses_total 1.0
sleepserve_output_handoff_seconds_bucket{le="0.001"} 80.0
sleepserve_output_handoff_seconds_bucket{le="0.002"} 95.0
sleepserve_output_handoff_seconds_bucket{le="+Inf"} 100.0
sleepserve_output_handoff_seconds_count 100.0
sleepserve_output_handoff_seconds_sum 0.06
"""


def test_scrape_sums_the_label_sets_that_match() -> None:
    assert scrape(METRICS, "sleepserve_sleep_duration_seconds_count") == 5.0
    assert scrape(METRICS, "sleepserve_sleep_duration_seconds_count", trigger="idle") == 2.0
    assert scrape(METRICS, "sleepserve_sleep_deadline_misses_total") == 1.0
    assert scrape(METRICS, "sleepserve_engine_step_seconds_sum", boundary="crossed") == 0.05
    assert scrape(METRICS, "sleepserve_engine_step_seconds_sum", boundary="other") == 0.0


def test_server_means_pool_the_rounds() -> None:
    one = server_times(lambda name, **labels: scrape(METRICS, name, **labels))
    assert one["steps"] == {"none": [0.18, 90.0], "crossed": [0.05, 10.0]}
    assert one["handoff"] == [0.06, 100.0, 5.0]  # 5 of 100 slower than 2 ms
    idle = {"steps": {"none": [0.02, 10.0], "crossed": [0.0, 0.0]}, "handoff": [0.0, 0.0, 0.0]}
    means = server_means([one, idle])
    assert means["step_ms_none"] == pytest.approx(2.0)  # 0.2 s over 100 steps
    assert means["step_ms_crossed"] == pytest.approx(5.0)
    assert means["crossing_steps"] == 10
    assert means["handoff_ms_mean"] == pytest.approx(0.6)
    assert means["handoff_share_slow"] == pytest.approx(0.05)
    quiet = server_means([idle])
    assert quiet["step_ms_crossed"] == quiet["handoff_ms_mean"] == 0.0  # nothing counted: no division


def test_rounds_warm_up_then_alternate_the_order() -> None:
    """Round 0 (the warm-up) and every even round run the systems in reverse; the odd ones in order."""
    assert list(rounds_in_turn(["a", "b", "c"], 2)) == [
        (0, "c"), (0, "b"), (0, "a"), (1, "a"), (1, "b"), (1, "c"), (2, "c"), (2, "b"), (2, "a"),
    ]  # fmt: skip


def test_the_benchmark_end_to_end_counts_each_measured_round_alone(tmp_path) -> None:
    """Four real servers, a warm-up round, then 2 measured rounds of 2 streams across 6 boundaries: each
    system's counters are those of its measured rounds only (the warm-up's are not in them), the
    report has every system and floor, and the plot is written."""
    from bench.sleep_overlap import main

    out = tmp_path / "sleep_overlap.json"
    report = main(["--rounds", "2", "--streams", "2", "--boundaries", "6", "--out", str(out)])
    rows = {row["name"]: row for row in report["systems"]}
    assert list(rows) == ["no-sleep", "hard-sync", "hard-scheduled", "lagged-scheduled"]
    crossings = 2 * 2 * 7  # rounds × streams × boundaries crossed (6, then the last window's)
    for name in ("no-sleep", "hard-sync", "hard-scheduled"):  # hard: a sleep at every crossing
        assert rows[name]["sleeps"] == crossings, name
        assert len(rows[name]["itl_p99_ms_rounds"]) == 2
    # lagged sleeps on the chunk before, so one fewer a stream, and the last one may end with its
    # request (dropped, not counted) or before it.
    assert crossings - 2 * 2 <= rows["lagged-scheduled"]["sleeps"] <= crossings
    assert (
        rows["lagged-scheduled"]["decode_stalls"] == 0
        and rows["hard-scheduled"]["decode_stalls"] == crossings
    )
    # The scheduled systems run as the floors ask: N in [3, 4] by the scheduler, at a share of 0.15.
    lagged_flags = rows["lagged-scheduled"]["flags"]
    assert lagged_flags[lagged_flags.index("--min-passes") + 1] == "3"
    assert lagged_flags[lagged_flags.index("--sleep-share") + 1] == "0.15"
    assert 3.0 <= rows["lagged-scheduled"]["mean_passes"] <= 4.0
    assert set(report["floors"]) == {
        "lagged_p99_within_1.25x_of_no_sleep",
        "lagged_zero_deadline_misses",
        "lagged_mean_passes_at_least_3",
    }
    assert out.with_suffix(".png").stat().st_size > 0
