"""The HTTP API in process against untrusted input: crafted session blobs refused with 4xx and nothing
stored, signed exports, damaged store records reported and deletable (memory and Redis), limits on
stop strings, prompts and bodies, lone surrogates anywhere, a truthful 405, and `Connection: close`
after a 500."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from contextlib import AsyncExitStack

import httpx
import pytest
import redis.asyncio as aioredis
import torch
from support import forge_blob

from server.app import create_app
from server.sessions import unpack_record
from server.settings import Settings

MODEL = "tiny"


@pytest.fixture
async def serve(tiny_checkpoint, caplog):
    """`await serve(**settings)` -> an httpx client of a started app (`.app`: the app). Unhandled errors
    come back as responses (500), and the test says whether it expected any."""
    caplog.set_level(logging.INFO)
    async with AsyncExitStack() as stack:

        async def start(**settings) -> httpx.AsyncClient:
            settings = {"store": "memory", "served_model_name": MODEL, **settings}
            app = create_app(Settings(checkpoint=tiny_checkpoint(), **settings))
            await stack.enter_async_context(app.router.lifespan_context(app))
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            client = httpx.AsyncClient(transport=transport, base_url="http://test")
            client.app = app
            return await stack.enter_async_context(client)

        yield start


def completion(prompt="Hello", **extra) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, **extra}


def chat(messages, **extra) -> dict:
    return {"model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0, **extra}


def error_of(response: httpx.Response, status: int, fragment: str = "") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment in error["message"], error["message"]
    return error


async def sessions_stored(client: httpx.AsyncClient) -> int:
    return await client.app.state.server.store.count()


async def exported_blob(client: httpx.AsyncClient) -> bytes:
    session = (await client.post("/v1/sessions")).json()["id"]
    body = completion("a prompt that crosses a boundary", session_id=session)
    assert (await client.post("/v1/completions", json=body)).status_code == 200
    return (await client.get(f"/v1/sessions/{session}/export")).content


def set_tail(position: int, token: int):
    return lambda t: t["tail"].__setitem__(position, token)


def set_counter(index: int, value: int):
    return lambda t: t["counters"].__setitem__(index, value)


CRAFTED = {
    "tail token >= vocab": set_tail(0, 5000),
    "negative tail token": set_tail(0, -2),
    "wrong memory shape": lambda t: t.__setitem__("memory.0", torch.zeros(2, 8, 16)),
    "nan memory": lambda t: t["memory.0"].view(-1).__setitem__(0, float("nan")),
    "inf memory": lambda t: t["memory.0"].view(-1).__setitem__(0, float("-inf")),
    "missing memory tensor": lambda t: t.pop("memory.0"),
    "extra memory tensor": lambda t: t.__setitem__("memory.1", torch.zeros(2, 16, 16)),
    "negative tail_len": set_counter(6, -1),
    "inconsistent tokens_seen": set_counter(0, 12345),
}


async def test_every_crafted_blob_is_refused_and_nothing_is_stored(serve):
    client = await serve()
    good = await exported_blob(client)
    stored = await sessions_stored(client)
    damaged = bytearray(good)
    damaged[-5] ^= 1
    blobs = {name: forge_blob(good, change) for name, change in CRAFTED.items()}
    blobs |= {"bad checksum": bytes(damaged), "truncated": good[:-64], "bad header": b"\x10" + good[1:]}
    blobs["not a blob"] = b"hello"
    for name, blob in blobs.items():
        response = await client.post("/v1/sessions/import", content=blob)
        assert 400 <= response.status_code < 500, (name, response.text)
        assert response.json()["error"]["code"] == "invalid_session", name
    assert await sessions_stored(client) == stored  # nothing was stored before the checks
    imported = await client.post("/v1/sessions/import", content=good)
    assert imported.status_code == 200 and await sessions_stored(client) == stored + 1


async def test_signed_export_and_import(serve):
    signed_server = await serve(session_signing_key="a secret")
    signed = await exported_blob(signed_server)
    assert (await signed_server.post("/v1/sessions/import", content=signed)).status_code == 200
    stored = await sessions_stored(signed_server)
    unsigned = forge_blob(signed, lambda t: None)  # the same contents, its signature dropped
    tampered = forge_blob(signed, set_tail(0, 1))
    for blob in (unsigned, tampered):
        error = error_of(await signed_server.post("/v1/sessions/import", content=blob), 422, "signature")
        assert error["code"] == "invalid_session_signature"
    assert await sessions_stored(signed_server) == stored


async def damaged_memory_record(client: httpx.AsyncClient, session: str) -> None:
    """Replace the session's record in the memory store: a record whose state holds NaN."""
    store = client.app.state.server.store
    stored = await store.get(session)
    blob, history = unpack_record(stored.blob)
    poisoned = forge_blob(blob, lambda t: t["memory.0"].view(-1).__setitem__(0, float("nan")))
    from server.sessions import pack_record

    await store.put(session, pack_record(poisoned, history), stored.version)


async def assert_damaged_then_deleted(client: httpx.AsyncClient, session: str) -> None:
    error = error_of(await client.get(f"/v1/sessions/{session}"), 409, "damaged")
    assert error["code"] == "session_damaged"
    for response in (
        await client.post("/v1/completions", json=completion(session_id=session)),
        await client.get(f"/v1/sessions/{session}/export"),
        await client.post(f"/v1/sessions/{session}/fork"),
    ):
        assert error_of(response, 409)["code"] == "session_damaged"
    assert (await client.delete(f"/v1/sessions/{session}")).status_code == 200
    error_of(await client.get(f"/v1/sessions/{session}"), 404, "not found")


async def test_a_damaged_memory_record_is_reported_and_deletable(serve):
    client = await serve()
    session = (await client.post("/v1/sessions")).json()["id"]
    await damaged_memory_record(client, session)
    await assert_damaged_then_deleted(client, session)
    garbage = (await client.post("/v1/sessions")).json()["id"]
    store = client.app.state.server.store
    await store.put(garbage, b"SSR1\xff\xff\xff\x7fnot json", 1)  # a sidecar length past the end
    await assert_damaged_then_deleted(client, garbage)


async def test_a_damaged_redis_record_is_reported_and_deletable(serve, redis_server):
    client = await serve(store=redis_server)
    raw = aioredis.from_url(redis_server)
    try:
        no_version, bad_blob = uuid.uuid4().hex, uuid.uuid4().hex
        await raw.hset(f"sleepserve:session:{no_version}", mapping={"blob": b"x", "owner": b"\xff"})
        await raw.hset(f"sleepserve:session:{bad_blob}", mapping={"blob": b"SSR1", "version": b"1"})
        for session in (no_version, bad_blob):
            await assert_damaged_then_deleted(client, session)
            assert not await raw.exists(f"sleepserve:session:{session}")
    finally:
        await raw.aclose()


async def test_stop_strings_are_bounded(serve):
    client = await serve()
    five = [f"s{i}" for i in range(5)]
    error_of(await client.post("/v1/completions", json=completion(stop=five)), 400, "at most 4")
    error_of(await client.post("/v1/completions", json=completion(stop="x" * 257)), 400, "256 characters")
    error_of(await client.post("/v1/completions", json=completion(stop=["ok", ""])), 400, "non-empty")
    assert (await client.post("/v1/completions", json=completion(stop=["x" * 256] * 4))).status_code == 200


async def test_prompt_sizes_are_bounded(serve):
    client = await serve(max_prompt_tokens=16)
    assert (await client.post("/v1/completions", json=completion("x" * 16))).status_code == 200
    error_of(await client.post("/v1/completions", json=completion("x" * 17)), 400, "limit of 16")
    error_of(await client.post("/v1/completions", json=completion(list(range(17)))), 400, "limit of 16")
    messages = [{"role": "user", "content": "y" * 20}]
    error_of(await client.post("/v1/chat/completions", json=chat(messages)), 400, "limit of 16")
    session = (await client.post("/v1/sessions")).json()["id"]
    body = chat(messages, session_id=session)
    error_of(await client.post("/v1/chat/completions", json=body), 400, "limit of 16")
    assert (await client.get(f"/v1/sessions/{session}")).json()["tokens_seen"] == 0  # nothing was fed


async def test_bodies_are_cut_at_their_limit(serve):
    client = await serve(max_request_bytes=2048, max_import_bytes=4096)
    big = json.dumps(completion("z" * 4000)).encode()
    error_of(await client.post("/v1/completions", content=big), 413, "larger than 2048")

    async def chunks(data: bytes, size: int = 500):
        for i in range(0, len(data), size):
            yield data[i : i + size]

    chunked = await client.post(
        "/v1/completions", content=chunks(big), headers={"content-type": "application/json"}
    )
    error_of(chunked, 413, "larger than 2048")
    small = json.dumps(completion("z" * 100)).encode()
    ok = await client.post(
        "/v1/completions", content=chunks(small, 50), headers={"content-type": "application/json"}
    )
    assert ok.status_code == 200, ok.text
    error_of(await client.post("/v1/sessions/import", content=b"\0" * 5000), 413, "larger than 4096")
    error_of(await client.post("/v1/sessions/import", content=chunks(b"\0" * 5000)), 413, "larger than 4096")


async def test_lone_surrogates_anywhere_are_refused(serve):
    client = await serve()
    headers = {"content-type": "application/json"}
    for raw in (
        b'{"model": "\\ud800", "prompt": "x"}',
        b'{"model": "tiny", "prompt": "x", "user": "\\udfff"}',
        b'{"model": "tiny", "prompt": "x", "metadata": {"\\ud800": 1}}',
        b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
    ):
        route = "/v1/chat/completions" if b"messages" in raw else "/v1/completions"
        error_of(await client.post(route, content=raw, headers=headers), 400, "surrogates")


async def test_405_names_every_method_of_the_path(serve):
    client = await serve()
    session = (await client.post("/v1/sessions")).json()["id"]
    response = await client.post(f"/v1/sessions/{session}")
    assert response.status_code == 405
    assert set(response.headers["allow"].split(", ")) == {"GET", "DELETE"}


async def test_a_500_closes_the_connection(serve, monkeypatch):
    client = await serve()

    async def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(client.app.state.server.sessions, "create", broken)
    response = await client.post("/v1/sessions")
    assert response.status_code == 500 and response.headers["connection"] == "close"
    assert response.json()["error"]["type"] == "server_error"


async def test_concurrent_streams_finish_beside_a_subnormal_temperature(serve):
    client = await serve()

    async def stream(body: dict) -> list[dict]:
        response = await client.post("/v1/completions", json={**body, "stream": True})
        assert response.status_code == 200
        lines = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        return [json.loads(line) for line in lines[:-1]]

    bodies = [completion(f"stream {i}", max_tokens=24) for i in range(4)]
    bodies.append(completion("tiny temperature", max_tokens=24, temperature=1e-40))
    results = await asyncio.gather(*(stream(body) for body in bodies))
    for events in results:
        assert all("error" not in event for event in events)
        assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")


async def test_the_chat_history_sidecar_is_bounded(serve):
    """With room for 3 message hashes, a conversation of many turns that re-sends its whole history each
    time is still recognised (its first and latest messages are checked), and the record stays small."""
    client = await serve(session_history_messages=3)
    session = (await client.post("/v1/sessions")).json()["id"]
    history = [{"role": "system", "content": "be brief"}]
    sizes = []
    for turn in range(6):
        history.append({"role": "user", "content": f"turn {turn}"})
        response = await client.post(
            "/v1/chat/completions", json=chat(history, session_id=session, max_tokens=3)
        )
        assert response.status_code == 200, response.text
        history.append(response.json()["choices"][0]["message"])
        stored = await client.app.state.server.store.get(session)
        sizes.append(len(stored.blob))
        assert len(unpack_record(stored.blob)[1].recent) <= 3
    assert max(sizes) - min(sizes) < 64  # the record does not grow with the conversation
    info = (await client.get(f"/v1/sessions/{session}")).json()
    assert info["chat_messages"] == len(history)
    contradicting = [
        *history[:-2],
        {"role": "user", "content": "something else"},
        {"role": "user", "content": "x"},
    ]
    error = error_of(
        await client.post("/v1/chat/completions", json=chat(contradicting, session_id=session)), 409
    )
    assert error["code"] == "session_history_mismatch"
