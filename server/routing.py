"""What every route module shares: the server and API-key owner of a request (FastAPI dependencies),
the session id's path and header types, and the error responses the routes document."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Header, Path, Request
from starlette.convertors import Convertor, register_url_convertor

from server.context import Server
from server.errors import APIError
from server.schemas import ErrorResponse, SessionId

ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 408, 409, 413, 422, 429, 500, 503)}


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
