"""OpenAI-style errors: every failure answers `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from model.state import SessionStateError
from server.stores import StoreUnavailable, VersionConflict

log = logging.getLogger("sleepserve.errors")

# Pydantic error types that mean "a value out of range" (400) rather than "a value of the wrong type" (422).
_VALUE_ERRORS = {
    "greater_than",
    "greater_than_equal",
    "less_than",
    "less_than_equal",
    "too_short",
    "too_long",
    "string_too_short",
    "string_too_long",
    "string_pattern_mismatch",
    "literal_error",
    "value_error",
}
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}


class APIError(Exception):
    """An error answered to the client as is."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = headers

    def body(self) -> dict:
        # Messages may quote the request: a lone surrogate in it must not make the error unrenderable.
        message, param = _printable(self.message), self.param and _printable(self.param)
        return {"error": {"message": message, "type": self.type, "param": param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = dict(self.headers or {})
        if self.status == 500:  # the client should not reuse a connection the server may drop
            headers["Connection"] = "close"
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def session_not_found(session_id: str) -> APIError:
    return APIError(404, f"session {session_id} not found", param="session_id", code="session_not_found")


def state_refused(exc: SessionStateError) -> APIError:
    """A session blob that does not fit this model (another model, schedule, version), or that is
    damaged, invalid or unsigned."""
    if exc.reason in ("fingerprint", "schedule", "version"):
        return APIError(409, str(exc), code=f"session_{exc.reason}_mismatch")
    code = "invalid_session_signature" if exc.reason == "signature" else "invalid_session"
    return APIError(422, str(exc), code=code)


def session_damaged(session_id: str, problem: str) -> APIError:
    """A stored record that cannot be read (damaged outside the server): it can only be deleted."""
    return APIError(
        409,
        f"session {session_id} is damaged in the store and can only be deleted: {problem}",
        param="session_id",
        code="session_damaged",
    )


def _field(loc: tuple) -> str:
    parts = [str(p) for p in loc[1:]] if loc and loc[0] in ("body", "path", "header", "query") else loc
    return ".".join(str(p) for p in parts) or "body"


def _message(error: dict) -> str:
    return f"{_field(tuple(error['loc']))}: {error['msg']}"


def _allowed_methods(request: Request) -> str:
    """The methods some route takes on the request's path (the Allow header of a 405), found by asking
    the routes (FastAPI nests included routers, so the route table is not flat)."""
    allowed = []
    for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"):
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in request.app.routes):
            allowed.append(method)
    return ", ".join(allowed)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": "value_error"}
        if first["type"] == "json_invalid":
            return bad_request(
                f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
            ).response()
        param = _field(tuple(first["loc"]))
        status = 400 if all(e["type"] in _VALUE_ERRORS for e in errors) else 422
        message = "; ".join(_message(e) for e in errors)
        return APIError(
            status, message, param=param, code="invalid_value" if status == 400 else "invalid_type"
        ).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = "invalid request body (not UTF-8 JSON)" if exc.status_code == 400 else str(exc.detail)
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed_methods(request)
        return APIError(exc.status_code, message, headers=headers).response()

    @app.exception_handler(StoreUnavailable)
    async def _store_down(request: Request, exc: StoreUnavailable) -> JSONResponse:
        log.warning("session store unavailable: %s", exc)
        return APIError(
            503, "the session store is unavailable; stateless requests still work", code="store_unavailable"
        ).response()

    @app.exception_handler(VersionConflict)
    async def _conflict(request: Request, exc: VersionConflict) -> JSONResponse:
        return APIError(409, f"session changed concurrently: {exc}", code="session_conflict").response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return APIError(500, "internal server error", type="server_error").response()
