"""Child processes for the benchmarks: a real `redis-server` and HTTP servers on free ports."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def redis_args(binary: str, port: int, folder: Path, appendonly: bool) -> list[str]:
    """The command line of a `redis-server` on 127.0.0.1:`port` keeping its files in `folder`, no RDB
    snapshots; with `appendonly`, every write in its AOF before it answers (`appendfsync always`)."""
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(folder)]
    return args + (
        ["--appendonly", "yes", "--appendfsync", "always"] if appendonly else ["--appendonly", "no"]
    )


class ChildProcess:
    """A process this benchmark started and can restart: `kill` is a kill -9 (a server's own children,
    such as its sleeper process, see their pipe close and exit), `stop` a clean stop."""

    process: subprocess.Popen | None = None

    def kill(self) -> None:
        """kill -9, and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)


class RedisProcess(ChildProcess):
    """A `redis-server` child on 127.0.0.1 that can be killed and started again on the same port and
    folder; with `appendonly`, every write is in its AOF before it answers (`appendfsync always`), so
    the data outlives a kill -9."""

    def __init__(self, folder: Path, appendonly: bool = False, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not on PATH: `apt-get install -y redis-server` (or `make system-deps`)"
            )
        self.port = port or free_port()
        self.args = redis_args(binary, self.port, folder, appendonly)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        """Start it and wait until it answers PING (with AOF: once it has loaded its data)."""
        self.process = subprocess.Popen(self.args, stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"redis-server exited at start (code {self.process.returncode})")
                try:
                    if client.ping():
                        return
                except redis.RedisError:  # not listening yet, or still loading its AOF
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"redis-server did not answer PING in {timeout} s") from None
                    time.sleep(0.02)
        finally:
            client.close()


@contextmanager
def redis_server(timeout: float = 10.0) -> Iterator[str]:
    """A throwaway `redis-server` (no persistence) on a free port; yields its URL."""
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as folder:
        server = RedisProcess(Path(folder))
        try:
            server.start(timeout)
            yield server.url
        finally:
            server.stop()


class ServerProcess(ChildProcess):
    """`python -m <module> --host 127.0.0.1 --port <port> <args>` as a child process (with `env` added to
    the environment), output appended to `log`, on a port fixed at construction so that it can be
    killed and started again where its clients expect it."""

    def __init__(self, module: str, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.module, self.args, self.log, self.env = module, args, log, env or {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 180.0, probe: str = "/health") -> None:
        """Start it and wait until `probe` answers 200."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    self.module,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    *self.args,
                ],
                cwd=ROOT,
                env={**os.environ, **self.env},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.module} exited at start:\n{self.log.read_text()[-4000:]}")
            try:
                if httpx.get(self.url + probe, timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.module} did not answer {probe} in {timeout} s:\n{self.log.read_text()[-4000:]}"
                )
            time.sleep(0.1)


@contextmanager
def http_server(
    module: str, args: list[str], log: Path, env: dict[str, str] | None = None, timeout: float = 180.0
) -> Iterator[str]:
    """A `ServerProcess` on a free port; yields its base URL once `GET /health` answers 200, and stops it
    at the end."""
    server = ServerProcess(module, args, log, env)
    try:
        server.start(timeout)
        yield server.url
    finally:
        server.stop()
