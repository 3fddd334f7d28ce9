"""The life of an actor that serves HTTP on one port: listen, report ready, stop, drain.

The listener and the admin port differ only in their handlers and in what they log; the
start/stop/drain sequence lives here once. On :meth:`ServerActor.request_stop` the server
closes its listening sockets, marks keep-alive connections ``Connection: close``, waits up
to the drain timeout for requests in flight, then cancels what is left.
"""

from __future__ import annotations

import anyio

from mfo_actors.errors import ListenError
from mfo_actors.http import HttpServer
from mfo_actors.runtime import ReadySignal, RestartPolicy

__all__ = ["ServerActor"]


class ServerActor:
    """Base of the HTTP-serving actors; subclasses build the server and say what to log.

    Args:
      host: Address to bind.
      port: Port to bind (0: any; see :attr:`port` once ready).
      drain_timeout: Seconds that requests in flight get to finish on stop.
      where: Names this server in errors (``crm.yaml: webhook_listener``).
    """

    name: str
    restart = RestartPolicy("permanent")

    def __init__(self, *, host: str, port: int, drain_timeout: float, where: str) -> None:
        self._where = where
        self._host = host
        self._bind_port = port
        self._drain_timeout = drain_timeout
        self._stopping = False
        self._stop_event: anyio.Event | None = None
        self._server: HttpServer | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The bound port, once ``run`` has called ``ready.set()``."""
        if self._port is None:
            raise RuntimeError(f"the {self.name} is not listening yet")
        return self._port

    def _make_server(self) -> HttpServer:
        raise NotImplementedError

    def _started(self, port: int) -> None:
        """Called once listening (log the start)."""

    def _stopped(self, server: HttpServer, drained: bool) -> None:
        """Called after the drain (log the stop)."""

    async def run(self, ready: ReadySignal) -> None:
        """Listen; on :meth:`request_stop`, refuse new work and drain requests in flight.

        Raises:
          ListenError: the port is in use or not permitted (a user error: the supervisor
            does not restart an actor that fails so at start-up).
        """
        self._stop_event = anyio.Event()
        if self._stopping:
            return
        server = self._server = self._make_server()
        bind_error: OSError | None = None
        async with anyio.create_task_group() as tg:
            try:
                self._port = await tg.start(server.serve, self._host, self._bind_port)
            except OSError as exc:
                bind_error = exc  # raised below, outside the task group (not wrapped by it)
            else:
                self._started(self._port)
                ready.set()
                await self._stop_event.wait()
                server.stop_accepting()
                drained = await server.drain(self._drain_timeout)
                self._stopped(server, drained)
            tg.cancel_scope.cancel()
        if bind_error is not None:
            raise ListenError(self._where, self._host, self._bind_port, bind_error) from bind_error

    def request_stop(self) -> None:
        """Stop accepting; requests arriving on open connections are answered and closed."""
        self._stopping = True
        if self._server is not None:
            self._server.stop_accepting()
        if self._stop_event is not None:
            self._stop_event.set()
