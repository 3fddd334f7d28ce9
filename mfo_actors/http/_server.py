"""The HTTP/1.1 server core: httptools' parser over anyio TCP sockets, one task per connection.

The core is split by job: this module accepts connections and keeps the server's state
(connection cap, timeouts, stop and drain); ``_connection.py`` serves one connection;
``_parser.py`` reads requests (httptools); ``_writer.py`` writes responses; ``_limits.py``
holds the limits and the errors the core answers itself; ``_stream.py`` the socket's flow
control.

Design, and why:

* **One task per connection, none per request.** Requests on a connection are handled one at
  a time, in order (pipelined requests wait, parsed, until the previous response is sent),
  and the handler runs in the connection's task. A response's head and body are written with
  one ``send``.
* **Limits are totals, not per-recv.** The head must arrive within ``header_timeout`` of its
  first byte (of the accept, for a connection's first request), the body within
  ``body_timeout`` of the head, so a client trickling one byte a second (slowloris) is cut off.
  An idle keep-alive connection is closed after ``keepalive_timeout``. Each connection keeps
  one deadline for its current phase; one sweeper task per server enforces them all.
* **Size limits before reading.** The head is capped at ``max_header_size`` (431), the header
  count at ``max_headers`` (431). A body whose ``Content-Length`` exceeds the limit is refused
  with 413 before reading it; a chunked body is counted as it streams and refused the moment
  it passes the limit. After an error the connection is closed with a short "lingering close"
  (half-close, then discard what the client still sends) so that the client reads our answer
  instead of a TCP reset.
* **Max connections.** At ``max_connections`` a new connection evicts the longest-waiting
  connection that is not in a request (idle keep-alive, or connected without sending a byte
  yet), so idle connections cannot lock out a health probe. When every connection is busy
  the newcomer is answered ``503`` with ``Retry-After: 1`` and ``Connection: close`` at once
  and closed (the request is not read), instead of hanging in the SYN backlog.
* **Backpressure and hostile peers.** The socket is read only when the server needs the next
  bytes (:class:`~mfo_actors.http._stream.ConnectionStream`): a client that pipelines without
  reading our answers, or streams a body we refused, is held back by TCP flow control, not
  buffered. A connection task never raises: whatever a reset does to the transport while we
  answer or close, only that connection ends.
* **Framing.** Only HTTP/1.0 and 1.1 (others: 505). A request with both ``Content-Length``
  and ``Transfer-Encoding`` is framed by the latter and its connection is closed after the
  answer (RFC 9112 section 6.1: the pair is how requests are smuggled past proxies). An
  absolute-form target (``POST http://host/path``) is routed by its path (section 3.2.2).
  See ``_parser.py`` for the rest (Host, Upgrade, HTTP/1.0).
* **TLS** (optional): each accepted connection is wrapped with anyio's ``TLSStream`` in its
  own task, the handshake within ``header_timeout``; the context is asked for per connection,
  so a certificate replaced on reload serves the next connection and open ones keep theirs.
* **Graceful stop.** :meth:`HttpServer.stop_accepting` closes the listening sockets, closes
  idle keep-alive connections and makes every later response carry ``Connection: close``;
  :meth:`HttpServer.drain` waits for in-flight requests.

Errors the core answers itself carry a JSON body ``{"error": "..."}``: 400 (malformed
request), 408 (body too slow), 413, 431, 500 (the handler raised; logged), 501 (a transfer
coding other than chunked), 503 (too many connections), 505 (not HTTP/1.x).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from time import monotonic

import anyio
import anyio.abc

from mfo_actors.http._connection import IDLE, NO_DEADLINE, WAITING, HttpConnection
from mfo_actors.http._limits import REJECT_SEND_TIMEOUT, HttpLimits
from mfo_actors.http._stream import CONNECTION_GONE, ConnectionStream
from mfo_actors.http._types import Handler, HeadCheck
from mfo_actors.observability import get_logger

__all__ = ["HttpServer", "serve_http"]

log = get_logger("mfo_actors.http")

# The sweeper looks at deadlines this often: a tenth of the shortest timeout (a timeout fires
# at most 10% late), within these bounds.
SWEEP_MIN = 0.02
SWEEP_MAX = 1.0

_BUSY_BODY = b'{"error":"too many connections"}'
_BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"retry-after: 1\r\nconnection: close\r\ncontent-length: "
    + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY
)


class HttpServer:
    """An HTTP/1.1 server calling ``handler(Request) -> Response`` for each request.

    Args:
      handler: Called once per request, in the connection's task. An exception becomes a
        500 JSON answer and is logged.
      limits: Sizes, timeouts and the connection cap.
      head_check: Called with the head before the body is read; may answer at once (a
        :class:`Response`: 404, 405, 401...) or return the body size limit for this request.
      tls: Called for each new connection: the ``SSLContext`` to serve it with (HTTPS), or
        ``None`` for plain HTTP.

    Usage::

        server = HttpServer(handler)
        async with anyio.create_task_group() as tg:
            port = await tg.start(server.serve, "127.0.0.1", 0)
            ...
            server.stop_accepting()
            await server.drain(10.0)
            tg.cancel_scope.cancel()
    """

    def __init__(
        self,
        handler: Handler,
        *,
        limits: HttpLimits = HttpLimits(),
        head_check: HeadCheck | None = None,
        tls: Callable[[], ssl.SSLContext | None] | None = None,
    ) -> None:
        self.handler = handler
        self.head_check = head_check
        self._limits = limits
        self._tls = tls
        self._port: int | None = None
        self._stopping = False
        self._accept_scopes: list[anyio.CancelScope] = []
        self._sweeper = anyio.CancelScope()
        self._conns: set[HttpConnection] = set()
        self._evicting = 0  # evicted connections still closing
        self._in_flight = 0
        self._idle_event: anyio.Event | None = None

    # -- public state ------------------------------------------------------------------------
    @property
    def port(self) -> int:
        """The bound port (useful when serving on port 0)."""
        if self._port is None:
            raise RuntimeError("the server is not listening yet")
        return self._port

    @property
    def active_connections(self) -> int:
        """Open client connections."""
        return len(self._conns)

    @property
    def in_flight(self) -> int:
        """Requests whose response is not yet fully sent."""
        return self._in_flight

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop_accepting` was called."""
        return self._stopping

    @property
    def limits(self) -> HttpLimits:
        """The limits in force (connections read them per request)."""
        return self._limits

    def update_limits(self, limits: HttpLimits) -> None:
        """Serve with *limits* from now on (a reload): a connection reads them each time it
        starts waiting for a request, so an idle keep-alive connection applies them from the
        request after the one it is already waiting for."""
        self._limits = limits

    # -- for the connections -----------------------------------------------------------------
    def tls_context(self) -> ssl.SSLContext | None:
        """The TLS context for a new connection, or None (plain HTTP)."""
        return self._tls() if self._tls is not None else None

    def request_started(self) -> None:
        self._in_flight += 1

    def request_done(self) -> None:
        self._in_flight -= 1
        self._wake_drain()

    def _wake_drain(self) -> None:
        if self._idle_event is not None and not self._in_flight and not self._conns:
            self._idle_event.set()

    # -- lifecycle ---------------------------------------------------------------------------
    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on *host*:*port* and serve until cancelled.

        Calls ``task_status.started(bound_port)`` once listening. After
        :meth:`stop_accepting`, returns when every connection has closed.
        """
        multi = await anyio.create_tcp_listener(local_host=host, local_port=port)
        listeners = [sub for sub in multi.listeners if isinstance(sub, anyio.abc.SocketListener)]
        try:
            self._port = int(listeners[0].extra(anyio.abc.SocketAttribute.local_port))
            async with anyio.create_task_group() as tg:
                for sub in listeners:
                    scope = anyio.CancelScope()
                    self._accept_scopes.append(scope)
                    tg.start_soon(self._accept_loop, sub, scope, tg)
                tg.start_soon(self._sweep)
                if self._stopping:  # stop_accepting() ran before we were listening
                    self.stop_accepting()
                task_status.started(self._port)
        finally:
            with anyio.CancelScope(shield=True):
                await multi.aclose()

    def stop_accepting(self) -> None:
        """Close the listening sockets and idle connections; later responses close theirs."""
        self._stopping = True
        for scope in self._accept_scopes:
            scope.cancel()
        for conn in list(self._conns):
            if conn.phase == IDLE:
                conn.expire()
        if not self._conns:
            self._sweeper.cancel()  # nothing left to time out: let serve() return

    async def drain(self, timeout: float) -> bool:  # noqa: ASYNC109 (the contract's name)
        """Wait up to *timeout* seconds for in-flight requests and their connections.

        Call after :meth:`stop_accepting`: idle connections are closed at once, busy ones
        after their current response (a head arriving meanwhile is answered by the handler,
        which can see :attr:`stopping`). Returns True if every connection has closed.
        """
        with anyio.move_on_after(timeout):
            while self._in_flight or self._conns:
                self._idle_event = anyio.Event()
                await self._idle_event.wait()
        return not self._in_flight and not self._conns

    # -- deadlines ---------------------------------------------------------------------------
    async def _sweep(self) -> None:
        """Expire connections whose phase deadline has passed (until stopped and empty)."""
        with self._sweeper:
            while True:
                limits = self._limits
                shortest = min(limits.header_timeout, limits.body_timeout,
                               limits.keepalive_timeout)
                await anyio.sleep(min(SWEEP_MAX, max(SWEEP_MIN, shortest / 10)))
                now = monotonic()
                for conn in self._conns:
                    if conn.deadline <= now and conn.phase not in NO_DEADLINE:
                        conn.expire()

    # -- accepting ---------------------------------------------------------------------------
    async def _accept_loop(
        self,
        listener: anyio.abc.SocketListener,
        scope: anyio.CancelScope,
        tg: anyio.abc.TaskGroup,
    ) -> None:
        with scope:
            try:
                while True:
                    try:
                        stream = await listener.accept()
                    except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                        return
                    except OSError as exc:  # EMFILE and friends: back off, keep serving
                        log.warning("http.accept_failed", error=repr(exc))
                        await anyio.sleep(0.1)
                        continue
                    if (len(self._conns) - self._evicting >= self._limits.max_connections
                            and not self._evict_one()):
                        await self._refuse(stream)
                        continue
                    conn = HttpConnection(self, stream)
                    self._conns.add(conn)
                    tg.start_soon(self._connection, conn)
            finally:
                with anyio.CancelScope(shield=True):
                    await listener.aclose()

    async def _connection(self, conn: HttpConnection) -> None:
        try:
            await conn.run()
        finally:
            self._conns.discard(conn)
            if conn.evicted:
                self._evicting -= 1
            if self._stopping and not self._conns:
                self._sweeper.cancel()  # nothing left to time out: let serve() return
            self._wake_drain()

    def _evict_one(self) -> bool:
        """Close the connection that has waited longest without a request in progress."""
        waiting = [c for c in self._conns if c.phase in WAITING and not c.evicted]
        if not waiting:
            return False
        victim = min(waiting, key=lambda c: c.since)
        victim.evicted = True
        self._evicting += 1
        victim.expire()
        return True

    async def _refuse(self, stream: anyio.abc.ByteStream) -> None:
        """Answer 503 to a connection beyond ``max_connections`` and close it."""
        conn = ConnectionStream(stream)
        try:
            with anyio.move_on_after(REJECT_SEND_TIMEOUT):
                await conn.send(_BUSY_RESPONSE)
        except CONNECTION_GONE:
            pass
        finally:
            await conn.aclose()


async def serve_http(
    handler: Handler,
    *,
    host: str,
    port: int,
    limits: HttpLimits = HttpLimits(),
    head_check: HeadCheck | None = None,
    tls: ssl.SSLContext | None = None,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve *handler* on *host*:*port* until cancelled (see :class:`HttpServer`).

    Calls ``task_status.started(bound_port)`` once listening, so
    ``port = await tg.start(functools.partial(serve_http, handler, host=h, port=0))`` works.
    """
    server = HttpServer(handler, limits=limits, head_check=head_check,
                        tls=None if tls is None else (lambda: tls))
    await server.serve(host, port, task_status=task_status)
