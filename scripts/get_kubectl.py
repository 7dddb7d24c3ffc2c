"""Download kubectl (Linux, amd64 or arm64) from dl.k8s.io into a folder, its SHA-256 checked: stock
Debian and Ubuntu have no kubectl package. Only the deploy tests need it (`kubectl kustomize`).
Run as `python scripts/get_kubectl.py FOLDER` (the Makefile's system-deps does, into the venv)."""

from __future__ import annotations

import hashlib
import platform
import sys
import urllib.request
from pathlib import Path

RELEASES = "https://dl.k8s.io/release"
ARCHES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: get_kubectl.py FOLDER", file=sys.stderr)
        return 2
    arch = ARCHES.get(platform.machine().lower())
    if platform.system() != "Linux" or arch is None:
        print(f"no kubectl download for {platform.system()} {platform.machine()}", file=sys.stderr)
        return 1
    try:
        version = fetch(f"{RELEASES}/stable.txt").decode().strip()
        url = f"{RELEASES}/{version}/bin/linux/{arch}/kubectl"
        print(f"downloading kubectl {version} from {url}", flush=True)
        binary, digest = fetch(url), fetch(f"{url}.sha256").decode().split()[0]
    except OSError as exc:
        print(f"cannot download kubectl from {RELEASES}: {exc}", file=sys.stderr)
        return 1
    if hashlib.sha256(binary).hexdigest() != digest:
        print(f"kubectl from {url}: SHA-256 mismatch, not installed", file=sys.stderr)
        return 1
    target = Path(argv[0]) / "kubectl"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(binary)
    target.chmod(0o755)
    print(f"kubectl installed at {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
