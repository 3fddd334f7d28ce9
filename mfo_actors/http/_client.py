"""A lean HTTP/1.1 client for one upstream: POST a prepared body over kept-alive connections.

The forwarder sends thousands of near-identical requests to a single origin; a general client
(httpx: URL objects, header models, a pool scanned per request, two sans-IO state machines)
spends ~1.5 ms of CPU on each. :class:`UpstreamPool` does only what that path needs:

* the request head is built once per pool (method, target, ``Host``, ``Accept``...); a request
  adds its own header lines (already encoded by the caller, see :func:`header_line`) and
  ``Content-Length``, and goes out in one write with its body;
* the answer is parsed by httptools (llhttp) into a :class:`ClientResponse`: the status, the
  headers (names lower-cased) and the body read up to a cap (``truncated`` when more was sent;
  the rest is never read and the connection is dropped);
* connections are kept alive, most recently used first, at most ``max_idle`` of them and for
  ``idle_expiry`` seconds; a connection is dropped, never reused, after a protocol error, an
  answer that is not keep-alive, a truncated body, or a cancellation mid-exchange (a timeout);
* a kept-alive connection the server closed in the meantime (its keep-alive timeout) shows up
  as a send that gets no answer at all (EOF or reset before the first byte of one): the
  request is sent again once, on a new connection, as browsers and Go's ``net/http`` do for
  requests that are safe to repeat. Use it only for those (the forwarder's carry an
  ``Idempotency-Key``).

Redirects are not followed and nothing is decompressed (``Accept-Encoding: identity``). The
pool has no deadline of its own: the caller bounds each exchange with a cancel scope.
Concurrency is the caller's: each concurrent :meth:`UpstreamPool.post` uses its own
connection, and at most ``max_idle`` stay open afterwards.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

import anyio
import httptools
from anyio.abc import ByteStream

if TYPE_CHECKING:
    import ssl

__all__ = ["ClientResponse", "ExchangeError", "UpstreamPool", "header_line"]

READ_SIZE = 65536  # bytes per receive: an acknowledgement fits many times over
SEPARATE_BODY = 64 * 1024  # bodies from this size go out in a second write (no copy)
DEFAULT_IDLE_EXPIRY = 30.0  # seconds an idle connection is kept (httpx's pool uses the same)

ExchangeErrorKind = Literal["connect", "closed", "network", "protocol"]


class ExchangeError(Exception):
    """The exchange failed before a complete answer arrived; the connection is dropped.

    Attributes:
      kind: ``connect`` (no connection: refused, DNS, TLS handshake), ``closed`` (the server
        closed the connection before the answer was complete), ``network`` (a read or write
        failed), ``protocol`` (the answer is not HTTP/1.1 as we can read it).
      detail: What happened, for an error message.
    """

    def __init__(self, kind: ExchangeErrorKind, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


class _NoAnswer(Exception):
    """The request got no byte of an answer (EOF or reset right away); maybe a stale
    kept-alive connection, so the request may be sent again on a new one."""

    def __init__(self, error: ExchangeError) -> None:
        super().__init__(str(error))
        self.error = error


class ClientResponse:
    """An answer: status, headers (lower-cased names; a repeated one keeps the last value)
    and the body up to the cap (``truncated``: more was sent and not read)."""

    __slots__ = ("body", "headers", "status", "truncated")

    def __init__(self, status: int, headers: dict[str, str], body: bytes,
                 truncated: bool) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.truncated = truncated

    def __repr__(self) -> str:
        return f"ClientResponse({self.status}, body={len(self.body)}B)"


def header_line(name: str, value: str) -> bytes:
    """``Name: value\\r\\n``, refusing a value that would end the line early (a CR, LF or
    NUL in it would let the value inject headers of its own).

    Raises:
      ValueError: the value is not a valid header value.
    """
    if "\r" in value or "\n" in value or "\0" in value:
        raise ValueError(f"invalid {name} header value")
    return b"%s: %s\r\n" % (name.encode("ascii"), value.encode("latin-1"))


class _Connection:
    """One connection and its response parser (httptools calls the ``on_*`` methods)."""

    __slots__ = ("_body", "_chunks", "_complete", "_framed", "_headers", "_headers_done",
                 "_info", "_keep", "_messages", "_parser", "_size", "_status", "_truncated",
                 "cap", "idle_since", "served", "stream")

    def __init__(self, stream: ByteStream) -> None:
        self.stream = stream
        self.served = 0  # answers read on this connection
        self.idle_since = 0.0
        self.cap = 0
        self._parser = httptools.HttpResponseParser(self)
        self._reset()
        self._messages = 0

    def _reset(self) -> None:
        self._status = 0
        self._headers: dict[str, str] = {}
        self._headers_done = False
        self._framed = False  # Content-Length or Transfer-Encoding: not read-until-close
        self._chunks: list[bytes] = []
        self._size = 0
        self._truncated = False
        self._complete = False
        self._keep = False
        self._info = False

    # -- httptools callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._messages += 1

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        if key == "content-length" or key == "transfer-encoding":
            self._framed = True
        self._headers[key] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        self._status = status
        self._headers_done = True
        # 1xx (but 101): informational, the real answer follows (RFC 9110 section 15.2).
        self._info = 100 <= status < 200 and status != 101

    def on_body(self, body: bytes) -> None:
        if self._truncated:
            return
        room = self.cap - self._size
        if len(body) > room:
            self._chunks.append(body[:room])
            self._size = self.cap
            self._truncated = True
            return
        self._chunks.append(body)
        self._size += len(body)

    def on_message_complete(self) -> None:
        if self._info:
            self._messages -= 1
            self._reset()
            return
        self._keep = self._parser.should_keep_alive()
        self._complete = True

    # -- one exchange -------------------------------------------------------------------

    async def exchange(self, data: bytes, body: bytes | None, cap: int) -> ClientResponse:
        """Send *data* (and *body* when given separately); read the answer.

        Raises:
          _NoAnswer: nothing of an answer came (the request may not have been read).
          ExchangeError: the answer was cut off or malformed.
        """
        self.cap = cap
        self._reset()
        self._messages = 0
        if body is not None:
            return await self._exchange_large(data, body)
        try:
            await self.stream.send(data)
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            raise _NoAnswer(ExchangeError("network", f"send failed: {_text(exc)}")) from exc
        return await self._answer()

    async def _exchange_large(self, data: bytes, body: bytes) -> ClientResponse:
        """Send a large body while reading the answer: a server that refuses it before
        reading it all (413, 401) answers and closes, and the close breaks our send. The
        answer that came first is the outcome; without it the refusal would look like a
        network error and be retried. (httpcore reads after a failed write instead, which
        misses an answer the reset already discarded.)"""
        send_error: BaseException | None = None
        sent_all = False
        response: ClientResponse | None = None
        read_error: BaseException | None = None

        async def send() -> None:
            nonlocal send_error, sent_all
            try:
                await self.stream.send(data)
                await self.stream.send(body)
                sent_all = True
            except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                send_error = exc

        async with anyio.create_task_group() as tg:
            tg.start_soon(send)
            try:
                response = await self._answer()
            except (_NoAnswer, ExchangeError) as exc:
                read_error = exc
            # Answered before the body was all sent (or the read failed): stop sending.
            tg.cancel_scope.cancel()
        if response is not None:
            if not sent_all:
                self._keep = False  # the rest of the body would be read as a request
            return response
        if send_error is not None:
            raise _NoAnswer(ExchangeError("network", f"send failed: {_text(send_error)}")
                            ) from send_error
        assert read_error is not None
        raise read_error

    async def _answer(self) -> ClientResponse:
        """Read and parse one answer (the request was, or is being, sent)."""
        stream = self.stream
        got = False
        parser = self._parser
        while not self._complete:
            try:
                data = await stream.receive(READ_SIZE)
            except anyio.EndOfStream:
                data = b""
            except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                error = ExchangeError("network", f"receive failed: {_text(exc)}")
                if not got:
                    raise _NoAnswer(error) from exc
                raise error from exc
            if not data:
                if self._headers_done and not self._framed and not self._info:
                    break  # an answer delimited by the end of the connection
                error = ExchangeError("closed", "the server closed the connection before "
                                      "the answer was complete")
                if not got:
                    raise _NoAnswer(error)
                raise error
            got = True
            try:
                parser.feed_data(data)
            except httptools.HttpParserError as exc:
                raise ExchangeError("protocol", f"invalid HTTP answer: {exc}") from exc
            if self._truncated:
                break
        self.served += 1
        if self._messages > 1:
            self._keep = False  # bytes after the answer: nothing we sent asked for them
        return ClientResponse(self._status, self._headers, b"".join(self._chunks),
                              self._truncated)

    @property
    def reusable(self) -> bool:
        return self._complete and self._keep and not self._truncated


def _text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


class UpstreamPool:
    """Kept-alive connections to the origin of *url*, POSTing to its path.

    Args:
      url: ``http(s)://host[:port]/path``: where every request goes.
      ssl_context: For ``https``: how to verify the server (see
        :func:`mfo_actors.client.upstream_ssl_context`); required for an ``https`` URL.
      headers: Header lines sent with every request (see :func:`header_line`), after
        ``Host``; e.g. ``Content-Type``, ``Accept``, ``User-Agent``.
      max_idle: Connections kept open between requests.
      idle_expiry: Seconds an idle connection may wait before it is closed instead of reused.
    """

    def __init__(self, url: str, *, ssl_context: ssl.SSLContext | None = None,
                 headers: bytes = b"", max_idle: int = 1,
                 idle_expiry: float = DEFAULT_IDLE_EXPIRY) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self._tls = parts.scheme == "https"
        if self._tls and ssl_context is None:
            raise ValueError("an https URL needs an ssl_context")
        self._ssl = ssl_context
        self._host = parts.hostname
        self._port = parts.port or (443 if self._tls else 80)
        host = f"[{self._host}]" if ":" in self._host else self._host
        default = 443 if self._tls else 80
        authority = host if parts.port in (None, default) else f"{host}:{parts.port}"
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        self._head = (b"POST %s HTTP/1.1\r\nHost: %s\r\n" % (
            target.encode("ascii"), authority.encode("idna"))) + headers
        self._idle: list[_Connection] = []
        self._max_idle = max_idle
        self._expiry = idle_expiry
        self._closed = False

    def __repr__(self) -> str:
        scheme = "https" if self._tls else "http"
        return f"UpstreamPool({scheme}://{self._host}:{self._port}, idle={len(self._idle)})"

    async def __aenter__(self) -> UpstreamPool:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def post(self, body: bytes, *, header_lines: bytes = b"",
                   cap: int) -> ClientResponse:
        """POST *body* with *header_lines* (CRLF-terminated, see :func:`header_line`).

        Args:
          cap: Bytes of the answer's body read at most (``truncated`` when there was more).

        Raises:
          ExchangeError: no complete answer (the connection was dropped).
        """
        head = b"%s%sContent-Length: %d\r\n\r\n" % (self._head, header_lines, len(body))
        if len(body) < SEPARATE_BODY:
            data, rest = head + body, None
        else:
            data, rest = head, body
        conn = await self._take() if self._idle else None
        if conn is not None:
            try:
                return await self._exchange(conn, data, rest, cap)
            except _NoAnswer:
                pass  # closed while idle (or just now): once more, on a new connection
        conn = await self._connect()
        try:
            return await self._exchange(conn, data, rest, cap)
        except _NoAnswer as exc:
            raise exc.error from exc.__cause__

    async def _exchange(self, conn: _Connection, data: bytes, rest: bytes | None,
                        cap: int) -> ClientResponse:
        try:
            response = await conn.exchange(data, rest, cap)
        except BaseException:
            await anyio.aclose_forcefully(conn.stream)  # cancelled mid-answer, or an error
            raise
        if conn.reusable and not self._closed and len(self._idle) < self._max_idle:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            await anyio.aclose_forcefully(conn.stream)
        return response

    async def _take(self) -> _Connection | None:
        idle = self._idle
        conn = idle.pop()
        if time.monotonic() - conn.idle_since < self._expiry:
            return conn
        # Expired: the others are older still (LIFO); close them all.
        stale = [conn, *idle]
        idle.clear()
        for old in stale:
            await anyio.aclose_forcefully(old.stream)
        return None

    async def _connect(self) -> _Connection:
        try:
            if self._tls:
                stream: ByteStream = await anyio.connect_tcp(
                    self._host, self._port, ssl_context=self._ssl, tls_hostname=self._host,
                    tls_standard_compatible=False)
            else:
                stream = await anyio.connect_tcp(self._host, self._port)
        except (OSError, anyio.BrokenResourceError) as exc:
            cause = exc.__cause__ if isinstance(exc, anyio.BrokenResourceError) else exc
            raise ExchangeError("connect", _text(cause or exc)) from exc
        return _Connection(stream)

    async def aclose(self) -> None:
        """Close the idle connections; connections in use close when their exchange ends."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await anyio.aclose_forcefully(conn.stream)

