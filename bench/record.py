"""What every result file records beside its numbers: the commit it was made at and the model it was made
with (the shipped checkpoint's fingerprint, or the config of the random-weight or freshly trained model),
so that a test can tell a result made on the shipped checkpoint from one that predates it.

    write_result(path, report, made_with=checkpoint_record())      # or random_record(config)
"""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

from model.checkpoint import CONFIG, DEFAULT_CHECKPOINT, WEIGHTS
from model.config import ModelConfig

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def commit() -> str:
    """HEAD's hash, with "+dirty" when tracked files outside bench/results differ from it (a result
    written by an earlier step of the same run does not count); "unknown" outside a git checkout."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        clean = subprocess.run(
            ["git", "diff", "--quiet", "HEAD", "--", ".", ":(exclude)bench/results"], cwd=ROOT
        ).returncode
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("" if clean == 0 else "+dirty")


@functools.cache
def checkpoint_fingerprint(folder: Path = DEFAULT_CHECKPOINT) -> str:
    """SHA-256 of the checkpoint's files (its config and weights as stored): it changes when the checkpoint
    is retrained, not when the code that reads it gains a config field (as a session blob's would)."""
    digest = hashlib.sha256()
    for name in (CONFIG, WEIGHTS):
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()


def _shown(folder: Path) -> str:
    """`folder` relative to the repository where it lies inside it."""
    folder = Path(folder).resolve()
    return str(folder.relative_to(ROOT)) if folder.is_relative_to(ROOT) else str(folder)


def checkpoint_record(folder: Path = DEFAULT_CHECKPOINT) -> dict[str, Any]:
    """A result made with the trained weights of the checkpoint in `folder`."""
    return {
        "weights": "checkpoint",
        "checkpoint": _shown(folder),
        "fingerprint": checkpoint_fingerprint(folder),
    }


def random_record(config: ModelConfig) -> dict[str, Any]:
    """A result made with random weights of `config` (latency and size depend on the shapes alone);
    `shipped_config` says whether that is the shipped checkpoint's config."""
    shipped = DEFAULT_CHECKPOINT / "config.json"
    return {
        "weights": "random",
        "config": config.to_dict(),
        "shipped_config": shipped.is_file() and ModelConfig.load(shipped) == config,
    }


def trained_record(what: str) -> dict[str, Any]:
    """A result made with models trained by the benchmark itself (`what` says which)."""
    return {"weights": "trained by the benchmark", "models": what}


def made_with(source: str, config: ModelConfig) -> dict[str, Any]:
    """The record of `bench.models.product_model`'s model: the checkpoint in folder `source` where there
    is one, else random weights of `config`."""
    folder = Path(source)
    return checkpoint_record(folder) if (folder / "config.json").is_file() else random_record(config)


def write_result(path: Path, report: dict[str, Any], made_with: dict[str, Any]) -> dict[str, Any]:
    """Write `report` as JSON at `path` with its provenance (the commit and `made_with`); returns what
    it wrote."""
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {**report, "provenance": {"commit": commit(), "made_with": made_with}}
    path.write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")
    return record
