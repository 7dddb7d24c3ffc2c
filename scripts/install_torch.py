"""Install torch (pyproject.toml's requirement) into this Python's environment before the project:
the CPU build where no NVIDIA GPU is present.

On Linux, PyPI's torch carries CUDA (several GB of nvidia-* packages) that a machine without a GPU never
uses; PyTorch's CPU index has the same torch without them (the Dockerfile installs from it too). A CPU
wheel that pip finds by itself (a local wheel folder, as on this project's CI) is taken as it is, so the
CPU index is asked only where pip would otherwise pull the CUDA build. `pip install .` then finds torch
satisfied. Run as `python scripts/install_torch.py` (the Makefile's install does)."""

from __future__ import annotations

import importlib.util
import json
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def requirement() -> str:
    """The torch requirement of pyproject.toml's dependencies, e.g. "torch>=2.4,<2.14"."""
    found = re.search(r'"(torch[<>=!~ ][^"]*)"', PYPROJECT.read_text())
    if found is None:
        raise SystemExit(f"no torch requirement in {PYPROJECT}")
    return found.group(1)


def has_nvidia_gpu() -> bool:
    smi = shutil.which("nvidia-smi")
    return smi is not None and subprocess.run([smi, "-L"], capture_output=True).returncode == 0


def pip_would_pick(spec: str) -> str:
    """The torch version a plain `pip install` would take here (resolved only, nothing downloaded
    beyond its metadata)."""
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps"]
    report = subprocess.run(
        [*command, "--quiet", "--report", "-", spec],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(report.stdout)["install"][0]["metadata"]["version"]


def main() -> int:
    spec = requirement()
    pip = [sys.executable, "-m", "pip", "install", spec]
    if importlib.util.find_spec("torch") is not None:  # installed already: `pip install .` keeps it
        return 0
    if platform.system() != "Linux" or has_nvidia_gpu():
        print(f"installing {spec} from the package index", flush=True)
    elif "+cpu" in pip_would_pick(spec):
        print(f"no NVIDIA GPU: installing {spec}, the CPU build pip finds here", flush=True)
    else:
        print(f"no NVIDIA GPU: installing {spec}, the CPU build, from {CPU_INDEX}", flush=True)
        pip += ["--index-url", CPU_INDEX]
    return subprocess.run(pip).returncode


if __name__ == "__main__":
    sys.exit(main())
