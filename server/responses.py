"""How a turn's outputs become the HTTP answer: one JSON response, or a server-sent event stream of
chunks, in the completions or the chat format (a `ResponseFormat` each); usage, and the errors a
finished request reports instead of a normal ending."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from server.context import Server
from server.errors import APIError
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
    Delta,
    SamplingRequest,
    Usage,
)
from server.serving import Turn

if TYPE_CHECKING:
    from server.sequence import Output, TurnStats


def usage_of(stats: TurnStats) -> Usage:
    return Usage(
        prompt_tokens=stats.prompt_tokens,
        completion_tokens=stats.completion_tokens,
        total_tokens=stats.prompt_tokens + stats.completion_tokens,
        consolidated_tokens=stats.consolidated_tokens,
        sleep_passes=stats.sleep_passes,
        sleep_seconds=stats.sleep_seconds,
        session_tokens_total=stats.session_tokens_total,
    )


class ResponseFormat:
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


class CompletionFormat(ResponseFormat):
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


class ChatFormat(ResponseFormat):
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


async def respond(turn: Turn, request: Request, body: SamplingRequest, fmt: ResponseFormat) -> Response:
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
    return JSONResponse(fmt.full(outs, usage_of(outs[-1].stats), session_id), headers=headers)


async def _stream(turn: Turn, fmt: ResponseFormat) -> AsyncIterator[str]:
    for chunk in fmt.first():
        yield _sse(chunk)
    async for out in turn.outputs():
        error = _final_error(turn, out) if out.finish_reason is not None else None
        chunk = error.body() if error else fmt.chunk(out)
        if chunk is not None:
            yield _sse(chunk)
        if out.finish_reason is not None and fmt.include_usage:
            yield _sse(fmt.usage_chunk(usage_of(out.stats)))
    yield "data: [DONE]\n\n"


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _abort_on_disconnect(request: Request, turn: Turn) -> None:
    """Non-streaming requests: abort when the client goes away before the answer is ready."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)
    turn.abort()
