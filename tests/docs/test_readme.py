"""The README's examples, run as written against a real server on the shipped checkpoint: every fenced
python and bash block (the address swapped for the test server's), each value marked `# → value` checked
against what it prints. The setup commands of the quick start (`make serve`, `make test`) are what the
server fixture and CI run; they are listed here so a new command in the README cannot go untested."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import ROOT, ServerProcess

README = ROOT / "README.md"
BLOCK = re.compile(r"^```(python|bash)\n(.*?)^```", re.M | re.S)
ARROW = re.compile(r"#\s*→\s*(\S+)")
NOT_RUN_HERE = {"make serve", "make test"}  # the fixture starts what `make serve` starts; CI is `make test`


def blocks(kind: str) -> list[str]:
    return [code for found, code in BLOCK.findall(README.read_text()) if found == kind]


def checked(code: str) -> str:
    """`code` with each `print(x)  # → value` turned into a check that x prints as value."""
    return re.sub(
        r"^(\s*)print\((.*)\)\s*#\s*→\s*(\S+).*$",
        lambda m: f"{m[1]}assert str({m[2]}) == {m[3]!r}, ({m[2]!r}, str({m[2]}))",
        code,
        flags=re.M,
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """`python -m server` on the shipped checkpoint with its defaults (the served name is the folder's)."""
    log = tmp_path_factory.mktemp("readme") / "server.log"
    process = ServerProcess(ROOT / "checkpoints" / "sleepy-mix", "memory", log, model_name="sleepy-mix")
    yield process
    process.stop()


def local(code: str, server: ServerProcess) -> str:
    return code.replace("http://localhost:8000", server.url).replace("localhost:8000", server.url)


def test_readme_python_examples(server: ServerProcess) -> None:
    code = "\n".join(checked(local(block, server)) for block in blocks("python"))
    assert code.count("assert str(") >= 3  # the demo answer, the session's answer, its token count
    exec(compile(code, str(README), "exec"), {})


def test_readme_shell_examples(server: ServerProcess) -> None:
    for block in blocks("bash"):
        commands = {line.split("#")[0].strip() for line in block.splitlines()} - {""}
        if commands <= NOT_RUN_HERE:
            continue
        expected = ARROW.findall(block)
        run = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", local(block, server)],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"},
        )
        assert run.returncode == 0, run.stderr
        assert run.stdout.split("\n")[: len(expected)] == expected, run.stdout


def test_every_readme_shell_command_is_run_or_listed() -> None:
    """Each command of a bash block the tests do not run is one of the quick start's."""
    skipped = [block for block in blocks("bash") if ARROW.search(block) is None]
    commands = {line.split("#")[0].strip() for block in skipped for line in block.splitlines()} - {""}
    assert commands <= NOT_RUN_HERE


def test_readme_stays_short() -> None:
    """A README for users: design notes go to docs/design.md, benchmark detail to docs/benchmarks.md."""
    assert len(README.read_text().splitlines()) <= 250
