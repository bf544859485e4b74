"""A real in-process stack with the front door, shared by the front-door tests of one module, and the
official `openai` client on its HTTP API (a module may define its own `client` instead)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import openai
import pytest

from services.tokenizer.http_api import create_app, serve_http
from tests.inprocess import Stack


@pytest.fixture(scope="module")
async def stack(tiny_model_dir):
    async with Stack(tiny_model_dir, front_door=True) as running:
        yield running


@pytest.fixture(scope="module")
async def client(stack) -> AsyncIterator[openai.AsyncOpenAI]:
    server = await serve_http(create_app(stack.frontend), "127.0.0.1", 0)
    async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x",
                                  max_retries=0, timeout=60) as c:
        yield c
    await server.stop()
