"""The FastAPI application and its lifespan (engine thread start, graceful shutdown)."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from model.hybrid import HybridLM
from server.api import router
from server.context import Server, build_server
from server.errors import install_error_handlers
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
        log.info("engine stopped, sessions saved")


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
    return app
