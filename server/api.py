"""HTTP routes: the OpenAI-compatible API (`server/openai_routes.py`) and the session API
(`server/session_routes.py`) under /v1, behind the API key; health, readiness and metrics here."""

from __future__ import annotations

import contextlib

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server import openai_routes, session_routes
from server.routing import ERRORS, ServerDep, authenticate
from server.stores import StoreError

IMPORT_PATH = "/v1/sessions/import"

router = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(authenticate)], responses=ERRORS)
v1.include_router(openai_routes.router)
v1.include_router(session_routes.router)


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
