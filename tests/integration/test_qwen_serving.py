"""A Qwen3.5 checkpoint served end to end: a tiny random one saved as transformers saves it (with its BPE
tokenizer and chat template, tests/qwen_support.py) answers the official `openai` client, and a chat
session through the Redis store runs across several window boundaries and a server restart with the
same tokens as one long offline run."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
from qwen_support import make_checkpoint
from support import ServerProcess
from transformers import AutoTokenizer

from model.checkpoint import fingerprint
from model.loading import load_model
from model.session import feed, generate, new_state, open_window
from model.state import SessionState

MODEL = "qwen-tiny"
WINDOW = 16
PASSES = 2
FLAGS = ("--window", str(WINDOW), "--sleep-passes", str(PASSES))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("qwen"), layout="vlm")


@pytest.fixture
def launch(tmp_path: Path, checkpoint: Path):
    servers: list[ServerProcess] = []

    def start(store: str) -> ServerProcess:
        server = ServerProcess(checkpoint, store, tmp_path / f"server-{len(servers)}.log", MODEL, FLAGS)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(kill=True)


def render(hf, messages: list[dict]) -> list[int]:
    """transformers' own rendering of a conversation, ready for the assistant's reply."""
    return list(hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))


def offline(checkpoint: Path):
    return load_model(checkpoint, window=WINDOW, sleep_passes=PASSES)


def test_openai_client(launch, checkpoint):
    server = launch("memory")
    client, hf = server.client, AutoTokenizer.from_pretrained(str(checkpoint))
    [card] = client.models.list().data
    assert card.id == MODEL
    assert (card.model_extra["family"], card.model_extra["window"]) == ("qwen3_5", WINDOW)
    assert (card.model_extra["schedule"], card.model_extra["sleep_passes"]) == ("lagged", PASSES)

    prompt = "The quick brown fox jumps over the lazy dog."
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert plain.usage.prompt_tokens == len(hf.encode(prompt))  # the model's tokenizer, not bytes
    streamed = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text
    loaded = offline(checkpoint)
    with torch.inference_mode():
        state = new_state(loaded.model)
        tokens, _ = generate(
            loaded.model, state, hf.encode(prompt), 12, stop=lambda o: o[-1] in loaded.tokenizer.eos_ids
        )
    assert plain.choices[0].text == hf.decode(tokens, skip_special_tokens=True)

    scored = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=0, temperature=0, echo=True, logprobs=2
    ).choices[0]
    assert scored.text == prompt and len(scored.logprobs.tokens) == len(hf.encode(prompt))
    assert scored.logprobs.token_logprobs[0] is None and all(
        lp <= 0 for lp in scored.logprobs.token_logprobs[1:]
    )

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    reply = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=10, temperature=0, logprobs=True, top_logprobs=2
    )
    assert reply.usage.prompt_tokens == len(render(hf, messages))
    assert len(reply.choices[0].logprobs.content) == reply.usage.completion_tokens
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True
        )
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == reply.choices[0].message.content
    )


# (new messages, max_tokens) per turn. Turn 3 only feeds its prompt; turn 4 brings a reply the client
# wrote, so that the template renders what the session consumed exactly (the model's own replies here
# are random tokens, which the tokenizer would encode otherwise).
TURNS = [
    ([("system", "You are a helpful assistant."), ("user", "Hello! What is 2+2?")], 6),
    ([("user", "And what comes after that?")], 6),
    ([("user", "Tell me about the quick brown fox.")], 0),
    ([("assistant", "The fox jumps over the lazy dog."), ("user", "Why does it do that?")], 6),
    ([("user", "One more thing, then goodbye.")], 6),
]
RESTART_BEFORE = 3  # the server restarts before this turn


def reference_run(checkpoint: Path, replies: list[str]) -> tuple[SessionState, list[list[int]], list[bool]]:
    """The conversation as one long offline session, fed by the rule of server/chat.py with
    transformers' own chat template: what the template renders for the whole conversation after the
    tokens the session consumed, when the rendering starts with exactly those; else the new messages
    rendered alone. Returns the state, each turn's greedy reply and whether each turn was exact."""
    loaded, hf = offline(checkpoint), AutoTokenizer.from_pretrained(str(checkpoint))
    model, eos = loaded.model, loaded.tokenizer.eos_ids
    state = new_state(model)
    cache, _ = open_window(model, state)
    history: list[dict] = []
    anchor: list[int] = []  # the rendering the session's tokens are checked against
    outs, exact = [], []
    for (messages, max_tokens), reply in zip(TURNS, replies, strict=True):
        new = [{"role": role, "content": content} for role, content in messages]
        rendered = render(hf, history + new)
        exact.append(rendered[: len(anchor)] == anchor and len(rendered) > len(anchor))
        tokens = rendered[len(anchor) :] if exact[-1] else render(hf, new)
        with torch.inference_mode():
            if max_tokens:
                out, cache = generate(
                    model, state, tokens, max_tokens, stop=lambda o: o[-1] in eos, cache=cache
                )
            else:
                out, (_, cache, _) = [], feed(model, state, cache, tokens)
        outs.append(out)
        history += new + ([{"role": "assistant", "content": reply}] if out else [])
        anchor = rendered + out
    return state, outs, exact


def test_chat_session_across_windows_and_a_restart(launch, checkpoint, redis_server):
    store = redis_server.replace("/0", "/3")
    server = launch(store)
    session = server.new_session()
    replies, usages = [], []
    for turn, (messages, max_tokens) in enumerate(TURNS):
        if turn == RESTART_BEFORE:
            server.stop()
            server = launch(store)
        response = server.client.chat.completions.create(
            model=MODEL,
            messages=[{"role": role, "content": content} for role, content in messages],
            max_tokens=max_tokens,
            temperature=0,
            extra_body={"session_id": session},
        )
        replies.append(response.choices[0].message.content)
        usages.append(response.usage)

    state, outs, exact = reference_run(checkpoint, replies)
    assert exact[0] and exact[RESTART_BEFORE], "the turns after a prompt-only turn continue the rendering"
    loaded = offline(checkpoint)
    hf = AutoTokenizer.from_pretrained(str(checkpoint))
    for out, reply, usage in zip(outs, replies, usages, strict=True):
        assert reply == hf.decode(out, skip_special_tokens=True)
        assert usage.completion_tokens == len(out)
    info = server.session(session)
    assert info["tokens_seen"] == state.tokens_seen and info["chunks_consolidated"] >= 4
    blob = httpx.get(f"{server.url}/v1/sessions/{session}/export").content
    served = SessionState.from_bytes(blob, fingerprint(loaded.model))
    assert served.tail == state.tail and served.chunks_consolidated == state.chunks_consolidated
    for a, b in zip(served.memory, state.memory, strict=True):
        assert torch.allclose(a, b, atol=1e-4)
