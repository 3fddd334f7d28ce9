"""One connection's life: the TLS handshake, its requests one after another, the close.

**One deadline per connection.** A connection is always in one phase: waiting for its first
request, idle between requests (keep-alive), reading a head, reading a body, in the
handler, or writing. Each phase but the handler's has a deadline, kept as a plain number on
the connection (:attr:`HttpConnection.deadline`, ``time.monotonic()`` seconds: a tenth of
``anyio.current_time()``'s cost, and only the sweeper compares them); the server's sweeper
(:meth:`~mfo_actors.http.HttpServer.serve`) cancels the connection's one cancel scope when
it passes. Moving to the next phase is an assignment, not a new cancel scope: a scope per
read cost ~7 µs on uvloop and ~14 µs on trio, twice or more per request. The price is
precision: a timeout fires within the sweeper's interval after its deadline (a tenth of
the shortest timeout, at most one second).

After a wait, a connection whose scope was cancelled meanwhile (deadline, eviction, stop)
stops before doing anything else: a request is never half-served because its data and
its cancellation arrived together.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterable
from time import monotonic
from typing import TYPE_CHECKING

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.streams.tls import TLSStream

from mfo_actors.http._limits import (
    LINGER_MAX_BYTES,
    LINGER_TIMEOUT,
    RECEIVE_SIZE,
    HttpError,
    error_response,
)
from mfo_actors.http._parser import END, NEED_DATA, Event, ParsedHead, RequestParser
from mfo_actors.http._stream import CONNECTION_GONE, ConnectionStream
from mfo_actors.http._types import Request, Response
from mfo_actors.http._writer import (
    CHUNKED_END,
    CONTINUE,
    InvalidHeader,
    chunk,
    encode_response,
    encode_stream_head,
)
from mfo_actors.observability import get_logger

if TYPE_CHECKING:
    from mfo_actors.http._server import HttpServer

__all__ = ["HANDLER", "WAITING", "HttpConnection"]

log = get_logger("mfo_actors.http")

# Phases (see the module docstring); FIRST and IDLE are "waiting": no byte of a request yet.
FIRST, IDLE, HEAD, BODY, HANDLER, SEND, HANDSHAKE, CLOSING = range(8)
WAITING = (FIRST, IDLE)
NO_DEADLINE = (HANDLER, HANDSHAKE, CLOSING)  # the sweeper leaves these alone
# Requests answered from one read without waiting, before yielding to other tasks once.
FAIR_BURST = 32


class _Expired(Exception):
    """The connection's scope was cancelled while a wait returned: stop here."""


class _Timeout(Exception):
    """The TLS handshake did not finish in time."""


class HttpConnection:
    """One accepted connection, served by :meth:`run` in its own task.

    The server reads :attr:`phase`, :attr:`deadline` and :attr:`since` (for the sweeper and
    eviction) and calls :meth:`expire`.
    """

    __slots__ = ("_raw", "deadline", "evicted", "phase", "scope", "server", "since", "stream")

    def __init__(self, server: HttpServer, raw: anyio.abc.ByteStream) -> None:
        now = monotonic()
        self.server = server
        self._raw = raw
        self.stream = ConnectionStream(raw)
        self.scope = anyio.CancelScope()
        self.phase = FIRST
        self.since = now  # when the current wait for a request began (eviction order)
        self.deadline = now + server.limits.header_timeout
        self.evicted = False

    def expire(self) -> None:
        """End the connection at its next wait (deadline passed, evicted, or stopping)."""
        self.scope.cancel()

    async def run(self) -> None:
        """Serve until the connection ends; never raises (but for cancellation): a hostile
        or broken peer ends its own connection, never the server."""
        try:
            linger = False
            try:
                tls = self.server.tls_context()
                if tls is not None:
                    self.phase = HANDSHAKE
                    self.stream = ConnectionStream(await self._handshake(tls))
                    self.phase = FIRST
                    self.deadline = monotonic() + self.server.limits.header_timeout
                linger = await self._serve()
            except (_Timeout, *CONNECTION_GONE):
                pass
            except Exception as exc:  # a bug in the core: log it, drop only this connection
                log.error("http.connection_failed", error=repr(exc), exc_info=True)
            self.phase = CLOSING
            if linger:  # not shielded: a cancellation (shutdown deadline) cuts it short
                await _linger(self.stream)
        except Exception as exc:  # the close itself failed: the peer is gone either way
            log.debug("http.close_failed", error=repr(exc))
        finally:
            self.phase = CLOSING
            await self.stream.aclose()

    async def _handshake(self, context: ssl.SSLContext) -> anyio.abc.ByteStream:
        """The TLS server handshake within ``header_timeout``; raises _Timeout, or OSError
        (``ssl.SSLError``) / BrokenResourceError for a client that does not speak TLS."""
        with anyio.move_on_after(self.server.limits.header_timeout):
            # standard_compatible=False: HTTP frames its own messages, so a client closing
            # without TLS close_notify is no error (as anyio's TLSListener does for HTTP).
            return await TLSStream.wrap(self._raw, server_side=True, ssl_context=context,
                                        standard_compatible=False)
        raise _Timeout

    async def _serve(self) -> bool:
        """Serve requests; return True to close lingering."""
        try:
            with self.scope:
                return await self._requests()
        except _Expired:
            pass
        self.phase, phase = CLOSING, self.phase
        if phase == BODY:  # a body too slow: say so (headers or idle: just close)
            limits = self.server.limits
            with anyio.move_on_after(limits.body_timeout):
                await self._send_error(HttpError(
                    408, f"body not received within {limits.body_timeout:g}s"), deadline=False)
            return True
        return False

    def _peer(self) -> tuple[str, int] | None:
        try:
            client = self.stream.extra(anyio.abc.SocketAttribute.remote_address)
            return (str(client[0]), int(client[1]))
        except (anyio.TypedAttributeLookupError, IndexError, TypeError):
            return None

    # -- the request loop --------------------------------------------------------------------
    async def _requests(self) -> bool:
        server = self.server
        parser = RequestParser(server.limits, self._peer())
        first = True
        burst = 0
        while True:
            event: Event | None = parser.next_event()
            if event is NEED_DATA:
                burst = 0
                event = await self._next_head(parser, first)
                if event is None:
                    return False
            else:
                burst += 1
                if burst >= FAIR_BURST:  # pipelined requests: let other connections in
                    burst = 0
                    await anyio.lowlevel.checkpoint()
            first = False
            if isinstance(event, HttpError):
                await self._send_error(event)
                return True
            assert isinstance(event, ParsedHead), event
            close = await self._request(parser, event)
            if close is not None:
                return close

    async def _next_head(self, parser: RequestParser, first: bool) -> ParsedHead | HttpError | None:
        """Wait for the next request's head; None when the connection should close quietly."""
        server = self.server
        limits = parser.limits = server.limits
        if parser.waiting:
            if not first:
                if server.stopping:
                    return None
                now = monotonic()
                self.phase, self.since = IDLE, now
                self.deadline = now + limits.keepalive_timeout
            # (first: waiting since the accept, with the deadline set then)
        else:  # part of a pipelined head is here already
            self.phase = HEAD
            self.deadline = monotonic() + limits.header_timeout
        stream = self.stream
        while True:
            try:
                data = await stream.receive(RECEIVE_SIZE)
            except anyio.EndOfStream:
                data = b""
            if self.scope.cancel_called:
                raise _Expired
            if not data:
                if parser.waiting:
                    return None
                return HttpError(400, "the connection closed in the middle of a request head")
            if self.phase != HEAD:
                if self.phase == IDLE:  # the head's own time limit starts with its first byte
                    self.deadline = monotonic() + limits.header_timeout
                self.phase = HEAD
            parser.feed(data)
            event = parser.next_event()
            if event is not NEED_DATA:
                assert not isinstance(event, bytes)
                return event  # type: ignore[return-value]  # END cannot precede its head

    async def _request(self, parser: RequestParser, event: ParsedHead) -> bool | None:
        """Serve one request; None to go on, else whether to close lingering."""
        server = self.server
        head = event.head
        close = event.close_after or not event.keep_alive
        limit = server.limits.max_body_size
        if server.head_check is not None:
            checked = server.head_check(head)
            if isinstance(checked, Response):
                # A request without a body can stay keep-alive: its end is parsed already.
                server.request_started()
                try:
                    closed = await self._respond(parser, event, checked,
                                                 close=close or event.has_body)
                finally:
                    server.request_done()
                if event.has_body or event.close_after:
                    return True
                parser.next_event()  # its END
                return False if closed else None
            limit = checked
        length = head.headers.get("content-length")
        if length is not None and event.has_body and int(length) > limit:
            await self._send_error(HttpError(413, f"body larger than {limit} bytes"))
            return True
        server.request_started()
        try:
            if event.has_body:
                # the whole body came with its head (most requests): no awaits to take it
                whole = parser.whole_body(limit)
                try:
                    body = (whole if whole is not None
                            else await self._read_body(parser, event, limit))
                except HttpError as exc:
                    await self._send_error(exc)
                    return True
            else:
                parser.next_event()  # its END
                body = b""
            self.phase = HANDLER
            try:
                response = await server.handler(Request(head, body))
            except Exception as exc:
                log.error("http.handler_failed", method=head.method, path=head.path,
                          error=repr(exc), exc_info=True)
                response = error_response(500, "internal server error")
            closed = await self._respond(parser, event, response, close=close)
        finally:
            server.request_done()
        if closed:
            return event.close_after
        return None

    async def _read_body(self, parser: RequestParser, event: ParsedHead, limit: int) -> bytes:
        """The whole body.

        Raises:
          HttpError: 413 past *limit* bytes; 400 for a malformed (chunked) body, or one the
            client cut short by closing its side.
        """
        chunks: list[bytes] = []
        size = 0
        stream = self.stream
        if event.expect_continue and parser.waiting_for_body:
            self._start_body()
            await stream.send(CONTINUE)
        while True:
            piece = parser.next_event()
            if piece is NEED_DATA:
                if self.phase != BODY:
                    self._start_body()
                try:
                    data = await stream.receive(RECEIVE_SIZE)
                except anyio.EndOfStream:
                    # A half-close: the client can still read our answer (a reset raises
                    # BrokenResourceError, and nobody is left to answer).
                    raise HttpError(
                        400, "the connection closed in the middle of a request body") from None
                if self.scope.cancel_called:
                    raise _Expired
                parser.feed(data)
            elif type(piece) is bytes:
                size += len(piece)
                if size > limit:
                    raise HttpError(413, f"body larger than {limit} bytes")
                chunks.append(piece)
            elif piece is END:
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
            else:
                assert isinstance(piece, HttpError), piece
                raise piece

    def _start_body(self) -> None:
        self.phase = BODY
        self.deadline = monotonic() + self.server.limits.body_timeout

    # -- answers -----------------------------------------------------------------------------
    async def _respond(self, parser: RequestParser, event: ParsedHead, response: Response, *,
                       close: bool) -> bool:
        """Send *response*; returns whether the connection closes after it."""
        close = close or self.server.stopping
        if response.stream is not None:
            return await self._send_stream(parser, event, response, close=close)
        try:
            data = encode_response(response, head_only=event.head.method == "HEAD", close=close)
        except InvalidHeader as exc:
            log.error("http.bad_response_header", error=str(exc))
            data = encode_response(error_response(500, "internal server error"),
                                   head_only=False, close=close)
        await self._send(data)
        return close

    async def _send(self, data: bytes) -> None:
        self.phase = SEND
        self.deadline = monotonic() + self.server.limits.body_timeout
        stream = self.stream
        rest = stream.send_now(data)  # one await less when the kernel takes it all
        if rest is not None:
            await stream.drain(rest)
        if self.scope.cancel_called:
            raise _Expired

    async def _send_error(self, error: HttpError, *, deadline: bool = True) -> None:
        """Answer an error of the core (the connection closes after it)."""
        data = encode_response(error_response(error.status, error.message), head_only=False,
                               close=True)
        if deadline:
            await self._send(data)
        else:
            await self.stream.send(data)

    async def _send_stream(self, parser: RequestParser, event: ParsedHead, response: Response,
                           *, close: bool) -> bool:
        """Send a streamed response (chunked; to an HTTP/1.0 client, until the close),
        stopping when the client goes away."""
        chunked = event.version == "1.1"
        close = close or not chunked
        body = response.stream
        assert body is not None
        try:
            head = encode_stream_head(response, chunked=chunked, close=close)
        except InvalidHeader as exc:
            log.error("http.bad_response_header", error=str(exc))
            await _aclose(body)
            await self._send(encode_response(error_response(500, "internal server error"),
                                             head_only=False, close=close))
            return close
        gone = False
        stream = self.stream
        parser_cap = self.server.limits.max_header_size

        async def watch(scope: anyio.CancelScope) -> None:
            # A client that closes its side mid-stream (EOF or reset) ends the stream at once
            # instead of at the next write; pipelined bytes are kept for the parser. Bytes
            # kept are capped (one head's worth): past that, reading stops and TCP flow
            # control holds the client back, instead of the buffer growing without bound.
            nonlocal gone
            kept = 0
            while kept <= parser_cap:
                try:
                    more = await stream.receive(RECEIVE_SIZE)
                except CONNECTION_GONE:
                    gone = True
                    scope.cancel()
                    return
                kept += len(more)
                parser.feed(more)

        async with anyio.create_task_group() as tg:
            await self._send(head)
            tg.start_soon(watch, tg.cancel_scope)
            try:
                async for piece in body:
                    if piece:
                        await self._send(chunk(piece) if chunked else piece)
                    self.phase = HANDLER  # waiting for the next piece: no deadline
                if not gone and chunked:
                    await self._send(CHUNKED_END)
            finally:
                await _aclose(body)
            tg.cancel_scope.cancel()
        if gone:
            raise anyio.BrokenResourceError
        return close


async def _aclose(body: AsyncIterable[bytes]) -> None:
    aclose = getattr(body, "aclose", None)
    if aclose is not None:
        with anyio.CancelScope(shield=True):
            await aclose()


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

