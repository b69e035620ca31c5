"""Fixtures shared by the API tests that run the real app over a FakeEngine."""

from __future__ import annotations

import pytest

from support.fakeengine import FakeEngine
from support.serving import Server


@pytest.fixture
def engine(server: Server) -> FakeEngine:
    """The module's server's FakeEngine, emptied of what earlier tests sent it (each module defines `server`)."""
    fake: FakeEngine = server.engine
    fake.reset()
    return fake
