"""Replicas behind no affinity: two server processes sharing one real redis-server serve a session
alternately with the same results as one process, and a replica stopped with SIGTERM mid-stream saves
its session before it exits."""

from __future__ import annotations

import signal

import httpx
from support import ServerProcess

TURNS = ["The first turn, long enough to cross a window. ", "Second turn. ", "Third and last turn."]


def complete(server: ServerProcess, session: str, prompt: str) -> str:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0, "session_id": session}
    response = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_replicas_serve_a_session_alternately(tiny_checkpoint, redis_server, tmp_path):
    checkpoint = tiny_checkpoint()
    alone = ServerProcess(checkpoint, "memory", tmp_path / "alone.log")
    replicas = [ServerProcess(checkpoint, redis_server, tmp_path / f"replica-{i}.log") for i in range(2)]
    try:
        reference_session = alone.new_session()
        reference = [complete(alone, reference_session, turn) for turn in TURNS]
        session = replicas[0].new_session()
        served = [complete(replicas[i % 2], session, turn) for i, turn in enumerate(TURNS)]
        assert served == reference
        state, expected = replicas[1].session(session), alone.session(reference_session)
        for field in ("tokens_seen", "chunks_consolidated", "consolidated_tokens", "tail_tokens"):
            assert state[field] == expected[field], field
        assert state["version"] == 1 + len(TURNS)  # one write per turn, each on the other replica
    finally:
        for server in (alone, *replicas):
            server.stop(kill=True)


def test_sigterm_saves_the_running_session(tiny_checkpoint, redis_server, tmp_path):
    checkpoint = tiny_checkpoint()
    first = ServerProcess(checkpoint, redis_server, tmp_path / "first.log")
    session = first.new_session()
    body = {
        "model": "tiny",
        "prompt": "a stream cut short by a shutdown",
        "max_tokens": 4000,
        "ignore_eos": True,
        "stream": True,
        "session_id": session,
    }
    with httpx.stream("POST", first.url + "/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(20):  # some tokens are out
            next(lines)
        first.stop()  # SIGTERM while the stream runs
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert first.process.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
    assert "sessions saved" in first.log.read_text()
    second = ServerProcess(checkpoint, redis_server, tmp_path / "second.log")
    try:
        state = second.session(session)
        assert state["version"] == 2 and state["tokens_seen"] > len(body["prompt"]) + 10
    finally:
        second.stop(kill=True)
