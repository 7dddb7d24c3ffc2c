"""bench.engine_itl: the engine-level latency benchmark runs both systems end to end and writes its JSON."""

from __future__ import annotations

import json
import os

import pytest

from bench import engine_itl


@pytest.mark.parametrize(
    "weights, construction, worker",
    [("random", "re-prefill", "process"), ("random", "stale-kv", "auto"), ("checkpoint", "stale-kv", "auto")],
)
def test_engine_itl_measures_both_systems(tmp_path, weights, construction, worker) -> None:
    """(The shipped checkpoint's own construction is stale-kv; `auto` sleeps interleaved on CPU.) The
    counters are the measured round's, and the caller's thread runs where it did before, whatever CPUs
    the systems ran on."""
    cpus = os.sched_getaffinity(0)
    out = tmp_path / "engine_itl.json"
    args = ["--streams", "2", "--boundaries", "3", "--rounds", "1", "--weights", weights, "--out", str(out)]
    report = engine_itl.main([*args, "--lagged-construction", construction, "--sleep-worker", worker])
    assert json.loads(out.read_text()) == report and report["weights"] == weights
    assert os.sched_getaffinity(0) == cpus
    assert report["lagged_construction"] == construction and report["sleep_worker"] == worker
    no_sleep, lagged = report["systems"]
    assert [no_sleep["name"], lagged["name"]] == ["no-sleep", "lagged-scheduled"]
    assert no_sleep["mean_passes"] == 1.0 and 1.0 <= lagged["mean_passes"] <= 4.0
    # The measured round's sleeps alone: 2 streams, 4 crossings each (not the warm-up round's too).
    assert no_sleep["sleeps"] == 2 * 4
    for row in (no_sleep, lagged):
        assert 0 < row["itl_p50_ms"] <= row["itl_p99_ms"] and len(row["itl_p99_ms_rounds"]) == 1
        assert row["crossing_steps"] >= 1 and row["step_ms_none"] > 0 and row["step_ms_crossed"] > 0
        assert row["handoff_ms_mean"] > 0 and 0 <= row["handoff_share_slow"] <= 1
    assert report["p99_ratio"] == lagged["itl_p99_ms"] / no_sleep["itl_p99_ms"]
