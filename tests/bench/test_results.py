"""The committed results: one per benchmark of bench/registry.py, each made with the shipped checkpoint
(or says what else it was made with), and the tables of the docs rendered from them as they are now."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.record import RESULTS, checkpoint_fingerprint
from bench.registry import BENCHMARKS
from bench.report import DOCUMENTS, MARKERS, RENDERERS, stale_parts
from model.checkpoint import DEFAULT_CHECKPOINT
from model.config import ModelConfig

JSONS = sorted(RESULTS.glob("*.json"))


def test_results_hold_one_file_set_per_benchmark() -> None:
    """No variants beside the current run (git history keeps those)."""
    stems = {Path(benchmark.result).stem for benchmark in BENCHMARKS}
    strays = sorted(path.name for path in RESULTS.iterdir() if path.stem not in stems)
    assert strays == []
    assert {path.name for path in JSONS} == {b.result for b in BENCHMARKS if b.writes_json}


@pytest.mark.parametrize("path", JSONS, ids=lambda path: path.name)
def test_result_made_with_the_shipped_checkpoint(path: Path) -> None:
    provenance = json.loads(path.read_text())["provenance"]
    assert provenance["commit"]
    made_with = provenance["made_with"]
    if made_with["weights"] == "checkpoint":
        assert made_with["checkpoint"] == "checkpoints/sleepy-mix"
        assert made_with["fingerprint"] == checkpoint_fingerprint(), (
            "made with an older checkpoint: re-run it"
        )
    elif made_with["weights"] == "random":
        if made_with[
            "shipped_config"
        ]:  # then it must still be the shipped config (fields added since: defaults)
            assert ModelConfig.from_dict(made_with["config"]) == ModelConfig.load(
                DEFAULT_CHECKPOINT / "config.json"
            )
    else:
        assert made_with["weights"] == "trained by the benchmark" and made_with["models"]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_generated_docs_match_their_sources(document: Path) -> None:
    """The results tables say what bench/results holds, the settings table what server/settings.py
    defines: `python -m bench.report` rewrites them."""
    assert stale_parts(document) == []


def test_every_table_is_published() -> None:
    published = {match["name"] for path in DOCUMENTS for match in MARKERS.finditer(path.read_text())}
    assert published == set(RENDERERS)
