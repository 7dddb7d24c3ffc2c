"""The OpenAI-compatible routes: the model list, completions and chat completions. Each request is
checked and turned into engine sampling parameters and a prompt here, run as a `Turn` (with or without
a session), and answered by `server/responses.py`."""

from __future__ import annotations

import time
from pathlib import Path as FilePath

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server.chat import ChatTurn, chat_turn, render
from server.context import Server
from server.errors import APIError, bad_request
from server.responses import ChatFormat, CompletionFormat, respond
from server.routing import Owner, ServerDep, SessionHeader
from server.schemas import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    SamplingRequest,
)
from server.sequence import SamplingParams
from server.serving import Turn
from server.sessions import Checkout, message_hash, new_chat_messages

router = APIRouter()


# The OpenAPI description of a route that answers JSON, or an SSE stream with `stream: true`.
_STREAMED = {
    200: {
        "description": "The response, or with `stream: true` a server-sent event stream: `data: <chunk>` "
        "events, then `data: [DONE]`.",
        "content": {
            "text/event-stream": {  # (Open API 3.1: the schema of one event)
                "schema": {
                    "type": "object",
                    "properties": {
                        "event": {"type": "string"},
                        "data": {"type": "string", "description": "A JSON chunk, or [DONE] at the end."},
                    },
                    "required": ["data"],
                }
            }
        },
    }
}


@router.get("/models", response_model=ModelList, tags=["openai"])
async def list_models(server: ServerDep) -> ModelList:
    c = server.model.config
    card = ModelCard(
        id=server.model_name,
        created=int(folder.stat().st_mtime)
        if (folder := FilePath(server.settings.model_path)).exists()
        else 0,
        max_model_len=server.settings.max_tokens,
        family=server.family,
        window=c.window,
        schedule=c.schedule,
        sleep_passes=server.passes,
        fingerprint=server.fingerprint,
    )
    return ModelList(data=[card])


@router.post("/completions", response_model=CompletionResponse, tags=["openai"], responses=_STREAMED)
async def completions(
    body: CompletionRequest,
    request: Request,
    server: ServerDep,
    owner: Owner,
    x_session_id: SessionHeader = None,  # type: ignore[assignment]
) -> Response:
    """Text completion. With a session (`session_id` or `X-Session-ID`) the prompt continues its text.

    Past `request_timeout` the answer is 408 (a stream ends with an error event before `[DONE]`); the
    session keeps every token processed. 409: the session is busy; 429 (Retry-After): queue full."""
    arrival = time.monotonic()
    params = _sampling(
        server,
        body,
        body.max_tokens,
        logprobs=body.logprobs,
        prompt_logprobs=body.logprobs if body.echo else None,
    )
    prompt, prompt_text = _completion_prompt(server, body.prompt)
    turn = await Turn.start(
        server.turns,
        session_id=_session_id(body, x_session_id),
        owner=owner,
        build_prompt=lambda _: (prompt, None),
        params=params,
        arrival=arrival,
    )
    return await respond(turn, request, body, CompletionFormat(server, body, prompt, prompt_text))


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    tags=["openai"],
    responses=_STREAMED,
)
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    server: ServerDep,
    owner: Owner,
    x_session_id: SessionHeader = None,  # type: ignore[assignment]
) -> Response:
    """Chat completion. With a session, send only the new messages or the whole history: the messages the
    session already consumed (its replies included) are recognised and skipped."""
    arrival = time.monotonic()
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = _sampling(server, body, max_tokens, logprobs=logprobs)
    messages = [(m.template_role(), m.text()) for m in body.messages]

    def build_prompt(checkout: Checkout | None) -> tuple[list[int], ChatTurn | None]:
        if checkout is None:
            tokens, turn = render(server.tokenizer, messages), None
        else:
            start = new_chat_messages(body.messages, checkout.history)
            hashes = [message_hash(m) for m in body.messages[start:]]
            tokens, turn = chat_turn(server.tokenizer, checkout.history, messages[start:], hashes)
        _check_prompt_size(len(tokens), server.settings.max_prompt_tokens, "messages")
        return tokens, turn

    turn = await Turn.start(
        server.turns,
        session_id=_session_id(body, x_session_id),
        owner=owner,
        build_prompt=build_prompt,
        params=params,
        arrival=arrival,
    )
    return await respond(turn, request, body, ChatFormat(server, body))


def _sampling(
    server: Server,
    body: SamplingRequest,
    max_tokens: int | None,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    if body.model != server.model_name:
        raise APIError(
            404,
            f"The model `{body.model}` does not exist. This server serves `{server.model_name}`.",
            param="model",
            code="model_not_found",
        )
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")
    cap = server.settings.max_tokens
    for field in ("max_tokens", "max_completion_tokens"):  # each, even one that the other overrides
        value = getattr(body, field, None)
        if value is not None and value > cap:
            raise bad_request(f"{field} must be at most {cap}, got {value}", field)
    return SamplingParams(
        max_tokens=cap if max_tokens is None else max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=max(body.top_k, 0),
        seed=None if body.seed is None else body.seed % 2**64,  # what torch.Generator takes
        stop=body.stops(),
        stop_tokens=frozenset() if body.ignore_eos else server.tokenizer.eos_ids,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
    )


def _completion_prompt(server: Server, prompt: str | list) -> tuple[list[int], str]:
    """The prompt's token ids and its text (what echo returns)."""
    if isinstance(prompt, list) and not isinstance(prompt[0], int):
        prompt = prompt[0]  # the schema allows exactly one
    tokens = server.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    _check_prompt_size(len(tokens), server.settings.max_prompt_tokens, "prompt")
    vocab = server.tokenizer.vocab_size
    if any(not 0 <= t < vocab for t in tokens):
        raise bad_request(f"prompt token ids must lie in [0, {vocab})", "prompt")
    return tokens, prompt if isinstance(prompt, str) else server.tokenizer.decode(tokens)


def _check_prompt_size(n_tokens: int, limit: int, param: str) -> None:
    if n_tokens > limit:
        raise bad_request(
            f"the prompt has {n_tokens} tokens, more than this server's limit of {limit}", param
        )


def _session_id(body: SamplingRequest, header: str | None) -> str | None:
    """The body's session_id, else the header's: a client may set the header as a default for all its
    requests and name another session in one request's body."""
    return body.session_id or header
