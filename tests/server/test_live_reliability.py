"""A real server process against a schemathesis run with every check (the OpenAPI schema must hold
everything the server enforces, and no request may get a 500), and a chat client whose stream drops
mid-reply then re-sends the history with the part of the reply it received."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support import ServerProcess

MODEL = "tiny"
CONFIG = Path(__file__).with_name("schemathesis.toml")


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory) -> Iterator[ServerProcess]:
    # A small max_tokens cap keeps each generated request short (the schema carries the cap).
    log = tmp_path_factory.mktemp("live") / "server.log"
    process = ServerProcess(tiny_checkpoint(), "memory", log, MODEL, args=("--max-tokens", "16"))
    yield process
    process.stop(kill=True)


def test_schemathesis_finds_nothing(server):
    """Every check schemathesis has (server errors, status codes, content types, headers, response
    schemas, negative and positive data, Allow headers, stateful links), a fixed seed and a bounded
    number of examples per operation, so that a CI run is repeatable and takes well under a minute."""
    command = [
        *(sys.executable, "-m", "schemathesis.cli"),
        *("--config-file", str(CONFIG), "run", f"{server.url}/openapi.json"),
        *("--checks", "all", "--max-examples", "30", "--seed", "1", "--workers", "1"),
        *("--continue-on-failure", "--output-sanitize", "false"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "passed" in result.stdout and "failed" not in result.stdout
    assert "unhandled error" not in server.log.read_text()


def test_a_chat_client_resending_the_part_of_a_reply_it_received_continues(server):
    session = httpx.post(server.url + "/v1/sessions").json()["id"]
    first = [{"role": "user", "content": "tell me a story"}]
    # ignore_eos: a reply of all 16 tokens, longer than what the client takes
    body = {
        "model": MODEL,
        "messages": first,
        "max_tokens": 16,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    received = ""
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json=body, headers={"X-Session-ID": session}
    ) as r:
        for line in r.iter_lines():  # take the first two characters of text, then drop the connection
            if line.startswith("data: {"):
                received += json.loads(line[len("data: ") :])["choices"][0]["delta"].get("content") or ""
            if len(received) >= 2:
                time.sleep(1)  # meanwhile the server generates the whole reply (as in the field)
                break
    prompt = 3 + len("tell me a story")  # <|user|> … <|end|> <|assistant|>
    stored = httpx.get(f"{server.url}/v1/sessions/{session}").json()
    assert stored["tokens_seen"] >= prompt + 16 > prompt + len(received)  # it has more than the client
    history = [*first, {"role": "assistant", "content": received}, {"role": "user", "content": "go on"}]
    follow = {"model": MODEL, "messages": history, "max_tokens": 4, "temperature": 0, "session_id": session}
    response = httpx.post(server.url + "/v1/chat/completions", json=follow, timeout=30)
    assert response.status_code == 200, response.text  # not 409: the prefix matches the stored reply
    assert response.json()["usage"]["prompt_tokens"] == len(b"go on") + 3  # only the new message was fed
    wrong = [
        *first,
        {"role": "assistant", "content": received + "not what was said"},
        {"role": "user", "content": "x"},
    ]
    conflict = httpx.post(server.url + "/v1/chat/completions", json={**follow, "messages": wrong}, timeout=30)
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "session_history_mismatch"
