"""bench/sleep_pass.py: its rows, one per batch and N, each timed."""

from __future__ import annotations

import json

from bench import sleep_pass
from bench.models import random_model_config


def test_sleep_pass_times_each_batch_and_depth(tmp_path) -> None:
    out = tmp_path / "sleep_pass.json"
    report = sleep_pass.main(["--repeats", "3", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    rows = report["sleeps"]
    assert [(r["sessions"], r["passes"]) for r in rows] == [(s, n) for s in (8, 1) for n in (1, 2, 3, 4)]
    assert all(r["sleep_ms"] > 0 and r["chunk_prefill_ms"] > 0 for r in rows)
    assert report["config"] == random_model_config(None).to_dict() and report["threads"] == 1
