"""logprobs and echo as OpenAI defines them: in process against the model's own log-probabilities, and
through the official `openai` client against a real server process."""

from __future__ import annotations

import math

import pytest
import torch
from test_api import assert_error, chat, completion, sse_events

from model.session import feed, new_state, open_window
from model.tokenizer import ByteTokenizer

TOKENIZER = ByteTokenizer()
PROMPT = "The quick brown fox jumps over the lazy dog"  # 43 tokens: past several windows of 8


def reference_logprobs(model, tokens: list[int]) -> torch.Tensor:
    """log p(token t | tokens before t) for t ≥ 1, from one offline feed of the whole text."""
    state = new_state(model)
    cache, _ = open_window(model, state)
    with torch.inference_mode():
        logits, _, _ = feed(model, state, cache, tokens, return_all=True)
    logp = torch.log_softmax(logits.float(), -1)
    return logp[:-1].gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0]


async def test_echo_scores_the_prompt(serve):
    client = await serve()
    body = completion(PROMPT, max_tokens=0, echo=True, logprobs=2)
    choice = (await client.post("/v1/completions", json=body)).json()["choices"][0]
    logprobs = choice["logprobs"]
    tokens = TOKENIZER.encode(PROMPT)
    assert choice["text"] == PROMPT and logprobs["tokens"] == list(PROMPT)
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    # lm-evaluation-harness sends token ids, batched: a list of one list
    as_ids = (await client.post("/v1/completions", json={**body, "prompt": [tokens]})).json()["choices"][0]
    assert as_ids["logprobs"] == logprobs and as_ids["text"] == PROMPT
    expected = reference_logprobs(client.app.state.server.model, tokens)
    assert torch.allclose(torch.tensor(logprobs["token_logprobs"][1:]), expected, atol=1e-4)
    for token, logprob, top in zip(
        logprobs["tokens"][1:], logprobs["token_logprobs"][1:], logprobs["top_logprobs"][1:], strict=True
    ):
        assert top[token] == logprob and len(top) in (2, 3)  # the 2 likeliest and the token itself
        assert max(top.values()) >= logprob
    assert logprobs["text_offset"] == list(range(len(PROMPT)))


async def test_generated_logprobs_match_the_prompts(serve):
    """What decoding reports for its tokens equals what prefill reports for the same text, and greedy
    tokens are the likeliest."""
    client = await serve()
    generated = (
        await client.post("/v1/completions", json=completion(PROMPT, max_tokens=12, logprobs=3))
    ).json()
    choice = generated["choices"][0]
    logprobs, n = choice["logprobs"], generated["usage"]["completion_tokens"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == n
    for token, logprob, top in zip(
        logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True
    ):
        assert top[token] == logprob == max(top.values())  # temperature 0
    assert logprobs["text_offset"][0] == 0  # offsets into the choice's text

    ids = TOKENIZER.encode(PROMPT)
    scored = (
        await client.post(
            "/v1/completions",
            json=completion(ids + generated_ids(client, PROMPT, n), max_tokens=0, echo=True, logprobs=3),
        )
    ).json()["choices"][0]["logprobs"]
    assert scored["token_logprobs"][len(ids) :] == pytest.approx(logprobs["token_logprobs"], abs=1e-4)


def generated_ids(client, prompt: str, n: int) -> list[int]:
    """The greedy continuation's ids, from the model offline."""
    model = client.app.state.server.model
    state = new_state(model)
    cache, _ = open_window(model, state)
    ids = TOKENIZER.encode(prompt)
    out = []
    with torch.inference_mode():
        logits, cache, _ = feed(model, state, cache, ids)
        while len(out) < n:
            out.append(int(logits.argmax()))
            logits, cache, _ = feed(model, state, cache, out[-1:])
    return out


async def test_streamed_logprobs_equal_the_full_answer(serve):
    client = await serve()
    for body in (
        completion(PROMPT, max_tokens=10, logprobs=1, echo=True),
        completion(PROMPT, max_tokens=10, logprobs=0),
    ):
        full = (await client.post("/v1/completions", json=body)).json()["choices"][0]
        events = sse_events((await client.post("/v1/completions", json={**body, "stream": True})).text)
        assert "".join(e["choices"][0]["text"] for e in events) == full["text"]
        for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            streamed = [
                x for e in events if e["choices"][0]["logprobs"] for x in e["choices"][0]["logprobs"][field]
            ]
            assert streamed == full["logprobs"][field], field

    messages = [{"role": "user", "content": "hi"}]
    reply = (
        await client.post(
            "/v1/chat/completions", json=chat(messages, max_tokens=10, logprobs=True, top_logprobs=3)
        )
    ).json()
    content = reply["choices"][0]["logprobs"]["content"]
    assert len(content) == reply["usage"]["completion_tokens"]
    for entry in content:
        assert [t["logprob"] for t in entry["top_logprobs"]] == sorted(
            (t["logprob"] for t in entry["top_logprobs"]), reverse=True
        )
        assert len(entry["top_logprobs"]) == 3 and entry["top_logprobs"][0]["token"] == entry["token"]
        assert entry["bytes"] == list(entry["token"].encode()) and math.isfinite(entry["logprob"])
    events = sse_events(
        (
            await client.post(
                "/v1/chat/completions",
                json=chat(messages, max_tokens=10, logprobs=True, top_logprobs=3, stream=True),
            )
        ).text
    )
    assert [
        x for e in events if e["choices"][0].get("logprobs") for x in e["choices"][0]["logprobs"]["content"]
    ] == content
    plain = (await client.post("/v1/chat/completions", json=chat(messages, max_tokens=10))).json()
    assert plain["choices"][0]["logprobs"] is None


async def test_echo_without_logprobs_and_with_a_session(serve):
    client = await serve()
    full = (await client.post("/v1/completions", json=completion("Hello", max_tokens=5, echo=True))).json()
    assert full["choices"][0]["text"].startswith("Hello") and full["choices"][0]["logprobs"] is None
    events = sse_events(
        (
            await client.post(
                "/v1/completions", json=completion("Hello", max_tokens=5, echo=True, stream=True)
            )
        ).text
    )
    assert "".join(e["choices"][0]["text"] for e in events) == full["choices"][0]["text"]

    # In a session the prompt's first token follows the session's text: it has a log-probability.
    session = (await client.post("/v1/sessions")).json()["id"]
    await client.post("/v1/completions", json=completion("The quick ", max_tokens=0, session_id=session))
    scored = (
        await client.post(
            "/v1/completions",
            json=completion("brown fox", max_tokens=0, echo=True, logprobs=1, session_id=session),
        )
    ).json()["choices"][0]["logprobs"]
    ids = TOKENIZER.encode("The quick brown fox")
    expected = reference_logprobs(client.app.state.server.model, ids)[len("The quick ") - 1 :]
    assert torch.allclose(torch.tensor(scored["token_logprobs"]), expected, atol=1e-4)


@pytest.mark.parametrize(
    ("route", "body", "fragment", "param"),
    [
        ("/v1/completions", completion(logprobs=6), "logprobs", "logprobs"),
        ("/v1/completions", completion(logprobs=-1), "logprobs", "logprobs"),
        (
            "/v1/chat/completions",
            chat([{"role": "user", "content": "x"}], logprobs=True, top_logprobs=21),
            "top_logprobs",
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            chat([{"role": "user", "content": "x"}], top_logprobs=2),
            "needs logprobs",
            "top_logprobs",
        ),
    ],
)
async def test_logprob_limits(serve, route, body, fragment, param):
    client = await serve()
    assert_error(await client.post(route, json=body), 400, fragment, param)
