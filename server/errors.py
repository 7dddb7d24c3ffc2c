"""OpenAI-style errors: every failure answers `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

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
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def session_not_found(session_id: str) -> APIError:
    return APIError(404, f"session {session_id} not found", param="session_id", code="session_not_found")


def state_refused(exc: SessionStateError) -> APIError:
    """A session blob that does not fit this model (another model, schedule, version, or damaged)."""
    status = 409 if exc.reason in ("fingerprint", "schedule", "version") else 422
    return APIError(
        status, str(exc), code=f"session_{exc.reason}_mismatch" if status == 409 else "invalid_session"
    )


def _field(loc: tuple) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


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
        message = "; ".join(f"{_field(tuple(e['loc']))}: {e['msg']}" for e in errors)
        return APIError(
            status, message, param=param, code="invalid_value" if status == 400 else "invalid_type"
        ).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = "invalid request body (not UTF-8 JSON)" if exc.status_code == 400 else str(exc.detail)
        return APIError(exc.status_code, message, headers=getattr(exc, "headers", None)).response()

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
