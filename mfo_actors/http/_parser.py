"""Reading requests: httptools (llhttp, the C parser under Node.js and uvicorn) behind a pull
interface, sans-IO, so the same code runs on asyncio and trio.

llhttp calls back as bytes go through it; :class:`RequestParser` turns the callbacks into a
queue of events that the connection takes one at a time (:meth:`RequestParser.next_event`):
a :class:`ParsedHead`, body pieces (``bytes``), :data:`END` of a request, an
:class:`~mfo_actors.http.HttpError` (the request is refused; nothing after it is parsed), or
:data:`NEED_DATA`. Pipelined requests queue up behind the current one; since the connection
reads the socket only when the queue is empty, what is queued is bounded by one read.

What llhttp does not check for us, and we do (as h11 did):

* **Head size.** llhttp has no limit of its own, and httptools gathers a header that spans
  reads in memory. A head still incomplete past ``max_header_size`` (one read's slack) is
  refused with 431, so is a complete head whose line and headers add up to more, and more than
  ``max_headers`` headers. A trailer section, or any token, that goes on for more than
  ``max_header_size`` bytes without the parser getting anywhere is refused likewise.
* **Host.** An HTTP/1.1 request needs exactly one ``Host`` (RFC 9112 section 3.2): else 400.
* **Framing.** ``Transfer-Encoding`` other than ``chunked`` is 501 (we cannot frame it).
  ``Content-Length`` with ``Transfer-Encoding`` is framed by the latter (llhttp is told to
  allow the pair) and marked so the connection closes after the answer (RFC 9112 section
  6.1). Versions other than 1.0 and 1.1 (and the HTTP/2 preface) are 505.
* **Upgrade.** ``Upgrade`` with ``Connection: upgrade`` (or ``CONNECT``) makes llhttp stop
  after the head: the request is served without a body and the connection closed; one that
  announces a body is refused with 400 (we do not speak the other protocol to skip it).

HTTP/1.0 requests are answered and closed, as h11 did (no 1.0 keep-alive).
"""

from __future__ import annotations

import re
from collections import deque
from typing import Final

import httptools

from mfo_actors.http._limits import HttpError, HttpLimits
from mfo_actors.http._types import RequestHead

__all__ = ["END", "NEED_DATA", "Event", "ParsedHead", "RequestParser"]


class _Marker:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA: Final = _Marker("NEED_DATA")  # feed more bytes before the next event
END: Final = _Marker("END")  # the current request's body is complete

_ABSOLUTE = re.compile(rb"(?i)https?://")
_NAMES: dict[bytes, str] = {}  # raw header name -> lower-cased text (names repeat endlessly)
_NAMES_MAX = 1024
_METHODS: dict[bytes, str] = {}  # llhttp knows ~40 methods; nothing else gets through


class _Stop(Exception):
    """Raised in a callback to stop llhttp once we queued an error."""


class ParsedHead:
    """A request head and how its message is framed.

    Attributes:
      head: What handlers see.
      keep_alive: The connection may serve another request after this one.
      has_body: A body follows (``Content-Length`` > 0, or chunked).
      expect_continue: The client waits for ``100 Continue`` before sending the body.
      close_after: Answer, then close: ``Content-Length`` with ``Transfer-Encoding`` (a
        smuggling attempt) or an upgrade request; what follows cannot be trusted as HTTP.
      version: ``"1.1"`` or ``"1.0"``.
    """

    __slots__ = ("close_after", "expect_continue", "has_body", "head", "keep_alive", "version")

    def __init__(self, head: RequestHead, *, version: str, keep_alive: bool, has_body: bool,
                 expect_continue: bool, close_after: bool) -> None:
        self.head = head
        self.version = version
        self.keep_alive = keep_alive
        self.has_body = has_body
        self.expect_continue = expect_continue
        self.close_after = close_after


Event = ParsedHead | bytes | HttpError | _Marker


class RequestParser:
    """One connection's request parser (see the module docstring).

    Args:
      limits: Read for each request's head; :attr:`limits` may be replaced (a reload).
      peer: The client's address, passed on in each :class:`RequestHead`.
    """

    __slots__ = (
        "_began", "_broken", "_dropped", "_events", "_head_seen", "_in_head", "_in_message",
        "_max_headers", "_pairs", "_parser", "_progress", "_stalled", "_url", "limits", "peer",
    )

    def __init__(self, limits: HttpLimits, peer: tuple[str, int] | None) -> None:
        self.limits = limits
        self.peer = peer
        self._parser = httptools.HttpRequestParser(self)
        # CL + TE: framed by chunked, and ParsedHead.close_after (see the module docstring).
        self._parser.set_dangerous_leniencies(lenient_chunked_length=True)
        self._events: deque[Event] = deque()
        self._broken = False  # llhttp stopped (error or upgrade): nothing more is parsed
        self._in_message = False
        self._in_head = False
        self._began = False  # a message began during the current feed
        self._progress = False  # any callback during the current feed
        self._head_seen = 0  # bytes of an incomplete head, as far as we can tell
        self._stalled = 0  # bytes fed without any callback (one token going on and on)
        self._url = b""
        # The head's fields as llhttp hands them over, up to max_headers; names, values and
        # sizes are looked at once the head is complete (_make_head), not per callback.
        self._pairs: list[tuple[bytes, bytes]] = []
        self._max_headers = limits.max_headers
        self._dropped = -1  # bytes of the fields past max_headers (-1: none so far)

    @property
    def waiting(self) -> bool:
        """Nothing of a next request has arrived (an idle keep-alive connection)."""
        return not self._in_message and not self._events

    @property
    def waiting_for_body(self) -> bool:
        """Nothing of the current request's body has arrived yet (``100 Continue`` helps)."""
        return not self._events

    def next_event(self) -> Event:
        """The next event, or :data:`NEED_DATA`."""
        events = self._events
        return events.popleft() if events else NEED_DATA

    def whole_body(self, limit: int) -> bytes | None:
        """The current request's body, if all of it is queued already (one piece, then its
        END) and no larger than *limit*; else None, and nothing is taken (read it event by
        event)."""
        events = self._events
        if len(events) >= 2 and events[1] is END:
            body = events[0]
            if type(body) is bytes and len(body) <= limit:
                events.popleft()
                events.popleft()
                return body
        return None

    def feed(self, data: bytes) -> None:
        """Parse *data* (``b""`` is ignored: the connection handles end of stream)."""
        if self._broken or not data:
            return
        self._began = self._progress = False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._broken = True  # the rest is another protocol; the head says close_after
            return
        except httptools.HttpParserCallbackError:
            self._broken = True
            if not (self._events and isinstance(self._events[-1], HttpError)):
                raise  # not our _Stop: a bug in a callback
            return
        except httptools.HttpParserError as exc:
            self._broken = True
            self._events.append(_parse_error(exc))
            return
        limit = self.limits.max_header_size
        if self._in_head:
            # Bytes of the head so far: exact for what the callbacks saw; a header still
            # being read is inside httptools, so count whole reads from the second on.
            self._head_seen = (self._head_size() if self._began
                               else self._head_seen + len(data))
            if self._head_seen > limit:
                self._fail(431, f"request head larger than {limit} bytes")
        elif self._in_message and not self._progress:
            self._stalled += len(data)
            if self._stalled > limit:
                self._fail(431, f"request trailer larger than {limit} bytes")
        else:
            self._stalled = 0

    def _head_size(self) -> int:
        """Bytes of the head the callbacks have seen so far (as counted for the limit)."""
        return (len(self._url) + sum(len(n) + len(v) + 4 for n, v in self._pairs)
                + max(self._dropped, 0))

    def _fail(self, status: int, message: str) -> None:
        self._broken = True
        self._events.append(HttpError(status, message))

    # -- llhttp callbacks (through httptools) ------------------------------------------------
    def on_message_begin(self) -> None:
        self._in_message = self._in_head = self._began = self._progress = True
        self._url = b""
        self._pairs = []
        self._max_headers = self.limits.max_headers
        self._dropped = -1

    def on_url(self, url: bytes) -> None:
        self._progress = True
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._progress = True
        if not self._in_head:
            return  # a trailer field: dropped, as before (h11 handed them over unused)
        pairs = self._pairs
        if len(pairs) < self._max_headers:
            pairs.append((name, value))
        else:  # refused with 431 once the head is complete; only its size is kept
            self._dropped = max(self._dropped, 0) + len(name) + len(value) + 4

    def on_headers_complete(self) -> None:
        self._progress = True
        self._in_head = False
        event = self._make_head()
        self._events.append(event)
        if isinstance(event, HttpError):
            raise _Stop

    def on_body(self, body: bytes) -> None:
        self._progress = True
        self._events.append(body)

    def on_chunk_header(self) -> None:
        self._progress = True

    def on_message_complete(self) -> None:
        self._progress = True
        self._in_message = False
        self._stalled = 0
        self._events.append(END)

    # -- the head ----------------------------------------------------------------------------
    def _make_head(self) -> ParsedHead | HttpError:
        parser = self._parser
        limits = self.limits
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            return HttpError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
        if self._dropped >= 0:
            return HttpError(431, f"more than {limits.max_headers} headers")
        url = self._url
        size = len(url)
        hosts = 0
        raw: list[tuple[str, str]] = []
        names = _NAMES
        for name, value in self._pairs:
            size += len(name) + len(value) + 4
            key = names.get(name)
            if key is None:
                key = _name(name)
            if key == "host":
                hosts += 1
            # llhttp trims leading whitespace only (rstrip returns the value itself if
            # there is nothing to trim)
            raw.append((key, value.rstrip(b" \t").decode("latin-1")))
        if size > limits.max_header_size:
            return HttpError(431, f"request head larger than {limits.max_header_size} bytes")
        if hosts != 1 and (version == "1.1" or hosts > 1):
            return HttpError(400, "missing Host header" if not hosts
                             else "more than one Host header")
        headers = dict(raw)
        te = headers.get("transfer-encoding")
        length = headers.get("content-length")
        close_after = False
        if te is not None:
            if any(k == "transfer-encoding" and v.strip().lower() != "chunked" for k, v in raw):
                return HttpError(501, "only Transfer-Encoding: chunked is supported")
            has_body = True
            close_after = length is not None  # RFC 9112 section 6.1
        else:
            has_body = length is not None and int(length) > 0  # llhttp checked the digits
        if parser.should_upgrade():
            if has_body:
                return HttpError(400, "an Upgrade request with a body is not supported")
            close_after = True
        method = parser.get_method()
        text = _METHODS.get(method)
        if text is None:
            text = _METHODS[method] = method.decode("ascii")
        if url[:1] == b"/":
            path, _, query = url.partition(b"?")
        else:
            path, query = _split_target(url)
        head = RequestHead(text, path.decode("latin-1"), query.decode("latin-1"), headers, raw,
                           self.peer)
        expect = headers.get("expect") if version == "1.1" else None
        return ParsedHead(
            head,
            version=version,
            keep_alive=version == "1.1" and not close_after and parser.should_keep_alive(),
            has_body=has_body,
            expect_continue=expect is not None and expect.lower() == "100-continue",
            close_after=close_after,
        )


def _name(raw: bytes) -> str:
    key = raw.decode("latin-1").lower()
    if len(_NAMES) >= _NAMES_MAX:
        _NAMES.clear()
    _NAMES[raw] = key
    return key


def _split_target(target: bytes) -> tuple[bytes, bytes]:
    """Path and query of a target not in origin form."""
    if _ABSOLUTE.match(target):
        # absolute-form (RFC 9112 section 3.2.2): route by the path; the host is ours anyway
        rest = target.split(b"://", 1)[1]
        cut = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
        target = rest[cut:] or b"/"
        if target.startswith(b"?"):
            target = b"/" + target
    path, _, query = target.partition(b"?")
    return path, query


def _parse_error(exc: httptools.HttpParserError) -> HttpError:
    reason = str(exc)
    if "HTTP version" in reason or "PRI" in reason or "HTTP/2" in reason:  # 1.2, 3.0, h2
        return HttpError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
    return HttpError(400, f"malformed request: {reason}")
