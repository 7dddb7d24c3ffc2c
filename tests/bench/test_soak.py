"""bench.soak: the smoke size end to end (a real server, killed and restarted, on a real redis-server
restarted on its AOF), and the pure pieces it reports with."""

from __future__ import annotations

import json
from collections import Counter

from bench.soak import Outage, Turn, error_kind, main
from bench.soak_report import floors

MINUTE_KEYS = {
    "minute": int,
    "itl_p50_ms": float,
    "itl_p99_ms": float,
    "ttft_p50_ms": float,
    "ttft_p99_ms": float,
    "requests": int,
    "errors": dict,
    "sleeps": int,
    "deadline_misses": int,
    "rss_bytes": int,
}


def test_error_kinds_name_the_status_and_code() -> None:
    body = json.dumps({"error": {"message": "busy", "code": "session_busy"}})
    assert error_kind(f"HTTP 409: {body}") == "http_409_session_busy"
    assert error_kind("HTTP 502: <html>") == "http_502"
    assert error_kind('stream error: {"code": "store_unavailable"}') == "stream_store_unavailable"
    assert error_kind("ConnectError: [Errno 111] Connection refused") == "ConnectError"


def test_a_restart_window_covers_the_requests_it_overlaps() -> None:
    outage = Outage("server", start=10.0, end=20.0)
    assert outage.covers(Turn("s", start=9.0, end=10.5))  # in flight at the kill
    assert outage.covers(Turn("s", start=19.0, end=25.0))  # sent before the leases expired
    assert not outage.covers(Turn("s", start=5.0, end=9.9))
    assert not outage.covers(Turn("s", start=20.0, end=21.0))


def test_floors_leave_out_the_restart_windows_and_compare_the_last_minute_with_the_first() -> None:
    def minute(m: int, p99: float, rss: int, errors: dict, sleeps: int, misses: int) -> dict:
        row = dict.fromkeys(MINUTE_KEYS, 0.0) | {"minute": m, "itl_p99_ms": p99, "rss_bytes": rss}
        return row | {"errors": errors, "sleeps": sleeps, "deadline_misses": misses}

    report = {
        "minutes": [
            minute(0, 10.0, 1000, {}, 500, 2),
            minute(1, 30.0, 1100, {"restart_window/ConnectError": 40}, 100, 0),
            minute(2, 12.0, 1040, {}, 400, 3),
        ],
        "sessions_lost": 0,
        "turns_ok": 90,
        "turns_stored": 90,
    }
    held = {
        name: floor["holds"] for name, floor in floors(report, inconsistent=0, unanswered=Counter()).items()
    }
    assert all(held.values()), held  # 1.2x p99, +4% RSS, 5 misses in 1000 sleeps
    report["minutes"][2] = minute(2, 12.5, 1060, {"http_500": 1}, 400, 12)
    report["turns_stored"] = 91
    held = {
        name: floor["holds"]
        for name, floor in floors(report, inconsistent=0, unanswered=Counter(server=1)).items()
    }
    assert not any(held.values()), held


def test_the_smoke_run_writes_soak_json_and_keeps_every_session(tmp_path) -> None:
    out = tmp_path / "soak.json"
    main(["--smoke", "--out", str(out)])
    report = json.loads(out.read_text())
    shape = {"machine", "minutes", "sessions", "sessions_lost", "turns_ok", "turns_stored"}
    assert set(report) == shape | {"floors", "provenance"}
    assert isinstance(report["machine"], str) and report["sessions"] == 4
    rows = report["minutes"]
    assert [row["minute"] for row in rows] == [0, 1, 2]
    for row in rows:
        assert {key: type(row[key]) for key in row} == MINUTE_KEYS, row
        assert row["rss_bytes"] > 0 and row["deadline_misses"] <= row["sleeps"]
    errors = [kind for row in rows for kind in row["errors"]]
    assert any(kind.startswith("restart_window/") for kind in errors), "the kill -9 cut no request"
    assert all(kind.startswith("restart_window/") for kind in errors), errors
    assert sum(row["sleeps"] for row in rows) > 0 and rows[0]["itl_p99_ms"] > 0
    # Every turn answered 200 is stored; a turn cut by a restart may be stored too (saved, then the
    # answer lost), never more of them than were cut.
    cut = sum(n for row in rows for kind, n in row["errors"].items())
    assert report["sessions_lost"] == 0 and 0 < report["turns_ok"] <= report["turns_stored"]
    assert report["turns_stored"] - report["turns_ok"] <= cut
    assert out.with_suffix(".png").stat().st_size > 0
