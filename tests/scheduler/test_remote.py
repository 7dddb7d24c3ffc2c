"""Remote consolidation against a real redis-server: the record layout shared with RedisStore, and the
`python -m scheduler.worker` process end to end (consume, crash and redelivery, stale results)."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import torch

from model.checkpoint import fingerprint, load_checkpoint
from model.hybrid import HybridLM
from model.session import consolidate_all, feed, new_state, open_window
from model.state import SessionState
from scheduler.redis_state import RedisSessions, VersionConflict, split_record
from scheduler.remote import enqueue_idle_job, parse_job
from scheduler.worker import Worker, WorkerMetrics, WorkerOptions
from server.stores import RedisStore
from server.stores import VersionConflict as StoreConflict

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def client(redis_server: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_server)
    yield c
    c.close()


@pytest.fixture
def names() -> dict[str, str]:
    tag = uuid.uuid4().hex[:8]
    return {"prefix": f"t:{tag}:", "stream": f"t:{tag}:jobs", "group": f"g{tag}", "session": uuid.uuid4().hex}


def record(blob: bytes, history: list[str]) -> bytes:
    """The server's store record around a state blob (server/sessions.py pack_record)."""
    sidecar = ('{"messages":[' + ",".join(f'"{h}"' for h in history) + "]}").encode()
    return b"SSR1" + struct.pack("<I", len(sidecar)) + sidecar + blob


def make_state(model: HybridLM, tokens: int, seed: int = 0) -> SessionState:
    """A lagged session fed `tokens` tokens: one full chunk kept visible plus a partial one."""
    state = new_state(model)
    cache, _ = open_window(model, state)
    ids = torch.randint(0, 256, (tokens,), generator=torch.Generator().manual_seed(seed)).tolist()
    feed(model, state, cache, ids)
    return state


async def test_records_are_shared_with_redis_store(redis_server: str, client: redis.Redis, names) -> None:
    store = RedisStore(redis_server, session_ttl=60.0, key_prefix=names["prefix"])
    mine = RedisSessions(client, session_ttl=60.0, key_prefix=names["prefix"])
    sid = names["session"]
    try:
        assert await store.put(sid, b"one", None, owner="alice") == 1
        got = mine.get(sid)
        assert got is not None and (got.blob, got.version, got.owner) == (b"one", 1, "alice")
        assert mine.put(sid, b"two", 1) == 2
        stored = await store.get(sid)
        assert stored is not None and (stored.blob, stored.version, stored.owner) == (b"two", 2, "alice")
        with pytest.raises(VersionConflict):
            mine.put(sid, b"stale", 1)
        with pytest.raises(StoreConflict):
            await store.put(sid, b"stale", 1)
        assert await store.put(sid, b"three", 2) == 3
        assert mine.get(sid).blob == b"three"  # type: ignore[union-attr]
        assert 0 < client.pttl(mine.key(sid)) <= 60_000
        with pytest.raises(VersionConflict):
            mine.put(uuid.uuid4().hex, b"x", 1)  # an update of a session that does not exist
        assert mine.put("fresh", b"x", None, owner="bob") == 1
        assert (await store.get("fresh")).owner == "bob"  # type: ignore[union-attr]
        assert mine.get("absent") is None
        # Leases: one holder at a time across both implementations.
        assert mine.acquire_lease(sid, "worker", 5.0)
        assert not await store.acquire_lease(sid, "server", 5.0)
        mine.release_lease(sid, "worker")
        assert await store.acquire_lease(sid, "server", 5.0)
        assert not mine.acquire_lease(sid, "worker", 5.0)
        mine.release_lease(sid, "worker")  # not the holder: nothing happens
        assert not mine.acquire_lease(sid, "worker", 5.0)
    finally:
        await store.close()


def test_split_record_and_job_fields() -> None:
    assert split_record(record(b"BLOB", ["ab", "cd"])) == (record(b"", ["ab", "cd"]), b"BLOB")
    assert split_record(b"bare safetensors") == (b"", b"bare safetensors")

    class Recorder:  # stands in for a client: records what would be sent
        def xadd(self, stream, fields, **kwargs):
            return stream, {k.encode(): v.encode() for k, v in fields.items()}

    stream, fields = enqueue_idle_job(Recorder(), "jobs", "abc", 7, passes=3)
    job = parse_job(fields)
    assert (stream, job.session, job.version, job.passes, job.trigger) == ("jobs", "abc", 7, 3, "idle")
    assert parse_job({b"session": b"abc", b"version": b"2"}).passes is None
    with pytest.raises(ValueError):
        parse_job({b"session": b"abc", b"version": b"2", b"passes": b"0"})


# -- the worker process ------------------------------------------------------------------------------


def start_worker(
    checkpoint: Path, url: str, names: dict[str, str], consumer: str, pause: float = 0.0, *extra: str
) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLEEPSERVE_WORKER_PAUSE_SECONDS": str(pause)}
    args = [sys.executable, "-m", "scheduler.worker", "--checkpoint", str(checkpoint), "--store", url]
    args += ["--key-prefix", names["prefix"], "--stream", names["stream"], "--group", names["group"]]
    args += ["--consumer", consumer, "--metrics-port", "0", "--session-ttl", "600", *extra]
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def stop(process: subprocess.Popen[bytes]) -> str:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=30)
    return out.decode()


def wait_for(condition: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def acked(client: redis.Redis, names: dict[str, str], entry: bytes) -> bool:
    """The group has read `entry` and nothing is pending."""
    groups = [g for g in client.xinfo_groups(names["stream"]) if g["name"].decode() == names["group"]]
    if not groups:
        return False
    last = groups[0]["last-delivered-id"]
    read = tuple(map(int, last.split(b"-"))) >= tuple(map(int, entry.split(b"-")))
    return read and client.xpending(names["stream"], names["group"])["pending"] == 0


def expected_after(model: HybridLM, state: SessionState, passes: int) -> SessionState:
    local = state.clone()
    with torch.no_grad():
        consolidate_all(model, local, passes)
    return local


def assert_consolidated(stored: SessionState, want: SessionState, before: SessionState) -> None:
    assert stored.tail == [] and stored.prev_len == 0
    for got, ref in zip(stored.memory, want.memory, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    for name in ("tokens_seen", "chunks_consolidated", "consolidated_tokens", "sleep_passes", "last_passes"):
        assert getattr(stored, name) == getattr(want, name), name
    assert stored.chunks_consolidated == before.chunks_consolidated + 2


@pytest.fixture(scope="module")
def tiny(variable_checkpoint: Path) -> tuple[HybridLM, str]:
    model = load_checkpoint(variable_checkpoint)
    return model, fingerprint(model)


def park(client: redis.Redis, names: dict[str, str], model: HybridLM, fp: str, seed: int = 0):
    """Store a fed session as the server would (record with a sidecar), at version 1."""
    state = make_state(model, 13, seed)
    sessions = RedisSessions(client, 600.0, names["prefix"])
    blob = record(state.to_bytes(fp, model.config.window_capacity), ["0123456789abcdef"])
    assert sessions.put(names["session"], blob, None, owner="alice") == 1
    return state, sessions


def read_state(sessions: RedisSessions, sid: str, fp: str) -> tuple[int, bytes, SessionState]:
    stored = sessions.get(sid)
    assert stored is not None
    header, blob = split_record(stored.blob)
    return stored.version, header, SessionState.from_bytes(blob, fp, "lagged")


def test_worker_consolidates_a_parked_session(variable_checkpoint, redis_server, client, names, tiny) -> None:
    model, fp = tiny
    state, sessions = park(client, names, model, fp)
    sid = names["session"]
    stale = enqueue_idle_job(client, names["stream"], sid, 99)  # made for a version long gone: dropped
    missing = enqueue_idle_job(client, names["stream"], uuid.uuid4().hex, 1)
    entry = enqueue_idle_job(client, names["stream"], sid, 1, passes=3)
    worker = start_worker(variable_checkpoint, redis_server, names, "w1")
    try:
        wait_for(lambda: acked(client, names, entry), "the job to be acknowledged")
    finally:
        log = stop(worker)
    version, header, stored = read_state(sessions, sid, fp)
    assert version == 2 and header == record(b"", ["0123456789abcdef"])
    assert sessions.get(sid).owner == "alice"  # type: ignore[union-attr]
    assert_consolidated(stored, expected_after(model, state, 3), state)
    assert stored.last_passes == 3 and worker.returncode == 0
    assert f"job {stale.decode()}" in log and "[stale]" in log and "[missing]" in log
    assert f"job {missing.decode()}" in log and "[done]" in log, log


def test_worker_refuses_a_checkpoint_without_variable_chunks(tiny_checkpoint, redis_server, names) -> None:
    worker = start_worker(tiny_checkpoint(schedule="lagged", variable_chunks=False), redis_server, names, "w")
    out, _ = worker.communicate(timeout=60)
    assert worker.returncode == 2 and "variable chunk lengths" in out.decode()


def test_killed_worker_job_is_claimed_by_another(
    variable_checkpoint, redis_server, client, names, tiny
) -> None:
    model, fp = tiny
    state, sessions = park(client, names, model, fp, seed=1)
    sid = names["session"]
    entry = enqueue_idle_job(client, names["stream"], sid, 1, passes=2)
    first = start_worker(variable_checkpoint, redis_server, names, "doomed", 60.0, "--lease-ttl", "1")
    try:
        # The lease is taken once the job is being worked on; the pause keeps it from writing.
        wait_for(lambda: client.exists(sessions.lease_key(sid)), "the first worker to take the job")
        time.sleep(0.2)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    version, _, intact = read_state(sessions, sid, fp)
    assert version == 1 and intact.tail == state.tail  # nothing written, nothing lost
    assert client.xpending(names["stream"], names["group"])["pending"] == 1
    second = start_worker(variable_checkpoint, redis_server, names, "rescuer", 0.0, "--claim-after", "1")
    try:
        wait_for(lambda: acked(client, names, entry), "the job to be claimed and acknowledged")
    finally:
        log = stop(second)
    version, _, stored = read_state(sessions, sid, fp)
    assert version == 2, log
    assert_consolidated(stored, expected_after(model, state, 2), state)


def test_stale_result_is_discarded(variable_checkpoint, redis_server, client, names, tiny) -> None:
    model, fp = tiny
    _, sessions = park(client, names, model, fp, seed=2)
    sid = names["session"]
    entry = enqueue_idle_job(client, names["stream"], sid, 1)
    worker = start_worker(variable_checkpoint, redis_server, names, "slow", 3.0)
    try:
        wait_for(lambda: client.exists(sessions.lease_key(sid)), "the worker to take the job")
        time.sleep(1.0)  # it has read the session (a few ms after taking the lease) and pauses before writing
        newer = record(make_state(model, 21, seed=3).to_bytes(fp, model.config.window_capacity), [])
        assert sessions.put(sid, newer, 1) == 2  # the session moves on while the worker sleeps on it
        wait_for(lambda: acked(client, names, entry), "the job to be acknowledged")
    finally:
        log = stop(worker)
    stored = sessions.get(sid)
    assert stored is not None and (stored.version, stored.blob) == (2, newer)
    assert "[conflict]" in log, log


def test_in_process_worker_outcomes(client, names, tiny) -> None:
    """Busy sessions are retried after --claim-after, poison entries dropped, outcomes counted."""
    model, fp = tiny
    state, sessions = park(client, names, model, fp, seed=4)
    sid = names["session"]
    options = WorkerOptions(
        stream=names["stream"],
        group=names["group"],
        consumer="inproc",
        claim_after=0.2,
        max_deliveries=2,
        block_seconds=0.05,
    )
    metrics = WorkerMetrics()
    worker = Worker(model, client, sessions, options, metrics)
    worker.ensure_group()
    worker.ensure_group()  # idempotent
    assert sessions.acquire_lease(sid, "server", 30.0)  # a request is serving the session
    entry = enqueue_idle_job(client, names["stream"], sid, 1)
    client.xadd(names["stream"], {"nonsense": "1"})
    assert worker.poll() == 1 and worker.outcomes == {"busy": 1}
    assert worker.poll() == 1 and worker.outcomes == {"busy": 1, "malformed": 1}
    assert worker.poll() == 0  # nothing new; the busy job is not idle long enough to be claimed yet
    time.sleep(0.25)
    sessions.release_lease(sid, "server")
    assert worker.poll() == 1 and worker.outcomes["done"] == 1 and acked(client, names, entry)
    version, _, stored = read_state(sessions, sid, fp)
    assert version == 2
    assert_consolidated(stored, expected_after(model, state, model.config.sleep_passes), state)
    assert worker.poll() == 0  # nothing pending: the job is not redone
    # A job that keeps failing (the lease stays taken) is dropped after max_deliveries.
    assert sessions.acquire_lease(sid, "server", 30.0)
    enqueue_idle_job(client, names["stream"], sid, 2)
    for _ in range(4):
        worker.poll()
        time.sleep(0.25)
    outcomes = dict(worker.outcomes)
    assert outcomes["dropped"] == 1 and outcomes["busy"] == 1 + 2
    assert client.xpending(names["stream"], names["group"])["pending"] == 0
    registry = metrics.registry
    assert registry.get_sample_value("sleepserve_worker_jobs_total", {"outcome": "done"}) == 1
    assert registry.get_sample_value("sleepserve_sleep_tokens_total") == 13
