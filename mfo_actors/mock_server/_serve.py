"""Serving the reference MFO server on the shared HTTP core (for the CLI, tests, benchmarks)."""

from __future__ import annotations

import anyio
import anyio.abc

from mfo_actors.http import HttpLimits, serve_http
from mfo_actors.mock_server._app import MockMFOServer, MockOptions

__all__ = ["serve_mock_server"]

# Bodies up to 10 MiB: the forwarder may send large events, and this server is for testing.
MOCK_LIMITS = HttpLimits(max_body_size=10 * 1024 * 1024)


async def serve_mock_server(
    options: MockOptions | MockMFOServer | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 9000,
    limits: HttpLimits = MOCK_LIMITS,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the reference MFO server until cancelled.

    Calls ``task_status.started(bound_port)`` once listening, so tests can write
    ``port = await tg.start(partial(serve_mock_server, app, host="127.0.0.1", port=0))``.

    Args:
      options: The server's options, or an already built :class:`MockMFOServer` (to read its
        stats and events in-process).
    """
    app = options if isinstance(options, MockMFOServer) else MockMFOServer(options)
    await serve_http(app.handle, host=host, port=port, limits=limits, task_status=task_status)
