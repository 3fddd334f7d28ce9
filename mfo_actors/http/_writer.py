"""Writing responses: the bytes of a response head, a body, and chunked stream framing.

Response headers come from handlers, so each is validated before it reaches the wire (no
CR, LF or other control bytes: no response splitting); a (name, value) pair is validated and
encoded once and then taken from a small cache, since handlers send the same few headers
over and over. A response is one ``bytes`` (head and body joined) and one write.
"""

from __future__ import annotations

import re
from http import HTTPStatus

from mfo_actors.http._types import Response

__all__ = [
    "CHUNKED_END",
    "CONTINUE",
    "InvalidHeader",
    "chunk",
    "encode_response",
    "encode_stream_head",
]

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
CHUNKED_END = b"0\r\n\r\n"

_STATUS_LINES: dict[int, bytes] = {
    s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode("ascii")) for s in HTTPStatus
}
_HEADER_NAME = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-z]+")  # RFC 9110 token, lower-cased
_HEADER_VALUE = re.compile(rb"[^\x00-\x08\x0a-\x1f\x7f]*")  # no CR, LF, NUL or other CTLs
_LINES: dict[tuple[str, str], bytes] = {}  # (name, value) -> b"name: value\r\n", validated
_LINES_MAX = 4096  # distinct pairs remembered
_CLOSE = b"connection: close\r\n"
_CHUNKED = b"transfer-encoding: chunked\r\n"
_NO_BODY = frozenset({204, 304})  # and 1xx: no body, no Content-Length (RFC 9110 8.6)
# b"content-length: N\r\n" for the small bodies most answers have, formatted once.
_LENGTH_LINES = [b"content-length: %d\r\n" % n for n in range(4096)]


class InvalidHeader(ValueError):
    """A handler's response header cannot be sent (bad name, or a control byte in it)."""


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        if not 100 <= status <= 999:
            raise InvalidHeader(f"status {status} is not a three-digit code")
        line = b"HTTP/1.1 %d \r\n" % status
    return line


def _line(pair: tuple[str, str]) -> bytes:
    """Validate and encode one response header (what h11 checked on every send)."""
    try:
        name = pair[0].lower().encode("latin-1")
        value = pair[1].strip().encode("latin-1")
    except UnicodeEncodeError as exc:
        raise InvalidHeader(f"header {pair[0]!r} is not latin-1") from exc
    if not _HEADER_NAME.fullmatch(name):
        raise InvalidHeader(f"illegal header name {pair[0]!r}")
    if not _HEADER_VALUE.fullmatch(value):
        raise InvalidHeader(f"illegal header value for {pair[0]!r}")
    line = name + b": " + value + b"\r\n"
    if len(_LINES) >= _LINES_MAX:
        _LINES.clear()
    _LINES[pair] = line
    return line


def _head_lines(response: Response, parts: list[bytes]) -> int | None:
    """Append *response*'s header lines to *parts*; return its own Content-Length, if any."""
    length: int | None = None
    lines = _LINES
    for pair in response.headers:
        line = lines.get(pair)
        if line is None:
            line = _line(pair)
        if line[:15] == b"content-length:":
            try:
                length = int(line[16:])
            except ValueError:
                raise InvalidHeader("content-length is not a number") from None
        elif line[:18] == b"transfer-encoding:":
            raise InvalidHeader("handlers may not set transfer-encoding")
        parts.append(line)
    return length


def encode_response(response: Response, *, head_only: bool, close: bool) -> bytes:
    """The whole of a (non-streamed) *response*: status line, headers, body.

    Args:
      head_only: Answering ``HEAD``: Content-Length of the body, but no body.
      close: Add ``Connection: close``.

    Raises:
      InvalidHeader: a header (or the status) cannot be sent as given.
    """
    status = response.status
    parts = [_status_line(status)]
    length = _head_lines(response, parts)
    body = response.body
    if status in _NO_BODY or status < 200:
        body = b""
    elif length is None:
        size = len(body)
        parts.append(_LENGTH_LINES[size] if size < 4096 else b"content-length: %d\r\n" % size)
    elif length != len(body) and not head_only:
        raise InvalidHeader(f"content-length {length} but the body has {len(body)} bytes")
    if close:
        parts.append(_CLOSE)
    parts.append(b"\r\n")
    if body and not head_only:
        parts.append(body)
    return b"".join(parts)


def encode_stream_head(response: Response, *, chunked: bool, close: bool) -> bytes:
    """The head of a streamed *response*: chunked for HTTP/1.1 clients, else the body runs
    to the end of the connection (HTTP/1.0 has no chunked encoding; *close* must be set).

    Raises:
      InvalidHeader: as :func:`encode_response`.
    """
    parts = [_status_line(response.status)]
    if _head_lines(response, parts) is not None:
        raise InvalidHeader("a streamed response has no content-length")
    if chunked:
        parts.append(_CHUNKED)
    if close:
        parts.append(_CLOSE)
    parts.append(b"\r\n")
    return b"".join(parts)


def chunk(data: bytes) -> bytes:
    """*data* as one chunk of a chunked body."""
    return b"%x\r\n%b\r\n" % (len(data), data)
