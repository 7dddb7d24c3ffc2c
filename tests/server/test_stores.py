"""Session stores: one suite for both backends (memory, a real redis-server), then backend specifics."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from uuid import uuid4

import pytest

from server.metrics import Metrics
from server.stores import (
    MemoryStore,
    RedisStore,
    SessionStore,
    StoreError,
    StoreUnavailable,
    VersionConflict,
    open_store,
)

StoreFactory = Callable[..., SessionStore]


@pytest.fixture(params=["memory", "redis"])
async def make_store(request: pytest.FixtureRequest) -> AsyncIterator[StoreFactory]:
    """Factory of stores of one backend; Redis stores of one test share a fresh key prefix."""
    url = "memory" if request.param == "memory" else request.getfixturevalue("redis_server")
    prefix = f"test:{uuid4().hex}:"
    stores: list[SessionStore] = []

    def make(session_ttl: float = 60.0, **kwargs: object) -> SessionStore:
        store = open_store(url, session_ttl=session_ttl, key_prefix=prefix, **kwargs)
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()


async def test_round_trip(make_store: StoreFactory) -> None:
    store = make_store()
    blob = os.urandom(300_000) + b"\x00\r\n\xff"
    assert await store.get("s") is None
    assert await store.put("s", blob, None, owner="key-hash") == 1
    got = await store.get("s")
    assert got is not None and got.blob == blob and got.version == 1 and got.owner == "key-hash"
    assert await store.put("s", b"second", 1) == 2
    got = await store.get("s")
    assert got is not None and (got.blob, got.version, got.owner) == (b"second", 2, "key-hash")
    assert await store.put("anon", b"", None) == 1
    got = await store.get("anon")
    assert got is not None and (got.blob, got.owner) == (b"", None)
    assert await store.ping()


async def test_stale_writer_conflicts(make_store: StoreFactory) -> None:
    store = make_store()
    await store.put("s", b"v1", None)
    await store.put("s", b"v2", 1)
    with pytest.raises(VersionConflict, match="version 2, not 1"):
        await store.put("s", b"stale", 1)
    got = await store.get("s")
    assert got is not None and (got.blob, got.version) == (b"v2", 2)


async def test_create_and_update_conflicts(make_store: StoreFactory) -> None:
    store = make_store()
    await store.put("s", b"v1", None, owner="a")
    with pytest.raises(VersionConflict, match="already exists"):
        await store.put("s", b"other", None, owner="b")
    with pytest.raises(VersionConflict, match="does not exist"):
        await store.put("missing", b"x", 1)
    got = await store.get("s")
    assert got is not None and (got.blob, got.version, got.owner) == (b"v1", 1, "a")
    assert await store.get("missing") is None


async def test_delete(make_store: StoreFactory) -> None:
    store = make_store()
    await store.put("s", b"v1", None)
    await store.put("s", b"v2", 1)
    assert await store.delete("s")
    assert await store.get("s") is None
    assert not await store.delete("s")
    assert await store.put("s", b"new", None) == 1


async def test_leases(make_store: StoreFactory) -> None:
    store = make_store()
    assert await store.acquire_lease("s", "a", 10)
    assert not await store.acquire_lease("s", "b", 10)
    assert await store.acquire_lease("s", "a", 10)  # renewal by the holder
    await store.release_lease("s", "b")  # not the holder: no effect
    assert not await store.acquire_lease("s", "b", 10)
    await store.release_lease("s", "a")
    assert await store.acquire_lease("s", "b", 0.2)
    assert await store.acquire_lease("other", "a", 10)  # leases are per session
    await asyncio.sleep(0.3)
    assert await store.acquire_lease("s", "a", 10)  # b's lease expired by itself


async def test_idle_ttl(make_store: StoreFactory) -> None:
    store = make_store(session_ttl=0.5)
    await store.put("s", b"x", None)
    await asyncio.sleep(0.2)
    assert await store.get("s") is not None  # a read refreshes the idle TTL...
    await asyncio.sleep(0.35)
    assert await store.get("s") is not None  # ...so 0.55 s after the put it is still there
    await asyncio.sleep(0.7)
    assert await store.get("s") is None
    assert await store.count() == 0
    with pytest.raises(VersionConflict):
        await store.put("s", b"y", 1)


async def test_count(make_store: StoreFactory) -> None:
    store = make_store()
    assert await store.count() == 0
    for sid in ("a", "b", "c"):
        await store.put(sid, b"x", None)
    await store.acquire_lease("a", "h", 10)  # leases are not sessions
    assert await store.count() == 3
    await store.delete("b")
    assert await store.count() == 2


async def test_metrics(make_store: StoreFactory) -> None:
    metrics = Metrics()
    store = make_store(metrics=metrics)
    await store.put("s", b"x" * 5000, None)
    await store.get("s")
    with pytest.raises(VersionConflict):
        await store.put("s", b"x", None)
    sample = metrics.registry.get_sample_value
    labels = {"op": "put", "backend": store.backend}
    assert sample("sleepserve_store_operation_seconds_count", labels) == 2
    assert sample("sleepserve_store_operation_seconds_count", {**labels, "op": "get"}) == 1
    assert sample("sleepserve_store_errors_total", labels) is None  # a conflict is not a store failure
    assert sample("sleepserve_session_state_bytes_count") == 1
    assert sample("sleepserve_session_state_bytes_sum") == 5000


# --- memory only ---------------------------------------------------------------------------------


async def test_memory_lru_byte_budget() -> None:
    store = open_store("memory", session_ttl=60, max_bytes=250)
    await store.put("a", b"a" * 100, None)
    await store.put("b", b"b" * 100, None)
    await store.get("a")  # a becomes the most recently used
    await store.put("c", b"c" * 100, None)
    assert await store.get("b") is None
    assert await store.get("a") is not None and await store.get("c") is not None
    await store.put("big", b"x" * 1000, None)  # over budget alone: kept, all others evicted
    assert await store.count() == 1
    got = await store.get("big")
    assert got is not None and len(got.blob) == 1000


async def test_memory_from_another_thread_and_loop() -> None:
    """The engine thread reaches the store through another event loop (or run_coroutine_threadsafe)."""
    store = open_store("memory", session_ttl=60)
    await store.put("s", b"v1", None)
    other_loop = asyncio.new_event_loop()
    thread = threading.Thread(target=other_loop.run_forever)
    thread.start()
    try:
        future = asyncio.run_coroutine_threadsafe(store.put("s", b"v2", 1), other_loop)
        assert await asyncio.wrap_future(future) == 2
    finally:
        other_loop.call_soon_threadsafe(other_loop.stop)
        thread.join()
        other_loop.close()
    got = await store.get("s")
    assert got is not None and got.blob == b"v2"


# --- redis only ----------------------------------------------------------------------------------


async def test_redis_replicas_race_exactly_one_wins(redis_server: str) -> None:
    prefix = f"test:{uuid4().hex}:"
    replicas = [open_store(redis_server, session_ttl=60, key_prefix=prefix) for _ in range(2)]
    try:
        await replicas[0].put("s", b"base", None)
        writes = [replicas[i % 2].put("s", f"writer {i}".encode(), 1) for i in range(10)]
        results = await asyncio.gather(*writes, return_exceptions=True)
        winners = [i for i, r in enumerate(results) if r == 2]
        assert len(winners) == 1
        assert all(isinstance(r, VersionConflict) for i, r in enumerate(results) if i != winners[0])
        for replica in replicas:
            got = await replica.get("s")
            assert got is not None and (got.blob, got.version) == (f"writer {winners[0]}".encode(), 2)
        creates = await asyncio.gather(*(r.put("new", b"x", None) for r in replicas), return_exceptions=True)
        assert sorted(map(type, creates), key=str) == sorted([int, VersionConflict], key=str)
    finally:
        for replica in replicas:
            await replica.close()


async def test_redis_unreachable_fails_fast() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"redis://127.0.0.1:{s.getsockname()[1]}/0"  # nothing listens there
    metrics = Metrics()
    store = open_store(url, session_ttl=60, metrics=metrics)
    start = time.monotonic()
    with pytest.raises(StoreUnavailable, match=f"{url} is unreachable"):
        await store.get("s")
    with pytest.raises(StoreUnavailable):
        await store.put("s", b"x", None)
    assert not await store.ping()
    assert time.monotonic() - start < 3
    assert (
        metrics.registry.get_sample_value("sleepserve_store_errors_total", {"op": "get", "backend": "redis"})
        == 1
    )
    await store.close()


async def test_redis_survives_restart_and_kill(start_redis: Callable[..., Any]) -> None:
    server = start_redis(appendonly=True)
    store = open_store(server.url, session_ttl=60)
    try:
        blob = os.urandom(200_000)
        await store.put("s", blob, None, owner="o")
        server.stop(kill=True)  # kill -9
        with pytest.raises(StoreUnavailable):
            await store.get("s")
        with pytest.raises(StoreUnavailable):
            await store.put("s", b"lost", 1)
        assert not await store.ping()
        server.start()
        got = await store.get("s")  # the same store object reconnects
        assert got is not None and (got.blob, got.version, got.owner) == (blob, 1, "o")
        assert await store.put("s", b"v2", 1) == 2  # the CAS script is reloaded after the restart
        server.stop()  # clean shutdown
        server.start()
        got = await store.get("s")
        assert got is not None and (got.blob, got.version) == (b"v2", 2)
    finally:
        await store.close()


# --- open_store ----------------------------------------------------------------------------------


def test_open_store_urls() -> None:
    assert isinstance(open_store("memory", session_ttl=1), MemoryStore)
    assert isinstance(open_store("redis://127.0.0.1:1/0", session_ttl=1), RedisStore)
    with pytest.raises(ValueError, match="expected 'memory' or 'redis://host:port/db'"):
        open_store("postgres://u:secret@db/x", session_ttl=1)
    with pytest.raises(ValueError, match="session_ttl"):
        open_store("memory", session_ttl=0)


async def test_redis_messages_hide_the_password() -> None:
    store = open_store("redis://user:secret@127.0.0.1:1/0", session_ttl=1)
    with pytest.raises(StoreError) as error:
        await store.get("s")
    assert "secret" not in str(error.value) and "user:***@127.0.0.1:1" in str(error.value)
    await store.close()
