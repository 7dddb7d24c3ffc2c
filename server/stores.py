"""Session stores: where a session's state blob lives between requests.

Two backends behind one async interface (`SessionStore`), picked by URL with `open_store`:

- `memory`: in-process, the embedded default. LRU with an idle TTL and a byte budget.
- `redis://host:port/db`: shared by replicas. One hash per session (blob, version, owner) with an idle
  TTL; every write is a compare-and-set on the version done by a Lua script, so two replicas can never
  overwrite each other's update; a lease (`SET NX PX`) lets one replica at a time serve a session.

Versions start at 1 and increment on every successful `put`. A writer holding a stale version gets
`VersionConflict`; an unreachable backend raises `StoreUnavailable` (the server answers 503). A failure
never deletes or corrupts what is already stored.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from scheduler.redis_state import (  # shared with the worker
    ACQUIRE_LEASE,
    CAS_PUT,
    RELEASE_LEASE,
    cas_put_args,
    readable_owner,
    record_fields,
)

if TYPE_CHECKING:
    from server.metrics import Metrics

__all__ = [
    "DamagedRecord",
    "LeaseHeld",
    "MemoryStore",
    "RedisStore",
    "SessionStore",
    "StoreError",
    "StoreUnavailable",
    "StoredSession",
    "VersionConflict",
    "open_store",
]


@dataclass(frozen=True)
class StoredSession:
    """A stored session: its state blob, its version (1 after creation) and its owner tag."""

    blob: bytes
    version: int
    owner: str | None


class StoreError(Exception):
    """Base of the session store errors."""


class StoreUnavailable(StoreError):
    """The backend cannot be reached (the server maps this to 503)."""


class VersionConflict(StoreError):
    """A compare-and-set failed: the session changed (or appeared, or vanished) since it was read."""


class DamagedRecord(StoreError):
    """A stored record that is not a session hash (written or damaged outside the server). `owner`:
    its owner tag when that much can be read."""

    def __init__(self, message: str, owner: str | None) -> None:
        super().__init__(message)
        self.owner = owner


class LeaseHeld(StoreError):
    """Another holder serves the session."""


class SessionStore(ABC):
    """Async session store. Implementations record `store_operation_seconds{op,backend}` per operation
    and `store_errors{op,backend}` per failure (a `VersionConflict` is an outcome, not a failure)."""

    backend: str

    def __init__(self, metrics: Metrics | None) -> None:
        self._metrics = metrics

    @abstractmethod
    async def get(self, session_id: str) -> StoredSession | None:
        """The session, or None when it does not exist (or expired). Refreshes its idle TTL."""

    @abstractmethod
    async def put(
        self, session_id: str, blob: bytes, expected_version: int | None, owner: str | None = None
    ) -> int:
        """Write the session and return its new version. `expected_version=None` creates it (conflict if
        it exists); otherwise the stored version must equal `expected_version` (conflict if it differs or
        the session is gone). On an update, `owner=None` keeps the stored owner. Refreshes the idle TTL."""

    @abstractmethod
    async def delete(self, session_id: str) -> bool:
        """Delete the session; True when it existed."""

    @abstractmethod
    async def acquire_lease(self, session_id: str, holder: str, ttl_seconds: float) -> bool:
        """Take the session's lease for `ttl_seconds` (renew it when `holder` already has it). False when
        another holder has it. A lease expires by itself."""

    @abstractmethod
    async def release_lease(self, session_id: str, holder: str) -> None:
        """Release the lease if `holder` has it; otherwise do nothing."""

    @abstractmethod
    async def ping(self) -> bool:
        """True when the backend answers. Never raises."""

    @abstractmethod
    async def count(self) -> int:
        """Number of sessions held."""

    @abstractmethod
    async def close(self) -> None:
        """Release the backend's resources."""

    @contextmanager
    def _measure(self, op: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        except VersionConflict:
            raise
        except Exception:
            if self._metrics is not None:
                self._metrics.store_errors.labels(op, self.backend).inc()
            raise
        finally:
            if self._metrics is not None:
                self._metrics.store_operation.labels(op=op, backend=self.backend).observe(
                    time.perf_counter() - start
                )

    def _observe_blob(self, blob: bytes) -> None:
        if self._metrics is not None:
            self._metrics.session_state_bytes.observe(len(blob))


@dataclass
class _Entry:
    session: StoredSession
    expires: float


class MemoryStore(SessionStore):
    """In-process store: LRU with an idle TTL and a byte budget.

    Every operation runs without awaiting under a `threading.Lock`, so it is atomic whatever event loop
    or thread calls it, and nothing is bound to a loop at construction."""

    backend = "memory"

    def __init__(self, session_ttl: float, max_bytes: int, metrics: Metrics | None = None) -> None:
        super().__init__(metrics)
        self.session_ttl = session_ttl
        self.max_bytes = max_bytes
        self._sessions: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._bytes = 0
        self._leases: dict[str, tuple[str, float]] = {}  # session id -> (holder, expiry)
        self._lock = threading.Lock()

    def _expire(self, now: float) -> None:
        # Entries are ordered by last use and the TTL is idle time, so the expired ones are at the front.
        while self._sessions:
            sid, entry = next(iter(self._sessions.items()))
            if entry.expires > now:
                return
            self._drop(sid)

    def _drop(self, session_id: str) -> None:
        entry = self._sessions.pop(session_id)
        self._bytes -= len(entry.session.blob)

    async def get(self, session_id: str) -> StoredSession | None:
        with self._measure("get"), self._lock:
            now = time.monotonic()
            self._expire(now)
            entry = self._sessions.get(session_id)
            if entry is None:
                return None
            entry.expires = now + self.session_ttl
            self._sessions.move_to_end(session_id)
            return entry.session

    async def put(
        self, session_id: str, blob: bytes, expected_version: int | None, owner: str | None = None
    ) -> int:
        """See `SessionStore.put`. When the byte budget is exceeded, the least recently used other
        sessions are evicted; the session just written is always kept."""
        with self._measure("put"), self._lock:
            now = time.monotonic()
            self._expire(now)
            entry = self._sessions.get(session_id)
            current = entry.session.version if entry else None
            if current != expected_version:
                raise VersionConflict(_conflict_message(session_id, expected_version, current))
            if entry is not None:
                owner = entry.session.owner if owner is None else owner
                self._drop(session_id)
            version = (current or 0) + 1
            blob = bytes(blob)
            self._sessions[session_id] = _Entry(StoredSession(blob, version, owner), now + self.session_ttl)
            self._bytes += len(blob)
            while self._bytes > self.max_bytes and len(self._sessions) > 1:
                self._drop(next(iter(self._sessions)))
            self._observe_blob(blob)
            return version

    async def delete(self, session_id: str) -> bool:
        with self._measure("delete"), self._lock:
            self._expire(time.monotonic())
            if session_id not in self._sessions:
                return False
            self._drop(session_id)
            return True

    async def acquire_lease(self, session_id: str, holder: str, ttl_seconds: float) -> bool:
        with self._measure("acquire_lease"), self._lock:
            now = time.monotonic()
            self._leases = {sid: lease for sid, lease in self._leases.items() if lease[1] > now}
            current = self._leases.get(session_id)
            if current is not None and current[0] != holder:
                return False
            self._leases[session_id] = (holder, now + ttl_seconds)
            return True

    async def release_lease(self, session_id: str, holder: str) -> None:
        with self._measure("release_lease"), self._lock:
            current = self._leases.get(session_id)
            if current is not None and current[0] == holder:
                del self._leases[session_id]

    async def ping(self) -> bool:
        return True

    async def count(self) -> int:
        with self._measure("count"), self._lock:
            self._expire(time.monotonic())
            return len(self._sessions)

    async def close(self) -> None:
        """Nothing to release: the sessions stay readable."""


CONNECT_TIMEOUT = 2.0  # seconds: a dead Redis fails fast
SOCKET_TIMEOUT = 5.0  # seconds per command: a few hundred KB is far below this


class RedisStore(SessionStore):
    """Redis store shared by replicas. Keys: `<prefix>session:<id>` (hash: blob, version, owner) and
    `<prefix>lease:<id>` (holder). Redis's own `maxmemory` bounds its size; there is no byte budget."""

    backend = "redis"

    def __init__(
        self, url: str, session_ttl: float, metrics: Metrics | None = None, key_prefix: str = "sleepserve:"
    ) -> None:
        super().__init__(metrics)
        self.url = _redact(url)
        self.session_ttl = session_ttl
        self.key_prefix = key_prefix
        # One immediate retry re-opens a pooled connection that a Redis restart closed.
        self._redis = aioredis.Redis.from_url(
            url,
            socket_connect_timeout=CONNECT_TIMEOUT,
            socket_timeout=SOCKET_TIMEOUT,
            retry=Retry(NoBackoff(), 1),
        )
        self._cas_put = self._redis.register_script(CAS_PUT)
        self._acquire = self._redis.register_script(ACQUIRE_LEASE)
        self._release = self._redis.register_script(RELEASE_LEASE)

    def _key(self, session_id: str) -> str:
        return f"{self.key_prefix}session:{session_id}"

    def _lease_key(self, session_id: str) -> str:
        return f"{self.key_prefix}lease:{session_id}"

    @property
    def _ttl_ms(self) -> int:
        return max(1, round(self.session_ttl * 1000))

    @contextmanager
    def _op(self, op: str) -> Iterator[None]:
        """Measure the operation and turn Redis failures into store errors."""
        with self._measure(op):
            try:
                yield
            except (RedisConnectionError, RedisTimeoutError, OSError) as e:
                raise StoreUnavailable(f"session store {self.url} is unreachable ({op}): {e}") from e
            except RedisError as e:
                raise StoreError(f"session store {self.url}: {op} failed: {e}") from e

    async def get(self, session_id: str) -> StoredSession | None:
        key = self._key(session_id)
        with self._op("get"):
            async with self._redis.pipeline(transaction=True) as pipe:
                fields, _ = await pipe.hgetall(key).pexpire(key, self._ttl_ms).execute()
        if not fields:
            return None
        try:
            return StoredSession(*record_fields(fields))
        except ValueError as exc:
            raise DamagedRecord(f"session record {session_id}: {exc}", readable_owner(fields)) from exc

    async def put(
        self, session_id: str, blob: bytes, expected_version: int | None, owner: str | None = None
    ) -> int:
        args = cas_put_args(expected_version, blob, owner, self._ttl_ms)
        with self._op("put"):
            result = int(await self._cas_put(keys=[self._key(session_id)], args=args))
            if result <= 0:
                raise VersionConflict(_conflict_message(session_id, expected_version, -result or None))
            self._observe_blob(blob)
            return result

    async def delete(self, session_id: str) -> bool:
        with self._op("delete"):
            return bool(await self._redis.delete(self._key(session_id)))

    async def acquire_lease(self, session_id: str, holder: str, ttl_seconds: float) -> bool:
        ttl_ms = max(1, round(ttl_seconds * 1000))
        with self._op("acquire_lease"):
            return bool(await self._acquire(keys=[self._lease_key(session_id)], args=[holder, ttl_ms]))

    async def release_lease(self, session_id: str, holder: str) -> None:
        with self._op("release_lease"):
            await self._release(keys=[self._lease_key(session_id)], args=[holder])

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except Exception:
            return False

    async def count(self) -> int:
        pattern = _glob_escape(self.key_prefix) + "session:*"
        with self._op("count"):
            return sum([1 async for _ in self._redis.scan_iter(match=pattern, count=1000)])

    async def close(self) -> None:
        await self._redis.aclose()


def _conflict_message(session_id: str, expected: int | None, current: int | None) -> str:
    if expected is None:
        return f"session {session_id!r} already exists (version {current})"
    if current is None:
        return f"session {session_id!r} does not exist (expected version {expected})"
    return f"session {session_id!r} is at version {current}, not {expected}: it was updated by another writer"


def _redact(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def open_store(
    url: str,
    *,
    session_ttl: float,
    max_bytes: int = 1 << 30,
    metrics: Metrics | None = None,
    key_prefix: str = "sleepserve:",
) -> SessionStore:
    """The store for `url`: `memory` or `redis://host:port/db` (`rediss://` for TLS). `session_ttl` is the
    idle time in seconds after which a session vanishes; `max_bytes` bounds the memory store only."""
    if session_ttl <= 0:
        raise ValueError(f"session_ttl must be positive, got {session_ttl}")
    if url == "memory":
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        return MemoryStore(session_ttl, max_bytes, metrics)
    if url.startswith(("redis://", "rediss://")):
        return RedisStore(url, session_ttl, metrics, key_prefix)
    raise ValueError(f"unknown session store {_redact(url)!r}: expected 'memory' or 'redis://host:port/db'")
