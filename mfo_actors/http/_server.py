"""The HTTP/1.1 server core: h11 over anyio TCP sockets, one task per connection.

Design, and why:

* **One task per connection, none per request.** Requests on a connection are handled one at
  a time, in order (h11 buffers pipelined requests until the previous response is sent), and
  the handler runs in the connection's task. A response's head, body and end are written with
  one ``send``.
* **Limits are totals, not per-recv.** The head must arrive within ``header_timeout`` of its
  first byte (of the accept, for a connection's first request), the body within
  ``body_timeout`` of the head, so a client trickling one byte a second (slowloris) is cut off.
  An idle keep-alive connection is closed after ``keepalive_timeout``.
* **Size limits before reading.** The head is capped by h11's ``max_incomplete_event_size``
  (431), the header count by ``max_headers`` (431). A body whose ``Content-Length`` exceeds the
  limit is refused with 413 before reading it; a chunked body is counted as it streams and
  refused the moment it passes the limit. After an error the connection is closed with a short
  "lingering close" (half-close, then discard what the client still sends) so that the client
  reads our answer instead of a TCP reset.
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
* **TLS** (optional): each accepted connection is wrapped with anyio's ``TLSStream`` in its
  own task, the handshake within ``header_timeout``; the context is asked for per connection,
  so a certificate replaced on reload serves the next connection and open ones keep theirs.
* **Graceful stop.** :meth:`HttpServer.stop_accepting` closes the listening sockets, closes
  idle keep-alive connections and makes every later response carry ``Connection: close``;
  :meth:`HttpServer.drain` waits for in-flight requests.

Errors the core answers itself carry a JSON body ``{"error": "..."}``: 400 (malformed request,
h11's ``RemoteProtocolError``), 408 (body too slow), 413, 431, 500 (the handler raised; logged),
503 (too many connections), 505 (not HTTP/1.x).
"""

from __future__ import annotations

import re
import ssl
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass
from http import HTTPStatus

import anyio
import anyio.abc
import h11
import msgspec
from anyio.streams.tls import TLSStream

from mfo_actors.http._stream import CONNECTION_GONE, ConnectionStream
from mfo_actors.http._types import Handler, HeadCheck, Request, RequestHead, Response
from mfo_actors.observability import get_logger

__all__ = ["HttpLimits", "HttpServer", "serve_http"]

log = get_logger("mfo_actors.http")

RECEIVE_SIZE = 65536  # bytes per recv; a typical webhook (head + body) arrives in one
LINGER_TIMEOUT = 2.0  # seconds to discard a refused body so the client reads our error answer
# ... and at most this much of it: Go's net/http discards at most 256 KiB of an unread body
# before closing. Every byte drained is memory churn, and ten clients streaming bodies at a
# refused path at once must not cost the daemon tens of MB.
LINGER_MAX_BYTES = 256 * 1024
REJECT_SEND_TIMEOUT = 0.5  # seconds to write the over-capacity 503 before giving up

_REASONS: dict[int, bytes] = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}
_JSON = b"application/json"
_encode_json = msgspec.json.Encoder().encode


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Limits of one server; defaults follow common servers (nginx, Go's net/http, h11)."""

    max_header_size: int = 16 * 1024  # request line + headers; h11's own default
    max_headers: int = 100  # as Go's net/http and nginx allow
    max_body_size: int = 1024 * 1024  # default per-request body limit (a HeadCheck may change it)
    header_timeout: float = 10.0  # whole head, from its first byte (slowloris guard)
    body_timeout: float = 30.0  # whole body, from the end of the head; also caps each write
    keepalive_timeout: float = 75.0  # idle time between requests (nginx's default)
    max_connections: int = 1024  # open connections; more are answered 503 and closed


def error_response(status: int, message: str, *, headers: list[tuple[str, str]] | None = None
                   ) -> Response:
    """A small JSON error response ``{"error": message}``."""
    return Response(
        status,
        [("content-type", "application/json"), *(headers or [])],
        _encode_json({"error": message}),
    )


_BUSY_BODY = b'{"error":"too many connections"}'
_BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"retry-after: 1\r\nconnection: close\r\ncontent-length: "
    + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY
)


class _Timeout(Exception):
    """A read did not complete within its total time limit."""


class _ConnState:
    """What :meth:`HttpServer.stop_accepting` and eviction need to know about one connection."""

    __slots__ = ("evicted", "idle", "wait_scope", "wait_since")

    def __init__(self) -> None:
        # Set while waiting for a request that has not sent a byte yet: cancelling it closes
        # the connection. ``idle``: between keep-alive requests (else: before the first).
        self.wait_scope: anyio.CancelScope | None = None
        self.wait_since = 0.0
        self.idle = False
        self.evicted = False


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
        self._handler = handler
        self._limits = limits
        self._head_check = head_check
        self._tls = tls
        self._port: int | None = None
        self._stopping = False
        self._accept_scopes: list[anyio.CancelScope] = []
        self._conns: set[_ConnState] = set()
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

    def update_limits(self, limits: HttpLimits) -> None:
        """Serve with *limits* from now on (a reload): each connection reads them per request."""
        self._limits = limits

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
                if self._stopping:  # stop_accepting() ran before we were listening
                    for scope in self._accept_scopes:
                        scope.cancel()
                task_status.started(self._port)
        finally:
            with anyio.CancelScope(shield=True):
                await multi.aclose()

    def stop_accepting(self) -> None:
        """Close the listening sockets and idle connections; later responses close theirs."""
        self._stopping = True
        for scope in self._accept_scopes:
            scope.cancel()
        for state in list(self._conns):
            if state.idle and state.wait_scope is not None:
                state.wait_scope.cancel()

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
                    state = _ConnState()
                    self._conns.add(state)
                    tg.start_soon(self._connection, stream, state)
            finally:
                with anyio.CancelScope(shield=True):
                    await listener.aclose()

    def _evict_one(self) -> bool:
        """Close the connection that has waited longest without a request in progress."""
        waiting = [s for s in self._conns if s.wait_scope is not None and not s.evicted]
        if not waiting:
            return False
        victim = min(waiting, key=lambda s: s.wait_since)
        victim.evicted = True
        self._evicting += 1
        assert victim.wait_scope is not None
        victim.wait_scope.cancel()
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

    # -- one connection ----------------------------------------------------------------------
    async def _connection(self, raw: anyio.abc.ByteStream, state: _ConnState) -> None:
        """Serve one connection; never raises (but for cancellation): a hostile or broken
        peer ends its own connection, never the server."""
        stream = ConnectionStream(raw)
        try:
            linger = False
            try:
                context = self._tls() if self._tls is not None else None
                if context is not None:
                    stream = ConnectionStream(await self._handshake(raw, context))
                linger = await self._serve_connection(stream, state)
            except (_Timeout, *CONNECTION_GONE):
                pass
            except Exception as exc:  # a bug in the core: log it, drop only this connection
                log.error("http.connection_failed", error=repr(exc), exc_info=True)
            if linger:  # not shielded: a cancellation (shutdown deadline) cuts it short
                await _linger(stream)
        except Exception as exc:  # the close itself failed: the peer is gone either way
            log.debug("http.close_failed", error=repr(exc))
        finally:
            await stream.aclose()
            self._conns.discard(state)
            if state.evicted:
                self._evicting -= 1
            self._wake_drain()

    async def _handshake(
        self, stream: anyio.abc.ByteStream, context: ssl.SSLContext
    ) -> anyio.abc.ByteStream:
        """The TLS server handshake within ``header_timeout``; raises _Timeout, or OSError
        (``ssl.SSLError``) / BrokenResourceError for a client that does not speak TLS."""
        with anyio.move_on_after(self._limits.header_timeout):
            # standard_compatible=False: HTTP frames its own messages, so a client closing
            # without TLS close_notify is no error (as anyio's TLSListener does for HTTP).
            return await TLSStream.wrap(stream, server_side=True, ssl_context=context,
                                        standard_compatible=False)
        raise _Timeout

    async def _serve_connection(self, stream: ConnectionStream, state: _ConnState) -> bool:
        """Serve requests until the connection ends; return True to close it lingering."""
        limits = self._limits
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_size)
        try:
            client = stream.extra(anyio.abc.SocketAttribute.remote_address)
            peer: tuple[str, int] | None = (str(client[0]), int(client[1]))
        except (anyio.TypedAttributeLookupError, IndexError, TypeError):
            peer = None
        first = True
        while True:
            # ---- the head: idle wait (keep-alive), then the header time limit
            try:
                event = await self._read_head(stream, conn, state, first)
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint if exc.error_status_hint >= 400 else 400
                await self._send_simple(stream, conn, error_response(status, str(exc)))
                return True
            except _Timeout:
                return False
            if event is None or isinstance(event, h11.ConnectionClosed):
                return False
            first = False
            assert isinstance(event, h11.Request)
            if event.http_version not in (b"1.1", b"1.0"):
                await self._send_simple(stream, conn, error_response(
                    505, "only HTTP/1.0 and HTTP/1.1 are supported"))
                return True
            if len(event.headers) > limits.max_headers:
                await self._send_simple(stream, conn, error_response(
                    431, f"more than {limits.max_headers} headers"))
                return True
            # h11 caps only a head that arrives in pieces; one read can hold a whole big head.
            head_size = len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers)
            if head_size > limits.max_header_size:
                await self._send_simple(stream, conn, error_response(
                    431, f"request head larger than {limits.max_header_size} bytes"))
                return True
            head = _make_head(event, peer)
            # RFC 9112 section 6.1: framed by Transfer-Encoding (h11 does), then closed.
            smuggling = "transfer-encoding" in head.headers and "content-length" in head.headers

            # ---- decide on the body before reading it
            limit = limits.max_body_size
            if self._head_check is not None:
                checked = self._head_check(head)
                if isinstance(checked, Response):
                    # A request without a body can stay keep-alive: h11 has its end already.
                    skip_body = conn.their_state is h11.SEND_BODY and (
                        "transfer-encoding" in head.headers
                        or head.headers.get("content-length", "0") != "0"
                        or not isinstance(conn.next_event(), h11.EndOfMessage)
                    )
                    skip_body = skip_body or smuggling
                    self._in_flight += 1
                    try:
                        await self._send(stream, conn, head, checked, close=skip_body)
                    finally:
                        self._request_done()
                    if skip_body or conn.our_state is not h11.DONE:
                        return skip_body
                    conn.start_next_cycle()
                    continue
                limit = checked
            length = head.headers.get("content-length")
            if length is not None and int(length) > limit:
                await self._send_simple(stream, conn, error_response(
                    413, f"body larger than {limit} bytes"))
                return True

            # ---- the body, within body_timeout in total
            self._in_flight += 1
            try:
                if conn.their_state is h11.SEND_BODY:
                    try:
                        body = await self._read_body(stream, conn, limit)
                    except _Timeout:
                        await self._send_simple(stream, conn, error_response(
                            408, f"body not received within {limits.body_timeout:g}s"))
                        return True
                    except h11.RemoteProtocolError as exc:
                        await self._send_simple(stream, conn, error_response(400, str(exc)))
                        return True
                    if body is None:
                        await self._send_simple(stream, conn, error_response(
                            413, f"body larger than {limit} bytes"))
                        return True
                else:
                    body = b""

                # ---- the handler, in this task
                try:
                    response = await self._handler(Request(head, body))
                except Exception as exc:
                    log.error("http.handler_failed", method=head.method, path=head.path,
                              error=repr(exc), exc_info=True)
                    response = error_response(500, "internal server error")
                await self._send(stream, conn, head, response, close=smuggling)
            finally:
                self._request_done()
            if smuggling:
                return True
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
            else:
                return False

    def _request_done(self) -> None:
        self._in_flight -= 1
        self._wake_drain()

    def _wake_drain(self) -> None:
        if self._idle_event is not None and not self._in_flight and not self._conns:
            self._idle_event.set()

    async def _read_head(
        self,
        stream: ConnectionStream,
        conn: h11.Connection,
        state: _ConnState,
        first: bool,
    ) -> h11.Request | h11.ConnectionClosed | None:
        """The next request head; None when the connection should close quietly."""
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event  # type: ignore[return-value]  # pipelined: already buffered
        limits = self._limits
        # Waiting: nothing of the next request has arrived (evictable; idle: keep-alive).
        waiting = not conn.trailing_data[0]
        idle = waiting and not first
        now = anyio.current_time()
        deadline = now + (limits.keepalive_timeout if idle else limits.header_timeout)
        while True:
            if idle and self._stopping:
                return None
            scope = anyio.CancelScope(deadline=deadline)
            if waiting:
                state.wait_scope, state.wait_since, state.idle = scope, now, idle
            try:
                with scope:
                    data = await stream.receive(RECEIVE_SIZE)
            except anyio.EndOfStream:
                data = b""
            finally:
                state.wait_scope = None
            if scope.cancelled_caught:
                if idle or state.evicted:
                    return None
                raise _Timeout
            if waiting:
                waiting = False
                if idle:
                    idle = False
                    deadline = anyio.current_time() + limits.header_timeout
            conn.receive_data(data)
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]

    async def _read_body(
        self, stream: ConnectionStream, conn: h11.Connection, limit: int
    ) -> bytes | None:
        """The whole body; None when it passes *limit* bytes."""
        if conn.they_are_waiting_for_100_continue:
            await stream.send(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        chunks: list[bytes] = []
        size = 0
        deadline: float | None = None
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if deadline is None:
                    deadline = anyio.current_time() + self._limits.body_timeout
                with anyio.CancelScope(deadline=deadline) as scope:
                    try:
                        data = await stream.receive(RECEIVE_SIZE)
                    except anyio.EndOfStream:
                        data = b""
                if scope.cancelled_caught:
                    raise _Timeout
                conn.receive_data(data)
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:
                    return None
                chunks.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                if len(chunks) == 1:
                    return bytes(chunks[0])
                return b"".join(chunks)
            else:  # ConnectionClosed mid-body
                raise anyio.BrokenResourceError

    async def _send_simple(
        self, stream: ConnectionStream, conn: h11.Connection, response: Response
    ) -> None:
        """Send an error answer of the core, closing the connection afterwards."""
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        try:
            await self._send(stream, conn, None, response, close=True)
        except h11.LocalProtocolError:
            pass

    async def _send(
        self,
        stream: ConnectionStream,
        conn: h11.Connection,
        head: RequestHead | None,
        response: Response,
        *,
        close: bool,
    ) -> None:
        headers: list[tuple[bytes, bytes]] = []
        has_length = False
        try:
            for pair in response.headers:
                encoded = _HEADER_CACHE.get(pair) or _encode_header(pair)
                if encoded[0] == b"content-length":
                    has_length = True
                headers.append(encoded)
        except h11.LocalProtocolError as exc:
            log.error("http.bad_response_header", error=str(exc))
            await self._send(stream, conn, head, error_response(500, "internal server error"),
                             close=close)
            return
        if close or self._stopping:
            headers.append((b"connection", b"close"))
        status = response.status
        if response.stream is not None:
            await self._send_stream(stream, conn, status, headers, response.stream)
            return
        body = response.body
        if not has_length:
            headers.append((b"content-length", str(len(body)).encode("ascii")))
        # _parsed=True: the headers were validated by _encode_header (once per distinct
        # header), so h11 need not run its regexes again on every response.
        data = conn.send(h11.Response(status_code=status, headers=headers,
                                      reason=_REASONS.get(status, b""), _parsed=True))
        assert data is not None
        if body and (head is None or head.method != "HEAD"):
            more = conn.send(h11.Data(data=body))
            assert more is not None
            data += more
        end = conn.send(h11.EndOfMessage())
        assert end is not None
        data += end
        with anyio.CancelScope(deadline=anyio.current_time() + self._limits.body_timeout) as scope:
            await stream.send(data)
        if scope.cancelled_caught:
            raise _Timeout

    async def _send_stream(
        self,
        stream: ConnectionStream,
        conn: h11.Connection,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: AsyncIterable[bytes],
    ) -> None:
        """Send a chunked response, stopping when the client goes away."""
        data = conn.send(h11.Response(status_code=status, headers=headers,
                                      reason=_REASONS.get(status, b"")))
        assert data is not None
        gone = False

        async def watch(scope: anyio.CancelScope) -> None:
            # A client that closes its side mid-stream (EOF or reset) ends the stream at once
            # instead of at the next write; pipelined bytes are kept for h11.
            # Bytes kept are capped (one head's worth): past that, reading stops and TCP flow
            # control holds the client back, instead of the buffer growing without bound.
            nonlocal gone
            kept = 0
            while kept <= self._limits.max_header_size:
                try:
                    more = await stream.receive(RECEIVE_SIZE)
                except CONNECTION_GONE:
                    gone = True
                    scope.cancel()
                    return
                kept += len(more)
                conn.receive_data(more)

        async with anyio.create_task_group() as tg:
            await stream.send(data)
            tg.start_soon(watch, tg.cancel_scope)
            try:
                async for chunk in body:
                    if chunk:
                        out = conn.send(h11.Data(data=chunk))
                        assert out is not None
                        await _send_within(stream, out, self._limits.body_timeout)
                if not gone:
                    end = conn.send(h11.EndOfMessage())
                    assert end is not None
                    await _send_within(stream, end, self._limits.body_timeout)
            finally:
                aclose = getattr(body, "aclose", None)
                if aclose is not None:
                    with anyio.CancelScope(shield=True):
                        await aclose()
            tg.cancel_scope.cancel()
        if gone:
            raise anyio.BrokenResourceError


async def _send_within(stream: ConnectionStream, data: bytes, seconds: float) -> None:
    with anyio.move_on_after(seconds) as scope:
        await stream.send(data)
    if scope.cancelled_caught:
        raise _Timeout


async def _linger(stream: ConnectionStream) -> None:
    """Half-close, then discard what the client still sends, so it reads our answer.

    Closing a socket with unread input makes the kernel send a reset, and a client still
    writing its (refused) body may then never see our 413. At most ``LINGER_MAX_BYTES`` are
    read, for at most ``LINGER_TIMEOUT``; a client that is still sending then gets the reset.
    """
    try:
        await stream.send_eof()
        received = 0
        with anyio.move_on_after(LINGER_TIMEOUT):
            while received < LINGER_MAX_BYTES:
                received += len(await stream.receive(RECEIVE_SIZE))
    except CONNECTION_GONE:
        pass


_HEADER_NAME = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-z]+")  # RFC 9110 token, lower-cased
_HEADER_VALUE = re.compile(rb"[^\x00-\x08\x0a-\x1f\x7f]*")  # no CR, LF, NUL or other CTLs
_HEADER_CACHE: dict[tuple[str, str], tuple[bytes, bytes]] = {}
_ABSOLUTE = re.compile(rb"(?i)https?://")
_HEADER_CACHE_MAX = 4096  # distinct (name, value) pairs remembered as valid


def _encode_header(pair: tuple[str, str]) -> tuple[bytes, bytes]:
    """Validate and encode one response header (what h11 would check on every send)."""
    name = pair[0].lower().encode("latin-1")
    value = pair[1].strip().encode("latin-1")
    if not _HEADER_NAME.fullmatch(name):
        raise h11.LocalProtocolError(f"illegal header name {pair[0]!r}")
    if not _HEADER_VALUE.fullmatch(value):
        raise h11.LocalProtocolError(f"illegal header value for {pair[0]!r}")
    encoded = (name, value)
    if len(_HEADER_CACHE) >= _HEADER_CACHE_MAX:
        _HEADER_CACHE.clear()
    _HEADER_CACHE[pair] = encoded
    return encoded


def _make_head(event: h11.Request, peer: tuple[str, int] | None) -> RequestHead:
    target = event.target
    if not target.startswith(b"/") and _ABSOLUTE.match(target):
        # absolute-form (RFC 9112 section 3.2.2): route by the path; the host is ours anyway
        rest = target.split(b"://", 1)[1]
        cut = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
        target = rest[cut:] or b"/"
        if target.startswith(b"?"):
            target = b"/" + target
    path, _, query = target.partition(b"?")
    raw = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in event.headers]
    return RequestHead(
        method=event.method.decode("ascii"),
        path=path.decode("latin-1"),
        query=query.decode("latin-1"),
        headers=dict(raw),
        raw_headers=raw,
        client=peer,
    )


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
