"""bench/real_decode.py at its smallest size: the JSON the issue asks for, both systems on one model."""

from __future__ import annotations

import json

from bench import real_decode


def test_real_decode_smoke(tmp_path) -> None:
    out = tmp_path / "real_decode.json"
    report = real_decode.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == report and out.with_suffix(".png").is_file()
    assert set(report) == {"machine", "model", "workload", "systems", "provenance"}
    assert report["model"]["parameters"] > 0 and report["model"]["layers"].count("gdn") == 3
    assert [s["name"] for s in report["systems"]] == ["sleepserve", "transformers"]
    for system in report["systems"]:
        assert set(system) == {"name", "method", "by_context", "output_tokens_per_s"}
        assert [r["context_tokens"] for r in system["by_context"]] == [64, 256]
        assert all(r["itl_ms"] > 0 and r["state_bytes"] > 0 for r in system["by_context"])
        assert system["output_tokens_per_s"] > 0
    ours, theirs = (s["by_context"] for s in report["systems"])
    assert ours[0]["state_bytes"] == ours[1]["state_bytes"]  # a session's state: the same at any length
    assert theirs[1]["state_bytes"] > theirs[0]["state_bytes"]  # the KV cache grows with the context
