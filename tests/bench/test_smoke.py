"""Every benchmark of bench/registry.py runs end to end at its smallest size on the shipped checkpoint (or
its config) and writes its result in the shape of the committed one: a step that crashes, or a field
that the committed JSON has and a fresh run no longer writes, fails here."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import pytest

from bench.record import RESULTS
from bench.registry import BENCHMARKS, Benchmark


def missing_fields(committed: Any, fresh: Any, path: str = "") -> list[str]:
    """Paths of the fields `committed` has and `fresh` lacks: every key of a dict, and in a list of
    dicts the keys of its first element (the rows of a table share their fields)."""
    if isinstance(committed, dict) and isinstance(fresh, dict):
        return [
            missing
            for key, value in committed.items()
            for missing in (
                [f"{path}.{key}"] if key not in fresh else missing_fields(value, fresh[key], f"{path}.{key}")
            )
        ]
    if isinstance(committed, list) and isinstance(fresh, list) and committed and fresh:
        return missing_fields(committed[0], fresh[0], f"{path}[0]")
    return []


def test_missing_fields_names_what_a_fresh_result_lost() -> None:
    committed = {"a": 1, "rows": [{"x": 1, "y": {"z": 2}}], "floors": {"f": True}}
    assert missing_fields(committed, {"a": 2, "rows": [{"x": 3, "y": {"z": 4}}], "floors": {"f": 0}}) == []
    assert missing_fields(committed, {"rows": [{"x": 3, "y": {}}], "floors": {}}) == [
        ".a",
        ".rows[0].y.z",
        ".floors.f",
    ]


@pytest.mark.parametrize("benchmark", BENCHMARKS, ids=lambda b: b.name)
def test_benchmark_smoke(benchmark: Benchmark, tmp_path: Path) -> None:
    args = benchmark.smoke_args({name: str(tmp_path / name) for name in benchmark.smoke_folders})
    out = tmp_path / "results" / benchmark.result
    importlib.import_module(benchmark.module).main([*args, "--out", str(out)])

    committed = RESULTS / benchmark.result
    assert out.is_file(), f"{benchmark.module} wrote no {benchmark.result}"
    assert committed.is_file(), f"bench/results/{benchmark.result} is not committed"
    if committed.with_suffix(".png").is_file():
        assert out.with_suffix(".png").is_file(), f"{benchmark.module} wrote no PNG"
    if benchmark.writes_json:
        fresh = json.loads(out.read_text())
        assert missing_fields(json.loads(committed.read_text()), fresh) == []
        assert fresh["provenance"]["commit"]
