"""The FastAPI application and its lifespan (engine thread start, graceful shutdown)."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from model.hybrid import HybridLM
from server.api import IMPORT_PATH, router
from server.context import Server, build_server
from server.errors import install_error_handlers
from server.limits import BodyLimit
from server.settings import Settings

log = logging.getLogger("sleepserve")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    server: Server = app.state.server
    c = server.model.config
    log.info(
        "%s checkpoint %s (fingerprint %s…): %d layers %s, d_model %d, window %d, vocab %d, variable_chunks %s",
        server.family,
        server.settings.model_path,
        server.fingerprint[:12],
        len(c.layers),
        "/".join(c.layers),
        c.d_model,
        c.window,
        c.vocab_size,
        c.variable_chunks,
    )
    log.info(
        "serving %r: schedule %s, sleep %s with N %s, store %s, max_running %d, max_waiting %d",
        server.model_name,
        c.schedule,
        server.settings.sleep_mode,
        server.engine.passes or f"adaptive in [{server.settings.min_passes}, {server.settings.max_passes}]",
        server.store.backend,
        server.settings.max_running,
        server.settings.max_waiting,
    )
    if not await server.store.ping():
        log.warning(
            "session store %s does not answer: session requests get 503 until it does", server.store.backend
        )
    # Everything loaded so far (torch, the model, the app) lives as long as the process: move it out
    # of the collector's reach, or each full collection walks it all and stalls the decode loop (seen:
    # 100 ms pauses on CPU).
    gc.collect()
    gc.freeze()
    server.engine.start()
    try:
        yield
    finally:
        await server.engine.shutdown(server.settings.shutdown_timeout)
        await asyncio.gather(*server.turns.commits, return_exceptions=True)
        if server.turns.idle is not None:
            await server.turns.idle.close()
        await server.store.close()
        gc.unfreeze()  # an app made and dropped in one process (tests) leaves nothing uncollectable
        if server.store.backend == "memory":  # nothing outlives the process
            log.info("engine stopped; the in-memory sessions end with the process")
        else:
            log.info("engine stopped, sessions saved to the %s store", server.store.backend)


def create_app(
    settings: Settings | None = None, model: HybridLM | None = None, sleeper_cpus: set[int] | None = None
) -> FastAPI:
    """The app for `settings` (default: from the environment); `model` skips loading the checkpoint;
    `sleeper_cpus`: see `build_server`."""
    settings = settings or Settings()
    app = FastAPI(
        title="sleepserve",
        version="0.1.0",
        summary="OpenAI-compatible server for language models that sleep.",
        lifespan=lifespan,
    )
    app.state.server = build_server(settings, model, sleeper_cpus)
    install_error_handlers(app)
    app.include_router(router)
    app.openapi = _served_openapi(app, app.state.server)  # type: ignore[method-assign]
    app.add_middleware(
        BodyLimit,
        limit_for=lambda path: (
            settings.max_import_bytes if path == IMPORT_PATH else settings.max_request_bytes
        ),
    )
    return app


def _served_openapi(app: FastAPI, server: Server) -> Callable[[], dict]:
    """`app.openapi` with this server's own limits in the schema: the model it serves, its cap on
    max_tokens and the token ids its tokenizer knows (the request models cannot know them)."""
    default = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schemas = default()["components"]["schemas"]
            for name in ("CompletionRequest", "ChatCompletionRequest"):
                fields = schemas[name]["properties"]
                fields["model"]["enum"] = [server.model_name]
                for cap in ("max_tokens", "max_completion_tokens"):
                    if cap in fields:
                        fields[cap]["anyOf"][0]["maximum"] = server.settings.max_tokens
            prompt = schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"]
            for token_ids in (prompt[2]["items"], prompt[3]["items"]["items"]):  # ids, a list of one
                token_ids["maximum"] = server.tokenizer.vocab_size - 1
        return app.openapi_schema

    return openapi
