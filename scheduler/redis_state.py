"""Session records in Redis, read and written exactly as `server/stores.py`'s `RedisStore` does.

`scheduler/` may not import `server/`, so the key layout and the Lua scripts are repeated here (a test
checks both sides against each other): one hash `<prefix>session:<id>` with fields blob, version and
owner and an idle TTL; every write is a compare-and-set on the version (versions start at 1 and grow
by one per write); a lease `<prefix>lease:<id>` (holder, `SET PX`) marks the one holder serving it.

A stored blob is the server's record `b"SSR1" | u32 length | JSON sidecar | state blob` (see
`server/sessions.py`), or a bare state blob; `split_record` keeps the sidecar bytes untouched.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import redis

RECORD_MAGIC = b"SSR1"

# The session record's Lua scripts, used by this worker and by the server's RedisStore alike.
# KEYS[1] session hash. ARGV: expected version ('' to create), blob,
# owner, has owner ('1'/'0'), TTL ms. Returns the new version (> 0); 0 when an update finds no session;
# -v when the stored version v differs.
CAS_PUT = """
local current = redis.call('HGET', KEYS[1], 'version')
if ARGV[1] == '' then
  if current then return -tonumber(current) end
else
  if not current then return 0 end
  if current ~= ARGV[1] then return -tonumber(current) end
end
local version = (tonumber(current) or 0) + 1
redis.call('HSET', KEYS[1], 'blob', ARGV[2], 'version', version)
if ARGV[4] == '1' then redis.call('HSET', KEYS[1], 'owner', ARGV[3]) end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return version
"""

# KEYS[1] lease key. ARGV: holder, TTL ms. Takes a free lease or renews the holder's own; 1 when held.
ACQUIRE_LEASE = """
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
# KEYS[1] lease key. ARGV: holder. Deletes the lease only when the holder has it.
RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class VersionConflict(Exception):
    """The compare-and-set failed: the session changed (or vanished) since it was read."""


def cas_put_args(expected_version: int | None, blob: bytes, owner: str | None, ttl_ms: int) -> list:
    """ARGV of CAS_PUT (the server's RedisStore passes the same)."""
    return [
        "" if expected_version is None else str(expected_version),
        bytes(blob),
        owner or "",
        "0" if owner is None else "1",
        ttl_ms,
    ]


def record_fields(fields: dict[bytes, bytes]) -> tuple[bytes, int, str | None]:
    """(blob, version, owner) of a session hash read with HGETALL; ValueError when a field is missing
    or unreadable (a hash damaged outside the server)."""
    try:
        blob, version, owner = fields[b"blob"], int(fields[b"version"]), fields.get(b"owner")
        return blob, version, None if owner is None else owner.decode()
    except (KeyError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise ValueError(
            f"damaged session hash (fields {sorted(f.decode(errors='replace') for f in fields)})"
        ) from exc


def readable_owner(fields: dict[bytes, bytes]) -> str | None:
    """The owner tag of a session hash, None when it has none or it cannot be read."""
    try:
        return fields[b"owner"].decode()
    except (KeyError, UnicodeDecodeError):
        return None


@dataclass(frozen=True)
class StoredRecord:
    blob: bytes
    version: int
    owner: str | None


def split_record(record: bytes) -> tuple[bytes, bytes]:
    """(server record header with its sidecar, state blob); the header is empty for a bare blob."""
    if not record.startswith(RECORD_MAGIC):
        return b"", record
    (size,) = struct.unpack("<I", record[4:8])
    return record[: 8 + size], record[8 + size :]


class RedisSessions:
    """Synchronous access to the sessions of a `RedisStore` with the same `key_prefix`."""

    def __init__(self, client: redis.Redis, session_ttl: float, key_prefix: str = "sleepserve:") -> None:
        self.client, self.session_ttl, self.key_prefix = client, session_ttl, key_prefix
        self._cas_put = client.register_script(CAS_PUT)
        self._acquire = client.register_script(ACQUIRE_LEASE)
        self._release = client.register_script(RELEASE_LEASE)

    def key(self, session_id: str) -> str:
        return f"{self.key_prefix}session:{session_id}"

    def lease_key(self, session_id: str) -> str:
        return f"{self.key_prefix}lease:{session_id}"

    def get(self, session_id: str) -> StoredRecord | None:
        """The session or None; refreshes its idle TTL (as `RedisStore.get`)."""
        key = self.key(session_id)
        with self.client.pipeline(transaction=True) as pipe:
            fields, _ = pipe.hgetall(key).pexpire(key, self._ttl_ms()).execute()
        if not fields:
            return None
        return StoredRecord(*record_fields(fields))

    def put(
        self, session_id: str, blob: bytes, expected_version: int | None, owner: str | None = None
    ) -> int:
        """Compare-and-set write (as `RedisStore.put`); returns the new version or raises VersionConflict."""
        args = cas_put_args(expected_version, blob, owner, self._ttl_ms())
        result = int(self._cas_put(keys=[self.key(session_id)], args=args))
        if result <= 0:
            found = "no session" if result == 0 else f"version {-result}"
            raise VersionConflict(
                f"session {session_id!r}: expected version {expected_version}, found {found}"
            )
        return result

    def acquire_lease(self, session_id: str, holder: str, ttl_seconds: float) -> bool:
        ttl_ms = max(1, round(ttl_seconds * 1000))
        return bool(self._acquire(keys=[self.lease_key(session_id)], args=[holder, ttl_ms]))

    def release_lease(self, session_id: str, holder: str) -> None:
        self._release(keys=[self.lease_key(session_id)], args=[holder])

    def _ttl_ms(self) -> int:
        return max(1, round(self.session_ttl * 1000))
