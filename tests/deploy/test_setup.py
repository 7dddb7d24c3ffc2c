"""scripts/install_torch.py, which `make install` runs before the project: it reads torch's requirement
from pyproject.toml and asks pip (a dry run) which build it would install here."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_script():
    spec = importlib.util.spec_from_file_location("install_torch", ROOT / "scripts" / "install_torch.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_install_torch_reads_the_requirement_and_resolves_it():
    script = load_script()
    spec = script.requirement()
    assert re.search(rf'^\s*"{re.escape(spec)}",', (ROOT / "pyproject.toml").read_text(), re.M), spec
    version = script.pip_would_pick(spec)  # what `pip install` would take here, nothing installed
    assert re.fullmatch(r"\d+\.\d+\.\d+(\+\w+)?", version), version
