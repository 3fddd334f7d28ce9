"""Helpers to run the reference MFO server in-process on a free port, over a real socket.

Usage (inside an async test)::

    async with running_mock_server(MockOptions(...)) as srv:
        ... srv.base_url, srv.app.stats, srv.app.set_faults(...) ...

The ``mock_server`` fixture is the same with default options.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

import anyio
import pytest

from mfo_actors.config import InstanceConfig, load_config_text
from mfo_actors.mock_server import MockMFOServer, MockOptions, serve_mock_server
from tests.helpers import free_port

__all__ = ["MockServerHandle", "client_config", "free_port", "mock_server", "running_mock_server"]

EMAIL = "tester@example.com"
PASSWORD = "s3cret-pass"


@dataclass(frozen=True)
class MockServerHandle:
    app: MockMFOServer
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@asynccontextmanager
async def running_mock_server(options: MockOptions | MockMFOServer | None = None
                              ) -> AsyncIterator[MockServerHandle]:
    """Serve a fresh :class:`MockMFOServer` (or the one given, e.g. with a fake clock) on
    127.0.0.1, port 0, for the block's duration."""
    app = options if isinstance(options, MockMFOServer) else MockMFOServer(
        options or MockOptions(email=EMAIL, password=PASSWORD))
    async with anyio.create_task_group() as tg:
        port = await tg.start(partial(serve_mock_server, app, host="127.0.0.1", port=0))
        try:
            yield MockServerHandle(app, port)
        finally:
            tg.cancel_scope.cancel()


@pytest.fixture
async def mock_server() -> AsyncIterator[MockServerHandle]:
    async with running_mock_server() as srv:
        yield srv


def client_config(base_url: str, *, auth: str = "login", max_attempts: int = 3,
                  timeout: str = "5s", email: str = EMAIL, password: str = PASSWORD,
                  token: str = "not-a-token") -> InstanceConfig:
    """An instance config for a client of *base_url*, with tiny backoffs."""
    auth_yaml = {
        "login": f"{{mode: login, email: {email!r}, password: {password!r}}}",
        "token": f"{{mode: token, token: {token!r}}}",
        "none": "{mode: none}",
    }[auth]
    return load_config_text(
        f"""
instance: test
client:
  base_url: {base_url}
  timeout: {timeout}
  retry: {{max_attempts: {max_attempts}, initial_backoff: 10ms, max_backoff: 50ms,
          backoff_multiplier: 2.0}}
auth: {auth_yaml}
""")
