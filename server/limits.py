"""Request body limits, enforced before any route reads a body.

`BodyLimit` is an ASGI middleware: a body whose Content-Length exceeds the route's limit is refused
with 413 without reading a byte of it; a body without a length (chunked) is read only up to the limit
and cut there (413), then handed to the route as if it had just arrived.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import APIError


class BodyLimit:
    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]) -> None:
        """`limit_for(path)`: the most bytes a request body to `path` may have."""
        self.app, self.limit_for = app, limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                await _refuse(scope, receive, send, 400, "Content-Length is not a number")
            elif int(length) > limit:
                await _refuse(scope, receive, send, 413, f"request body larger than {limit} bytes")
            else:  # the server reads no more than Content-Length
                await self.app(scope, receive, send)
            return
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                await _refuse(scope, receive, send, 413, f"request body larger than {limit} bytes")
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # what follows the body: a disconnect
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, message: str) -> None:
    """An OpenAI-style error; the connection closes (an unread body cannot be skipped)."""
    code = "body_too_large" if status == 413 else "invalid_content_length"
    response = APIError(status, message, code=code, headers={"Connection": "close"}).response()
    await response(scope, receive, send)
