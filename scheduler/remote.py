"""Remote consolidation jobs on a Redis Stream: what the server enqueues and the worker consumes.

An entry's fields: `session` (id), `version` (the stored version the job was made for: a session that
moved on makes the job stale), `passes` (N, optional: the worker's default), `trigger`, `enqueued`
(Unix time). Consumers read with a consumer group (`XREADGROUP`), acknowledge with `XACK` only after
the result is stored, and claim a dead consumer's entries with `XAUTOCLAIM`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

DEFAULT_STREAM = "sleepserve:sleep-jobs"
DEFAULT_GROUP = "sleepserve-workers"
STREAM_MAXLEN = 100_000  # approximate trim: acknowledged entries do not pile up forever


@dataclass(frozen=True)
class RemoteJob:
    session: str
    version: int
    passes: int | None
    trigger: str
    enqueued: float


def job_fields(
    session_id: str, version: int, passes: int | None = None, trigger: str = "idle"
) -> dict[str, str]:
    fields = {
        "session": session_id,
        "version": str(version),
        "trigger": trigger,
        "enqueued": f"{time.time():.6f}",
    }
    if passes is not None:
        fields["passes"] = str(passes)
    return fields


def parse_job(fields: dict[bytes, bytes]) -> RemoteJob:
    """A stream entry's fields as a job; ValueError (or KeyError) when malformed."""
    text = {k.decode(): v.decode() for k, v in fields.items()}
    passes = int(text["passes"]) if text.get("passes") else None
    if passes is not None and passes < 1:
        raise ValueError(f"passes must be positive, got {passes}")
    return RemoteJob(
        session=text["session"],
        version=int(text["version"]),
        passes=passes,
        trigger=text.get("trigger", "idle"),
        enqueued=float(text.get("enqueued", 0.0)),
    )


def enqueue_idle_job(
    redis: Any,
    stream: str,
    session_id: str,
    version: int,
    passes: int | None = None,
    trigger: str = "idle",
) -> Any:
    """XADD a consolidation job for a session parked in Redis at `version`. Returns what the client's
    `xadd` returns: the entry id, or with `redis.asyncio` an awaitable of it (await it)."""
    return redis.xadd(
        stream, job_fields(session_id, version, passes, trigger), maxlen=STREAM_MAXLEN, approximate=True
    )
