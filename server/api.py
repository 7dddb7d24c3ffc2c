"""HTTP routes: the OpenAI-compatible API, the session API, health, readiness and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path as FilePath
from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, Depends, Header, Path, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.convertors import Convertor, register_url_convertor

from server.chat import ChatTurn, chat_turn, render
from server.context import Server
from server.errors import APIError, bad_request
from server.logprobs import LogprobFormatter
from server.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CreateSessionRequest,
    DeletedSession,
    Delta,
    ErrorResponse,
    ModelCard,
    ModelList,
    SamplingRequest,
    SessionId,
    SessionInfo,
    Usage,
)
from server.sequence import SamplingParams
from server.serving import Turn
from server.sessions import Checkout, message_hash, new_chat_messages
from server.stores import StoreError

if TYPE_CHECKING:
    from server.sequence import Output, TurnStats

IMPORT_PATH = "/v1/sessions/import"
_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 408, 409, 413, 422, 429, 500, 503)}


def get_server(request: Request) -> Server:
    return request.app.state.server


def authenticate(request: Request) -> str | None:
    """The owner tag (sha256 of the key) of a request, None when the server has no API keys; else 401."""
    keys = get_server(request).settings.api_keys
    if not keys:
        return None
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    matched = False
    for key in keys:  # compare with every key, in constant time
        matched |= hmac.compare_digest(token.strip().encode(), key.encode())
    if scheme.lower() != "bearer" or not matched:
        raise APIError(
            401,
            "invalid or missing API key: send `Authorization: Bearer <key>`",
            type="authentication_error",
            code="invalid_api_key",
        )
    return hashlib.sha256(token.strip().encode()).hexdigest()


ServerDep = Annotated[Server, Depends(get_server)]
Owner = Annotated[str | None, Depends(authenticate)]
# Not `SessionId | None`: a header is absent or a string, and the schema must not offer null.
SessionHeader = Annotated[SessionId, Header(alias="X-Session-ID", description="Continue this session.")]
SessionPath = Annotated[SessionId, Path()]


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


class _SessionSegment(Convertor[str]):
    """A path segment that can be a session id: anything but `import`, so that the session routes never
    answer for /v1/sessions/import (its other methods get 405, not a 400 about the id). Malformed ids
    still reach the route, which answers 400 naming the format."""

    regex = "(?!import$)[^/]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("session", _SessionSegment())

router = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(authenticate)], responses=_ERRORS)


# -- OpenAI API ------------------------------------------------------------------------------------


@v1.get("/models", response_model=ModelList, tags=["openai"])
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


@v1.post("/completions", response_model=CompletionResponse, tags=["openai"], responses=_STREAMED)
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
    return await _respond(turn, request, body, _CompletionFormat(server, body, prompt, prompt_text))


@v1.post(
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
    return await _respond(turn, request, body, _ChatFormat(server, body))


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


# -- responses -------------------------------------------------------------------------------------


def _usage(stats: TurnStats) -> Usage:
    return Usage(
        prompt_tokens=stats.prompt_tokens,
        completion_tokens=stats.completion_tokens,
        total_tokens=stats.prompt_tokens + stats.completion_tokens,
        consolidated_tokens=stats.consolidated_tokens,
        sleep_passes=stats.sleep_passes,
        sleep_seconds=stats.sleep_seconds,
        session_tokens_total=stats.session_tokens_total,
    )


class _Format:
    """Response and stream chunks of one route; a subclass per route."""

    prefix = ""

    def __init__(self, server: Server, body: SamplingRequest) -> None:
        self.id, self.model = f"{self.prefix}-{secrets.token_hex(12)}", server.model_name
        # As OpenAI: with include_usage every chunk carries "usage" (null until the last one).
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)
        self.hidden = set() if self.include_usage else {"usage"}
        self.logprobs = LogprobFormatter(server.tokenizer)

    def first(self) -> list[dict]:
        """Chunks sent before any output."""
        return []


class _CompletionFormat(_Format):
    prefix = "cmpl"

    def __init__(self, server: Server, body: CompletionRequest, prompt: list[int], prompt_text: str) -> None:
        super().__init__(server, body)
        self.scored = body.logprobs is not None
        self.prompt, self.echo = prompt, prompt_text if body.echo else None

    def _piece(self, out: Output) -> tuple[str, CompletionLogprobs | None]:
        """The text and logprobs an output adds to the choice."""
        if out.prompt_logprobs is not None:  # echo with logprobs: the prompt, once it is in
            logprobs = self.logprobs.completion(self.prompt, out.prompt_logprobs)
            self.logprobs.offset = len(self.echo)
            return self.echo + out.text, logprobs
        tokens = [e.token for e in out.logprobs]
        return out.text, self.logprobs.completion(tokens, out.logprobs) if self.scored else None

    def first(self) -> list[dict]:
        if self.echo is None or self.scored:  # with logprobs, the prompt comes once scored
            return []
        return [self._response(CompletionChoice(text=self.echo), exclude={"session_id", *self.hidden})]

    def _response(self, choice: CompletionChoice, exclude: set[str], **fields) -> dict:
        response = CompletionResponse(id=self.id, model=self.model, choices=[choice], **fields)
        return response.model_dump(exclude=exclude)

    def chunk(self, out: Output) -> dict | None:
        text, logprobs = self._piece(out)
        if not text and not (logprobs and logprobs.tokens) and out.finish_reason is None:
            return None
        choice = CompletionChoice(text=text, logprobs=logprobs, finish_reason=out.finish_reason)
        return self._response(choice, exclude={"session_id", *self.hidden})

    def usage_chunk(self, usage: Usage) -> dict:
        return CompletionResponse(id=self.id, model=self.model, choices=[], usage=usage).model_dump(
            exclude={"session_id"}
        )

    def full(self, outs: list[Output], usage: Usage, session_id: str | None) -> dict:
        pieces = [self._piece(out) for out in outs]
        text = "".join(text for text, _ in pieces)
        if self.echo is not None and not self.scored:
            text = self.echo + text
        logprobs = None
        if self.scored:
            parts = [p for _, p in pieces if p is not None]
            logprobs = CompletionLogprobs(
                **{
                    name: [x for part in parts for x in getattr(part, name)]
                    for name in CompletionLogprobs.model_fields
                }
            )
        choice = CompletionChoice(text=text, logprobs=logprobs, finish_reason=outs[-1].finish_reason)
        return self._response(choice, exclude=set(), usage=usage, session_id=session_id)


class _ChatFormat(_Format):
    prefix = "chatcmpl"

    def __init__(self, server: Server, body: ChatCompletionRequest) -> None:
        super().__init__(server, body)
        self.scored = body.logprobs

    def _chunk(self, delta: Delta, finish_reason: str | None, logprobs: ChatLogprobs | None = None) -> dict:
        choice = ChatChunkChoice(delta=delta, logprobs=logprobs, finish_reason=finish_reason)
        return ChatCompletionChunk(id=self.id, model=self.model, choices=[choice]).model_dump(
            exclude=self.hidden
        )

    def first(self) -> list[dict]:
        return [self._chunk(Delta(role="assistant", content=""), None)]

    def chunk(self, out: Output) -> dict | None:
        logprobs = self.logprobs.chat(out.logprobs) if self.scored and out.logprobs else None
        if not out.text and logprobs is None and out.finish_reason is None:
            return None
        delta = Delta(content=out.text) if out.text else Delta()
        return self._chunk(delta, out.finish_reason, logprobs)

    def usage_chunk(self, usage: Usage) -> dict:
        return ChatCompletionChunk(id=self.id, model=self.model, choices=[], usage=usage).model_dump()

    def full(self, outs: list[Output], usage: Usage, session_id: str | None) -> dict:
        text = "".join(out.text for out in outs)
        logprobs = self.logprobs.chat([e for out in outs for e in out.logprobs]) if self.scored else None
        choice = ChatChoice(
            message=AssistantMessage(content=text), logprobs=logprobs, finish_reason=outs[-1].finish_reason
        )
        response = ChatCompletionResponse(
            id=self.id, model=self.model, choices=[choice], usage=usage, session_id=session_id
        )
        return response.model_dump()


def _final_error(turn: Turn, out: Output) -> APIError | None:
    """The error a finished request reports instead of a normal ending, if any."""
    if out.finish_reason == "timeout":
        return APIError(
            408,
            "request timed out; the session keeps the tokens processed so far",
            type="timeout_error",
            code="timeout",
        )
    if out.finish_reason == "error":
        return APIError(
            500,
            f"{out.error or 'the model failed on this request'}; the session was left unchanged",
            type="server_error",
            code="model_error",
        )
    return turn.save_error


async def _respond(turn: Turn, request: Request, body: SamplingRequest, fmt: _Format) -> Response:
    session_id = turn.checkout.id if turn.checkout else None
    headers = {"X-Session-ID": session_id} if session_id else None
    if body.stream:
        return StreamingResponse(_stream(turn, fmt), media_type="text/event-stream", headers=headers)
    watcher = asyncio.create_task(_abort_on_disconnect(request, turn))
    try:
        outs = [out async for out in turn.outputs()]
    finally:
        watcher.cancel()
    error = _final_error(turn, outs[-1])
    if error is not None:
        raise error
    return JSONResponse(fmt.full(outs, _usage(outs[-1].stats), session_id), headers=headers)


async def _stream(turn: Turn, fmt: _Format) -> AsyncIterator[str]:
    for chunk in fmt.first():
        yield _sse(chunk)
    async for out in turn.outputs():
        error = _final_error(turn, out) if out.finish_reason is not None else None
        chunk = error.body() if error else fmt.chunk(out)
        if chunk is not None:
            yield _sse(chunk)
        if out.finish_reason is not None and fmt.include_usage:
            yield _sse(fmt.usage_chunk(_usage(out.stats)))
    yield "data: [DONE]\n\n"


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _abort_on_disconnect(request: Request, turn: Turn) -> None:
    """Non-streaming requests: abort when the client goes away before the answer is ready."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)
    turn.abort()


# -- sessions --------------------------------------------------------------------------------------


async def _info(server: Server, session_id: str, owner: str | None) -> SessionInfo:
    stored, state, history = await server.sessions.read(session_id, owner)
    return server.sessions.info(session_id, stored.version, state, history)


@v1.post("/sessions", response_model=SessionInfo, tags=["sessions"])
async def create_session(
    server: ServerDep, owner: Owner, body: CreateSessionRequest | None = None
) -> SessionInfo:
    """Create an empty session (a random id, or a client-chosen one of 32 hex characters). 409: that
    id exists."""
    session_id = await server.sessions.create(owner, body.session_id if body else None)
    return await _info(server, session_id, owner)


@v1.post(
    "/sessions/import",
    response_model=SessionInfo,
    tags=["sessions"],
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def import_session(request: Request, server: ServerDep, owner: Owner) -> SessionInfo:
    """Store an exported session blob under a new id, once every check passed: 409 for a blob of
    another model, schedule or format version, 422 for a damaged, invalid or (with a signing key)
    unsigned one. Larger than `max_import_bytes`: 413, the upload cut there."""
    blob = await request.body()  # `BodyLimit` has bounded it
    session_id = await server.sessions.import_blob(blob, owner)
    return await _info(server, session_id, owner)


@v1.get("/sessions/{session_id:session}", response_model=SessionInfo, tags=["sessions"])
async def get_session(session_id: SessionPath, server: ServerDep, owner: Owner) -> SessionInfo:
    """Counters, window fill, schedule, version, state size and fast-weight statistics."""
    return await _info(server, session_id, owner)


@v1.delete("/sessions/{session_id:session}", response_model=DeletedSession, tags=["sessions"])
async def delete_session(session_id: SessionPath, server: ServerDep, owner: Owner) -> DeletedSession:
    await server.sessions.delete(session_id, owner)
    return DeletedSession(id=session_id)


@v1.post("/sessions/{session_id:session}/consolidate", response_model=SessionInfo, tags=["sessions"])
async def consolidate_session(session_id: SessionPath, server: ServerDep, owner: Owner) -> SessionInfo:
    """Sleep on the session's unconsolidated tokens now (409 unless trained with variable chunks)."""
    await server.sessions.consolidate(session_id, owner)
    return await _info(server, session_id, owner)


@v1.post("/sessions/{session_id:session}/fork", response_model=SessionInfo, tags=["sessions"])
async def fork_session(session_id: SessionPath, server: ServerDep, owner: Owner) -> SessionInfo:
    """Copy the session to a new id; the two continue independently."""
    fork_id = await server.sessions.fork(session_id, owner)
    return await _info(server, fork_id, owner)


@v1.get(
    "/sessions/{session_id:session}/export",
    tags=["sessions"],
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "The session blob."}},
)
async def export_session(session_id: SessionPath, server: ServerDep, owner: Owner) -> Response:
    """The session's state as its fixed-size safetensors blob."""
    blob = await server.sessions.export(session_id, owner)
    disposition = f'attachment; filename="session-{session_id}.safetensors"'
    return Response(blob, media_type="application/octet-stream", headers={"Content-Disposition": disposition})


# -- operations ------------------------------------------------------------------------------------


@router.get("/health", tags=["operations"])
async def health() -> dict:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/ready", tags=["operations"], responses={503: {"description": "Not ready."}})
async def ready(server: ServerDep) -> JSONResponse:
    """Ready to serve: model loaded, engine running, session store reachable."""
    engine_ok = server.engine.alive
    store_ok = await server.store.ping()
    status = 200 if engine_ok and store_ok else 503
    body = {"status": "ready" if status == 200 else "unavailable", "engine": engine_ok, "store": store_ok}
    return JSONResponse(body, status_code=status)


@router.get("/metrics", tags=["operations"], response_class=Response)
async def metrics(server: ServerDep) -> Response:
    """Prometheus metrics (prefix sleepserve_)."""
    with contextlib.suppress(StoreError):  # keep the last value; the store's error counter says why
        server.metrics.sessions_active.set(await server.store.count())
    return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)


router.include_router(v1)
