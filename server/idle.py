"""The idle trigger: consolidate a session's unconsolidated tail once nobody has used it for a while,
so that its next turn starts with an empty window (checkpoints trained with variable chunk lengths
only). Locally the sleep runs on a thread of this replica, as deep as `passes` allows; in remote mode
the job goes to the Redis Stream that `sleepserve worker` consumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from scheduler.remote import enqueue_idle_job
from server.errors import APIError
from server.sessions import SessionManager
from server.stores import StoreError

log = logging.getLogger("sleepserve.idle")


class IdleConsolidator:
    def __init__(
        self,
        sessions: SessionManager,
        idle_after: float,
        passes: int,
        redis: Any | None = None,
        stream: str | None = None,
    ) -> None:
        """`redis` (a redis.asyncio client) and `stream`: remote mode, jobs go to the stream."""
        self.sessions, self.idle_after, self.passes = sessions, idle_after, passes
        self.redis, self.stream = redis, stream
        self._timers: dict[str, asyncio.Task] = {}

    def touch(self, session_id: str, owner: str | None, version: int) -> None:
        """The session was just saved at `version`: (re)start its idle timer."""
        if session_id in self._timers:
            self._timers.pop(session_id).cancel()
        task = asyncio.create_task(self._after_idle(session_id, owner, version))
        self._timers[session_id] = task
        task.add_done_callback(lambda t: self._timers.get(session_id) is t and self._timers.pop(session_id))

    async def _after_idle(self, session_id: str, owner: str | None, version: int) -> None:
        await asyncio.sleep(self.idle_after)
        try:
            if self.redis is not None:
                await enqueue_idle_job(self.redis, self.stream, session_id, version, self.passes)
                return
            await self.sessions.consolidate(
                session_id, owner, trigger="idle", passes=self.passes, version=version
            )
        except (APIError, StoreError) as exc:  # busy, moved on, deleted, store down: next time
            log.info("idle consolidation of session %s skipped: %s", session_id, exc)

    async def close(self) -> None:
        for task in list(self._timers.values()):
            task.cancel()
        for task in list(self._timers.values()):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.redis is not None:
            await self.redis.aclose()
