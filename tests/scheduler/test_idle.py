"""The idle trigger: a session left alone has its unconsolidated tail slept on, locally or by a job on
the Redis Stream; refused for checkpoints not trained with variable chunk lengths."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

import httpx
import pytest
import redis

from scheduler.remote import parse_job
from server.app import create_app
from server.context import CheckpointError
from server.settings import Settings

PROMPT = "a prompt longer than one window of eight tokens"


async def start(stack: AsyncExitStack, checkpoint, **settings) -> httpx.AsyncClient:
    app = create_app(
        Settings(checkpoint=checkpoint, served_model_name="tiny", **{"store": "memory", **settings})
    )
    await stack.enter_async_context(app.router.lifespan_context(app))
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    return await stack.enter_async_context(client)


async def feed_session(client: httpx.AsyncClient) -> tuple[str, dict]:
    session = (await client.post("/v1/sessions")).json()["id"]
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 3, "temperature": 0, "session_id": session}
    assert (await client.post("/v1/completions", json=body)).status_code == 200
    return session, (await client.get(f"/v1/sessions/{session}")).json()


async def test_idle_session_is_consolidated_locally(tiny_checkpoint):
    async with AsyncExitStack() as stack:
        client = await start(
            stack, tiny_checkpoint(variable_chunks=True), idle_consolidation=0.3, max_passes=3
        )
        session, before = await feed_session(client)
        assert before["tail_tokens"] > 0
        await asyncio.sleep(1.0)
        after = (await client.get(f"/v1/sessions/{session}")).json()
        assert after["tail_tokens"] == 0 and after["window_fill"] == 0
        assert after["tokens_seen"] == before["tokens_seen"]
        assert after["consolidated_tokens"] == before["consolidated_tokens"] + before["tail_tokens"]
        assert after["last_passes"] == 3  # idle: as deep as allowed
        assert after["version"] == before["version"] + 1
        assert 'sleep_duration_seconds_count{trigger="idle"}' in (await client.get("/metrics")).text


async def test_a_new_request_restarts_the_idle_clock(tiny_checkpoint):
    async with AsyncExitStack() as stack:
        client = await start(stack, tiny_checkpoint(variable_chunks=True), idle_consolidation=0.6)
        session, _ = await feed_session(client)
        await asyncio.sleep(0.4)
        body = {"model": "tiny", "prompt": "more", "max_tokens": 1, "temperature": 0, "session_id": session}
        await client.post("/v1/completions", json=body)
        await asyncio.sleep(0.4)  # 0.8 s since the first request, 0.4 s since the last
        assert (await client.get(f"/v1/sessions/{session}")).json()["tail_tokens"] > 0
        await asyncio.sleep(0.6)
        assert (await client.get(f"/v1/sessions/{session}")).json()["tail_tokens"] == 0


async def test_idle_jobs_go_to_the_redis_stream_in_remote_mode(tiny_checkpoint, redis_server):
    url = redis_server.replace("/0", "/3")
    stream = "test:idle-jobs"
    async with AsyncExitStack() as stack:
        client = await start(
            stack,
            tiny_checkpoint(variable_chunks=True),
            store=url,
            idle_consolidation=0.2,
            idle_worker="remote",
            sleep_stream=stream,
        )
        session, info = await feed_session(client)
        await asyncio.sleep(0.8)
        entries = redis.Redis.from_url(url).xrange(stream)
        assert len(entries) == 1
        job = parse_job(entries[0][1])
        assert (job.session, job.version, job.trigger) == (session, info["version"], "idle")
        assert (await client.get(f"/v1/sessions/{session}")).json()["tail_tokens"] > 0  # the worker's job


def test_idle_trigger_needs_a_variable_chunk_checkpoint(tiny_checkpoint):
    with pytest.raises(CheckpointError, match="variable chunk"):
        create_app(Settings(checkpoint=tiny_checkpoint(), idle_consolidation=1.0))
