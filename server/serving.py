"""One generation request from the API's side: session checkout, engine submission, session commit.

The commit runs as its own task once the engine reports the request finished, whatever happens to the
HTTP connection: a client that disconnects aborts the request and its session still keeps every token
the model fully processed. Responses send their last event only after the session is saved.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from model.hybrid import HybridLM
from model.session import new_state
from server.chat import ChatTurn
from server.engine import Engine
from server.errors import APIError
from server.idle import IdleConsolidator
from server.sequence import EngineClosed, EngineRequest, Output, QueueFull, RequestHandle, SamplingParams
from server.sessions import Checkout, SessionManager, reply_hash
from server.stores import StoreError, StoreUnavailable, VersionConflict

log = logging.getLogger("sleepserve.serving")

# What a request feeds, given its session checkout (None: stateless): the prompt tokens, and the chat
# turn they make (None for a completion or without a session).
PromptBuilder = Callable[[Checkout | None], tuple[list[int], ChatTurn | None]]


@dataclass
class TurnContext:
    """What a turn needs from the server."""

    model: HybridLM
    engine: Engine
    sessions: SessionManager
    request_timeout: float
    commits: set[asyncio.Task]
    idle: IdleConsolidator | None = None


class Turn:
    def __init__(
        self, ctx: TurnContext, checkout: Checkout | None, chat: ChatTurn | None, handle: RequestHandle
    ) -> None:
        self.ctx, self.checkout, self.chat, self.handle = ctx, checkout, chat, handle
        self.save_error: APIError | None = None
        self.commit = asyncio.create_task(self._commit())
        ctx.commits.add(self.commit)
        self.commit.add_done_callback(ctx.commits.discard)

    @classmethod
    async def start(
        cls,
        ctx: TurnContext,
        *,
        session_id: str | None,
        owner: str | None,
        build_prompt: PromptBuilder,
        params: SamplingParams,
        arrival: float | None = None,
    ) -> Turn:
        """Check the session out, build the prompt and submit it; `arrival` is when the request came in."""
        checkout = await ctx.sessions.checkout(session_id, owner) if session_id else None
        try:
            prompt, chat = build_prompt(checkout)
            state = checkout.state if checkout else new_state(ctx.model)
            request = EngineRequest(
                state,
                prompt,
                params,
                stateful=checkout is not None,
                arrival=arrival or time.monotonic(),
                timeout=ctx.request_timeout,
            )
            handle = ctx.engine.submit(request)
        except QueueFull as exc:
            await _release(ctx, checkout)
            raise APIError(
                429,
                f"server overloaded: {exc}; retry later",
                type="overloaded_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            ) from exc
        except EngineClosed as exc:
            await _release(ctx, checkout)
            raise APIError(503, str(exc), type="server_error", code="shutting_down") from exc
        except BaseException:
            await _release(ctx, checkout)
            raise
        return cls(ctx, checkout, chat, handle)

    async def _commit(self) -> None:
        """Wait for the engine's last output and save the session (not after an engine error)."""
        final = await self.handle.result
        checkout = self.checkout
        if checkout is None:
            return
        if final.finish_reason == "error":
            await _release(self.ctx, checkout)
            return
        if self.chat is not None and final.prompt_complete:
            hashes, reply = list(self.chat.hashes), None
            if final.stats.completion_tokens:
                hashes.append(reply_hash(final.reply))
                reply = final.reply  # a client whose stream dropped has only a prefix of it
            limit = self.ctx.sessions.history_limit
            checkout.history.add(hashes, limit, reply)
            self.chat.record(checkout.history, reply, final.reply_tokens, limit)
        try:
            await self.ctx.sessions.commit(checkout)
            if self.ctx.idle is not None:
                self.ctx.idle.touch(checkout.id, checkout.owner, checkout.version)
        except VersionConflict as exc:
            self.save_error = APIError(
                409, f"session {checkout.id} was changed by another writer: {exc}", code="session_conflict"
            )
        except StoreError as exc:
            log.warning("saving session %s failed: %s", checkout.id, exc)
            status = 503 if isinstance(exc, StoreUnavailable) else 500
            self.save_error = APIError(
                status, f"session {checkout.id} could not be saved: {exc}", code="store_unavailable"
            )

    async def outputs(self) -> AsyncIterator[Output]:
        """The request's outputs; the last one (with finish_reason) comes after the session is saved.
        Leaving early (client gone) aborts the request."""
        finished = False
        try:
            async for out in self.handle:
                if out.finish_reason is not None:
                    finished = True
                    await asyncio.shield(self.commit)
                yield out
        finally:
            if not finished:
                self.handle.abort()

    def abort(self) -> None:
        self.handle.abort()


async def _release(ctx: TurnContext, checkout: Checkout | None) -> None:
    if checkout is not None:
        try:
            await ctx.sessions.release(checkout)
        except StoreError as exc:  # the lease expires by itself
            log.warning("releasing the lease of session %s failed: %s", checkout.id, exc)
