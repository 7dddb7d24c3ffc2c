"""The HTTP API in process (httpx.ASGITransport, lifespan run explicitly): routes, OpenAI formats, every
bad input with its status and message, API keys, and the session API."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from support import free_port

from model.tokenizer import ByteTokenizer
from server.sessions import unpack_record

MODEL = "tiny"


def completion(prompt="Hello", **extra) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, **extra}


def chat(messages, **extra) -> dict:
    return {"model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0, **extra}


def sse_events(text: str) -> list:
    lines = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def assert_error(response: httpx.Response, status: int, fragment: str, param: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert fragment in error["message"], error["message"]
    if param is not None:
        assert error["param"] == param


async def test_operational_routes(serve):
    client = await serve()
    assert (await client.get("/health")).json() == {"status": "ok"}
    assert (await client.get("/ready")).status_code == 200
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list" and models["data"][0]["id"] == MODEL
    assert models["data"][0]["schedule"] == "lagged" and models["data"][0]["window"] == 8
    assert models["data"][0]["family"] == "sleepy" and models["data"][0]["sleep_passes"] == 2
    await client.post("/v1/completions", json=completion())
    metrics = (await client.get("/metrics")).text
    for name in ("sleepserve_generation_tokens_total", "sleepserve_decode_batch_size_bucket"):
        assert name in metrics
    spec = (await client.get("/openapi.json")).json()
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/sessions/{session_id}/export", "/ready"):
        assert path in spec["paths"]


async def test_completion_and_chat_formats(serve):
    client = await serve()
    body = (await client.post("/v1/completions", json=completion(max_tokens=20))).json()
    assert body["object"] == "text_completion" and body["choices"][0]["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] == 5 and usage["total_tokens"] == 5 + usage["completion_tokens"]
    assert usage["session_tokens_total"] >= 5 and "consolidated_tokens" in usage and "sleep_seconds" in usage

    stream = await client.post(
        "/v1/completions", json=completion(max_tokens=20, stream=True, stream_options={"include_usage": True})
    )
    assert stream.headers["content-type"].startswith("text/event-stream")
    events = sse_events(stream.text)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == body["choices"][0]["text"]
    assert (
        events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == usage["completion_tokens"]
    )
    assert events[-2]["choices"][0]["finish_reason"] == body["choices"][0]["finish_reason"]
    assert all(e["usage"] is None for e in events[:-1])  # as OpenAI: null until the last chunk

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    reply = (await client.post("/v1/chat/completions", json=chat(messages))).json()
    assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["role"] == "assistant"
    prompt = ByteTokenizer().encode_chat([("system", "be brief"), ("user", "hi")])
    assert reply["usage"]["prompt_tokens"] == len(prompt)
    events = sse_events((await client.post("/v1/chat/completions", json=chat(messages, stream=True))).text)
    assert (
        events[0]["object"] == "chat.completion.chunk"
        and events[0]["choices"][0]["delta"]["role"] == "assistant"
    )
    assert "usage" not in events[0]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    assert text == reply["choices"][0]["message"]["content"]
    assert events[-1]["choices"][0]["finish_reason"] == reply["choices"][0]["finish_reason"]


BAD_INPUTS = [
    # (route, body (dict, or raw bytes), status, message fragment, param)
    ("/v1/completions", b'{"model": "tiny", "prompt": ', 400, "not valid JSON", None),
    ("/v1/completions", b'{"model": "tiny", "prompt": "\xff\xfe"}', 400, "not UTF-8", None),
    ("/v1/completions", {"prompt": "x"}, 422, "model", "model"),
    ("/v1/completions", completion(max_tokens="many"), 422, "max_tokens", "max_tokens"),
    ("/v1/completions", completion(model="gpt-4"), 404, "`gpt-4` does not exist", "model"),
    ("/v1/completions", completion(max_tokens=-1), 400, "max_tokens", "max_tokens"),
    ("/v1/completions", completion(max_tokens=10**9), 400, "max_tokens must be at most", "max_tokens"),
    ("/v1/completions", completion(prompt=""), 400, "prompt must not be empty", "prompt"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "\\ud800"}', 400, "lone surrogates", "prompt"),
    ("/v1/completions", completion(stop="\ud800"), 400, "lone surrogates", "stop"),
    ("/v1/completions", completion(prompt=["a", "b"]), 400, "one prompt", "prompt"),
    ("/v1/completions", completion(prompt=[1, 99999]), 400, "token ids", "prompt"),
    ("/v1/completions", completion(prompt=[[1, 2], [3]]), 400, "one prompt", "prompt"),
    ("/v1/completions", completion(n=2), 400, "less than or equal to 1", "n"),
    ("/v1/completions", completion(temperature=3), 400, "temperature", "temperature"),
    ("/v1/completions", completion(top_p=0), 400, "top_p", "top_p"),
    ("/v1/completions", completion(stop=["", "x"]), 400, "stop", "stop"),
    ("/v1/completions", completion(stream_options={"include_usage": True}), 400, "stream", "stream_options"),
    ("/v1/completions", completion(session_id="abc"), 400, "32 hexadecimal", "session_id"),
    ("/v1/completions", completion(session_id="0" * 32), 404, "session 000", "session_id"),
    ("/v1/chat/completions", chat([]), 400, "at least 1 item", "messages"),
    ("/v1/chat/completions", chat("hi"), 422, "messages", "messages"),
    (
        "/v1/chat/completions",
        chat([{"role": "user", "content": "\ud800"}]),
        400,
        "surrogates",
        "messages.0.content",
    ),
    ("/v1/chat/completions", chat([{"role": "tool", "content": "x"}]), 400, "role", "messages.0.role"),
    (
        "/v1/chat/completions",
        chat([{"role": "user", "content": "x"}], max_completion_tokens=0),
        400,
        "max_completion_tokens",
        None,
    ),
    ("/v1/sessions", {"session_id": "not-hex"}, 400, "32 hexadecimal", "session_id"),
    ("/v1/nothing", {}, 404, "Not Found", None),
]


@pytest.mark.parametrize(("route", "body", "status", "fragment", "param"), BAD_INPUTS)
async def test_bad_inputs(serve, route, body, status, fragment, param):
    client = await serve()
    content = body if isinstance(body, bytes) else json.dumps(body).encode()  # ASCII: escapes surrogates
    response = await client.post(route, content=content, headers={"content-type": "application/json"})
    assert_error(response, status, fragment, param)


async def test_session_routes_reject_bad_ids(serve):
    client = await serve()
    assert_error(await client.get("/v1/sessions/xyz"), 400, "32 hexadecimal")
    assert_error(await client.get(f"/v1/sessions/{'a' * 32}"), 404, "not found")
    assert_error(await client.delete(f"/v1/sessions/{'a' * 32}"), 404, "not found")
    headers = {"X-Session-ID": "b" * 32}
    assert_error(await client.post("/v1/completions", json=completion(), headers=headers), 404, "not found")
    body_wins = completion(session_id="c" * 32)  # the body's id overrides the header's
    assert_error(await client.post("/v1/completions", json=body_wins, headers=headers), 404, "session ccc")


async def test_api_keys(serve, caplog):
    client = await serve(api_keys="key-a,key-b")
    assert_error(await client.get("/v1/models"), 401, "API key")
    assert_error(await client.post("/v1/completions", json=completion()), 401, "API key")
    wrong = {"Authorization": "Bearer nope"}
    assert (await client.get("/v1/models", headers=wrong)).status_code == 401
    for path in ("/health", "/ready", "/metrics"):
        assert (await client.get(path)).status_code == 200
    a, b = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
    session = (await client.post("/v1/sessions", headers=a)).json()["id"]
    assert (await client.get(f"/v1/sessions/{session}", headers=a)).status_code == 200
    assert_error(await client.get(f"/v1/sessions/{session}", headers=b), 404, "not found")
    assert_error(
        await client.post("/v1/completions", json=completion(session_id=session), headers=b), 404, "not found"
    )
    assert (
        await client.post("/v1/completions", json=completion(session_id=session), headers=a)
    ).status_code == 200
    fork = (await client.post(f"/v1/sessions/{session}/fork", headers=a)).json()["id"]
    assert_error(await client.get(f"/v1/sessions/{fork}/export", headers=b), 404, "not found")
    assert "key-a" not in caplog.text and "key-b" not in caplog.text


async def test_session_lifecycle(serve, tiny_checkpoint):
    client = await serve()
    created = (await client.post("/v1/sessions")).json()
    session = created["id"]
    assert len(session) == 32 and int(session, 16) >= 0
    assert created["tokens_seen"] == 0 and created["version"] == 1 and created["window_capacity"] == 16
    chosen = "0123456789abcdef" * 2
    assert (await client.post("/v1/sessions", json={"session_id": chosen})).json()["id"] == chosen
    assert_error(await client.post("/v1/sessions", json={"session_id": chosen}), 409, "already exists")

    first = (
        await client.post("/v1/completions", json=completion("one two three", session_id=session))
    ).json()
    assert first["session_id"] == session
    after = first["usage"]["session_tokens_total"]
    second = await client.post("/v1/completions", json=completion(" four"), headers={"X-Session-ID": session})
    assert second.headers["X-Session-ID"] == session
    assert (
        second.json()["usage"]["session_tokens_total"]
        == after + 5 + second.json()["usage"]["completion_tokens"]
    )

    info = (await client.get(f"/v1/sessions/{session}")).json()
    assert info["tokens_seen"] == second.json()["usage"]["session_tokens_total"] and info["version"] == 3
    assert info["chunks_consolidated"] >= 1 and 0 < info["window_fill"] <= 1
    layer = info["fast_weights"][0]
    assert len(layer["heads"]) == 2 and len(layer["heads"][0]["top_singular_values"]) == 5
    assert layer["frobenius_norm"] > 0 and 1 <= layer["effective_rank_mean"] <= 16

    fork = (await client.post(f"/v1/sessions/{session}/fork")).json()
    assert fork["id"] != session and fork["tokens_seen"] == info["tokens_seen"]
    await client.post("/v1/completions", json=completion("more", session_id=fork["id"]))
    assert (await client.get(f"/v1/sessions/{session}")).json()["tokens_seen"] == info["tokens_seen"]

    export = await client.get(f"/v1/sessions/{session}/export")
    assert export.headers["content-type"] == "application/octet-stream"
    assert export.content[:8] and len(export.content) == info["state_bytes"]
    imported = await client.post("/v1/sessions/import", content=export.content)
    assert imported.status_code == 200 and imported.json()["tokens_seen"] == info["tokens_seen"]
    assert imported.json()["id"] not in (session, fork["id"])

    other = await serve(checkpoint=tiny_checkpoint(seed=1))
    foreign = (await other.post("/v1/sessions")).json()["id"]
    foreign_blob = (await other.get(f"/v1/sessions/{foreign}/export")).content
    assert_error(
        await client.post("/v1/sessions/import", content=foreign_blob), 409, "this server runs model"
    )
    assert_error(
        await client.post("/v1/sessions/import", content=b"garbage"), 422, "not a sleepserve session"
    )

    assert (await client.delete(f"/v1/sessions/{session}")).json() == {
        "id": session,
        "object": "session.deleted",
        "deleted": True,
    }
    assert_error(await client.get(f"/v1/sessions/{session}"), 404, "not found")


async def test_state_size_does_not_grow(serve):
    client = await serve()
    sizes = {}
    for windows in (2, 20):
        session = (await client.post("/v1/sessions")).json()["id"]
        for _ in range(windows):  # 8 prompt tokens per request: one window each
            body = completion("abcdefgh", max_tokens=1, stop=None, session_id=session)
            assert (await client.post("/v1/completions", json=body)).status_code == 200
        info = (await client.get(f"/v1/sessions/{session}")).json()
        assert info["tokens_seen"] >= 8 * windows
        stored = await client.app.state.server.store.get(session)
        sizes[windows] = (len(stored.blob), len(unpack_record(stored.blob)[0]), info["state_bytes"])
    assert sizes[2] == sizes[20]


async def test_chat_history_is_recognised(serve):
    client = await serve()
    session = (await client.post("/v1/sessions")).json()["id"]
    tok = ByteTokenizer()
    history = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hello"}]
    first = (await client.post("/v1/chat/completions", json=chat(history, session_id=session))).json()
    assert first["usage"]["prompt_tokens"] == len(tok.encode_chat([("system", "sys"), ("user", "hello")]))
    history += [first["choices"][0]["message"], {"role": "user", "content": "again"}]
    second = (await client.post("/v1/chat/completions", json=chat(history, session_id=session))).json()
    assert second["usage"]["prompt_tokens"] == len(tok.encode_chat([("user", "again")]))  # only the new one
    only_new = [{"role": "user", "content": "third"}]
    third = (await client.post("/v1/chat/completions", json=chat(only_new, session_id=session))).json()
    assert third["usage"]["prompt_tokens"] == len(tok.encode_chat([("user", "third")]))
    assert (await client.get(f"/v1/sessions/{session}")).json()["chat_messages"] == 7

    contradicting = [history[0], {"role": "user", "content": "goodbye"}, {"role": "user", "content": "x"}]
    response = await client.post("/v1/chat/completions", json=chat(contradicting, session_id=session))
    assert_error(response, 409, "messages[1] (user) differs", "messages")
    replay = [*history, second["choices"][0]["message"], *only_new, third["choices"][0]["message"]]
    assert_error(
        await client.post("/v1/chat/completions", json=chat(replay, session_id=session)), 409, "no new one"
    )


async def test_consolidate(serve, tiny_checkpoint):
    client = await serve()
    session = (await client.post("/v1/sessions")).json()["id"]
    assert_error(await client.post(f"/v1/sessions/{session}/consolidate"), 409, "variable chunk")
    client = await serve(checkpoint=tiny_checkpoint(variable_chunks=True))
    session = (await client.post("/v1/sessions")).json()["id"]
    await client.post("/v1/completions", json=completion("abcdefghijk", max_tokens=2, session_id=session))
    before = (await client.get(f"/v1/sessions/{session}")).json()
    after = (await client.post(f"/v1/sessions/{session}/consolidate")).json()
    assert before["tail_tokens"] > 0 and after["tail_tokens"] == 0
    assert after["consolidated_tokens"] == before["consolidated_tokens"] + before["tail_tokens"]
    assert 'sleep_duration_seconds_count{trigger="explicit"}' in (await client.get("/metrics")).text


async def test_store_down_keeps_stateless_requests_working(serve):
    client = await serve(store=f"redis://127.0.0.1:{free_port()}/0")
    assert (await client.post("/v1/completions", json=completion())).status_code == 200
    assert_error(await client.post("/v1/sessions"), 503, "session store is unavailable")
    assert_error(
        await client.post("/v1/completions", json=completion(session_id="d" * 32)), 503, "unavailable"
    )
    assert (await client.get("/ready")).status_code == 503


async def test_overload_answers_429(serve):
    client = await serve(max_waiting=0)
    response = await client.post("/v1/completions", json=completion())
    assert_error(response, 429, "overloaded")
    assert response.headers["Retry-After"] == "1"


async def test_request_timeout(serve):
    client = await serve(request_timeout=0.3)
    session = (await client.post("/v1/sessions")).json()["id"]
    long = completion(max_tokens=4000, ignore_eos=True, session_id=session)
    assert_error(await client.post("/v1/completions", json=long), 408, "timed out")
    kept = (await client.get(f"/v1/sessions/{session}")).json()["tokens_seen"]
    assert kept > 5  # the tokens processed before the timeout stay in the session
    events = sse_events((await client.post("/v1/completions", json={**long, "stream": True})).text)
    assert events[-1]["error"]["code"] == "timeout"
    assert (await client.get(f"/v1/sessions/{session}")).json()["tokens_seen"] > kept


async def test_one_request_at_a_time_per_session(serve):
    client = await serve()
    session = (await client.post("/v1/sessions")).json()["id"]
    body = completion("abc", max_tokens=20, ignore_eos=True, session_id=session)
    replies = await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(3)))
    totals = sorted(r.json()["usage"]["session_tokens_total"] for r in replies)
    assert totals == [23, 46, 69]  # serialised by the lease: no update lost or interleaved
    assert (await client.get(f"/v1/sessions/{session}")).json()["version"] == 4

    busy = await serve(session_lease_wait=0, session_lease_ttl=0.3)
    session = (await busy.post("/v1/sessions")).json()["id"]
    first = asyncio.create_task(
        busy.post("/v1/completions", json=completion(max_tokens=1000, ignore_eos=True, session_id=session))
    )
    while not busy.app.state.server.engine.running:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.5)  # past the lease's TTL: it is renewed while the request runs
    assert busy.app.state.server.engine.running
    response = await busy.post("/v1/completions", json=completion(session_id=session))
    assert_error(response, 409, "busy with another request", "session_id")
    assert (await first).status_code == 200
    assert (await busy.post("/v1/completions", json=completion(session_id=session))).status_code == 200


async def test_schedule_override(serve, tiny_checkpoint):
    lagged = await serve()
    hard = await serve(schedule="hard")
    assert (await hard.get("/v1/models")).json()["data"][0]["schedule"] == "hard"
    session = (await hard.post("/v1/sessions")).json()
    assert session["schedule"] == "hard" and session["window_capacity"] == 8
    blob = (
        await lagged.get(f"/v1/sessions/{(await lagged.post('/v1/sessions')).json()['id']}/export")
    ).content
    assert_error(await hard.post("/v1/sessions/import", content=blob), 409, "this server runs model")
