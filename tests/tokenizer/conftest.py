"""A real in-process stack with the front door, shared by the front-door tests of one module."""

from __future__ import annotations

import pytest

from tests.inprocess import Stack


@pytest.fixture(scope="module")
async def stack(tiny_model_dir):
    async with Stack(tiny_model_dir, front_door=True) as running:
        yield running
