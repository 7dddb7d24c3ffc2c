"""The in-process app fixture shared by the API tests."""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack

import httpx
import pytest

from server.app import create_app
from server.settings import Settings

MODEL = "tiny"


@pytest.fixture
async def serve(tiny_checkpoint, caplog):
    """`await serve(**settings)` -> an httpx client of a started app (its `.app` attribute is the app)."""
    caplog.set_level(logging.INFO)
    async with AsyncExitStack() as stack:

        async def start(checkpoint=None, **settings) -> httpx.AsyncClient:
            settings = {"store": "memory", "served_model_name": MODEL, **settings}
            app = create_app(Settings(checkpoint=checkpoint or tiny_checkpoint(), **settings))
            await stack.enter_async_context(app.router.lifespan_context(app))
            client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
            client.app = app
            return await stack.enter_async_context(client)

        yield start
    assert "unhandled error" not in caplog.text  # no input reached the catch-all handler
