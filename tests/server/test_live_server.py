"""A real server process (`python -m server`) driven by the official `openai` client, with the memory
store and with Redis; sessions that outlive a restart and a `kill -9`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from support import ServerProcess

MODEL = "tiny"


@pytest.fixture
def launch(tmp_path: Path) -> Iterator:
    servers: list[ServerProcess] = []

    def start(checkpoint: Path, store: str) -> ServerProcess:
        server = ServerProcess(checkpoint, store, tmp_path / f"server-{len(servers)}.log")
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(kill=True)


def streamed_text(stream, chat: bool) -> tuple[str, list]:
    chunks = list(stream)
    pieces = [(c.choices[0].delta.content if chat else c.choices[0].text) or "" for c in chunks if c.choices]
    return "".join(pieces), chunks


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_openai_client(launch, tiny_checkpoint, redis_server, store):
    server = launch(tiny_checkpoint(), redis_server if store == "redis" else "memory")
    client = server.client
    log = server.log.read_text()
    assert "fingerprint" in log and "schedule lagged" in log and f"store {store}" in log
    assert [m.id for m in client.models.list()] == [MODEL]

    plain = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=24, temperature=0)
    text = plain.choices[0].text
    stream = client.completions.create(
        model=MODEL,
        prompt="Once upon",
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    streamed, chunks = streamed_text(stream, chat=False)
    assert streamed == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert (
        chunks[-1].usage.model_extra["session_tokens_total"]
        == plain.usage.model_extra["session_tokens_total"]
    )

    if len(text) > 6:
        stop = text[3:5]
        cut = client.completions.create(
            model=MODEL, prompt="Once upon", max_tokens=24, temperature=0, stop=[stop]
        )
        assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"

    sampled = [
        client.completions.create(model=MODEL, prompt="Once upon", max_tokens=24, temperature=0.8, seed=7)
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]

    # lm-evaluation-harness's loglikelihood request: the prompt scored, the first token without context
    scored = client.completions.create(
        model=MODEL, prompt="Once upon", max_tokens=0, temperature=0, echo=True, logprobs=1
    ).choices[0]
    assert scored.text == "Once upon" and scored.logprobs.tokens == list("Once upon")
    assert scored.logprobs.token_logprobs[0] is None and scored.logprobs.top_logprobs[0] is None
    assert all(lp <= 0 for lp in scored.logprobs.token_logprobs[1:])
    assert scored.logprobs.text_offset == list(range(len("Once upon")))

    messages = [{"role": "user", "content": "hello there"}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    scored_chat = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=16, temperature=0, logprobs=True, top_logprobs=2
    )
    assert scored_chat.choices[0].message.content == reply.choices[0].message.content
    entries = scored_chat.choices[0].logprobs.content
    assert len(entries) == scored_chat.usage.completion_tokens
    assert all(e.top_logprobs[0].token == e.token and len(e.top_logprobs) == 2 for e in entries)
    chat_stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=16, temperature=0, stream=True
    )
    assert streamed_text(chat_stream, chat=True)[0] == reply.choices[0].message.content

    session = server.new_session()
    first = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=16, temperature=0, extra_body={"session_id": session}
    )
    assert first.choices[0].message.content == reply.choices[0].message.content  # a new session = stateless
    history = [*messages, {"role": "assistant", "content": first.choices[0].message.content}]
    history.append({"role": "user", "content": "and again"})
    second = client.chat.completions.create(
        model=MODEL, messages=history, max_tokens=16, temperature=0, extra_headers={"X-Session-ID": session}
    )
    assert second.usage.model_extra["session_tokens_total"] == server.session(session)["tokens_seen"]
    assert second.usage.prompt_tokens == len("and again") + 3  # <|user|> … <|end|> <|assistant|>

    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=-5)


def open_stream(server: ServerProcess, session: str) -> httpx.Response:
    """A long streaming completion on the session, with usage at the end."""
    body = {
        "model": MODEL,
        "prompt": "tell me everything",
        "max_tokens": 4000,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "session_id": session,
    }
    request = httpx.Request("POST", server.url + "/v1/completions", json=body)
    return httpx.Client(timeout=30).send(request, stream=True)


def test_session_survives_disconnect_shutdown_restart_and_kill(launch, tiny_checkpoint, redis_server):
    checkpoint = tiny_checkpoint()
    server = launch(checkpoint, redis_server)
    session = server.new_session()

    def turn(server: ServerProcess, prompt: str) -> dict:
        reply = server.client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=12, temperature=0, extra_body={"session_id": session}
        )
        return reply.usage.model_extra

    total = turn(server, "first turn of a long talk")["session_tokens_total"]

    # A client that goes away mid-stream: the session keeps what was processed and is free again.
    stream = open_stream(server, session)
    lines = stream.iter_lines()
    for _ in range(20):
        next(lines)
    stream.close()
    time.sleep(0.5)
    kept = server.session(session)["tokens_seen"]
    assert kept > total + len("tell me everything")
    total = turn(server, "after the disconnect")["session_tokens_total"]
    assert total > kept

    # The same without streaming: the client gives up waiting, the server aborts and saves.
    version = server.session(session)["version"]
    body = {"model": MODEL, "prompt": "go", "max_tokens": 4000, "ignore_eos": True, "session_id": session}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.5)
    deadline = time.monotonic() + 5
    while server.session(session)["version"] == version and time.monotonic() < deadline:
        time.sleep(0.1)
    assert total < server.session(session)["tokens_seen"] < total + 2 + 4000
    total = turn(server, "after the timeout")["session_tokens_total"]

    # SIGTERM while a stream runs: the stream ends at a token boundary, the session is saved.
    stream = open_stream(server, session)
    lines = stream.iter_lines()
    for _ in range(20):
        next(lines)
    server.process.send_signal(signal.SIGTERM)
    events = [line for line in lines if line.startswith("data: ")]
    stream.close()
    assert events[-1] == "data: [DONE]"
    usage = json.loads(events[-2][len("data: ") :])["usage"]
    assert json.loads(events[-3][len("data: ") :])["choices"][0]["finish_reason"] == "abort"
    server.process.wait(timeout=30)

    server = launch(checkpoint, redis_server)
    before = server.session(session)
    assert before["tokens_seen"] == usage["session_tokens_total"] > total
    assert before["chunks_consolidated"] >= 4
    server.stop(kill=True)  # kill -9 between requests
    server = launch(checkpoint, redis_server)
    after = server.session(session)
    assert {k: after[k] for k in ("tokens_seen", "chunks_consolidated", "version")} == {
        k: before[k] for k in ("tokens_seen", "chunks_consolidated", "version")
    }
    assert turn(server, "third turn")["session_tokens_total"] > before["tokens_seen"]


def test_the_server_threads_share_one_core(launch, tiny_checkpoint):
    """On CPU with one torch thread and interleaved sleep (`--cpu-affinity auto`), every thread of the
    server process (the event loop's, the decode loop's, any other) runs on the last core it may use."""
    server = launch(tiny_checkpoint(), "memory")
    server.client.completions.create(model=MODEL, prompt="Once upon", max_tokens=8)  # the engine ran
    allowed = os.sched_getaffinity(0)
    expected = {max(allowed)} if len(allowed) > 1 else allowed
    affinities = []
    for task in Path(f"/proc/{server.process.pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            affinities.append(os.sched_getaffinity(int(task.name)))
    assert len(affinities) >= 2 and all(cpus == expected for cpus in affinities)
    if len(allowed) > 1:
        assert f"the server's threads run on CPUs [{max(allowed)}]" in server.log.read_text()
