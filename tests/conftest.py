"""Shared fixtures.

Redis: tests run against a REAL `redis-server` binary (`make test` installs it; or
`apt-get install -y redis-server`). Without it the Redis fixtures fail, they never skip.

- `redis_server` (session scope): the URL `redis://127.0.0.1:N/0` of one server shared by the whole
  run. Tests sharing it keep apart with their own key prefix (e.g. `key_prefix=f"t:{uuid4().hex}:"`).
- `start_redis` (function scope): starts extra independent servers on demand and kills them at the end
  of the test. `srv = start_redis(appendonly=True)` gives a started `RedisServer` (`srv.url`,
  `srv.port`); `srv.stop(kill=True)` is a `kill -9`, `srv.start()` brings it back on the same port and
  data directory, so with `appendonly=True` (AOF, fsync on every write) the data survives restarts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import RedisServer, tiny_model


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a real redis-server shared by the test session."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server.url
    server.stop(kill=True)


@pytest.fixture
def start_redis(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Factory of extra started redis-servers, `start_redis(port=None, appendonly=True)`; all are
    killed at the end of the test."""
    servers: list[RedisServer] = []

    def start(port: int | None = None, appendonly: bool = True) -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{len(servers)}", port, appendonly)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop(kill=True)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory of saved tiny checkpoints, `tiny_checkpoint(schedule="lagged", variable_chunks=False,
    seed=0)` -> folder (built once per argument set)."""
    from model.checkpoint import save_checkpoint

    built: dict[tuple, Path] = {}

    def make(schedule: str = "lagged", variable_chunks: bool = False, seed: int = 0) -> Path:
        key = (schedule, variable_chunks, seed)
        if key not in built:
            folder = tmp_path_factory.mktemp(f"tiny-{schedule}-{int(variable_chunks)}-{seed}")
            save_checkpoint(tiny_model(schedule, variable_chunks, seed), folder)
            built[key] = folder
        return built[key]

    return make
