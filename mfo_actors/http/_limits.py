"""The server's limits, the errors it answers itself, and the numbers behind both."""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from mfo_actors.http._types import Response

__all__ = [
    "LINGER_MAX_BYTES",
    "LINGER_TIMEOUT",
    "RECEIVE_SIZE",
    "REJECT_SEND_TIMEOUT",
    "HttpError",
    "HttpLimits",
    "error_response",
]

RECEIVE_SIZE = 65536  # bytes per recv; a typical webhook (head + body) arrives in one
LINGER_TIMEOUT = 2.0  # seconds to discard a refused body so the client reads our error answer
# ... and at most this much of it: Go's net/http discards at most 256 KiB of an unread body
# before closing. Every byte drained is memory churn, and ten clients streaming bodies at a
# refused path at once must not cost the daemon tens of MB.
LINGER_MAX_BYTES = 256 * 1024
REJECT_SEND_TIMEOUT = 0.5  # seconds to write the over-capacity 503 before giving up

_encode_json = msgspec.json.Encoder().encode


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Limits of one server; defaults follow common servers (nginx, Go's net/http, h11)."""

    max_header_size: int = 16 * 1024  # request line + headers (h11's default, as before)
    max_headers: int = 100  # as Go's net/http and nginx allow
    max_body_size: int = 1024 * 1024  # default per-request body limit (a HeadCheck may change it)
    header_timeout: float = 10.0  # whole head, from its first byte (slowloris guard)
    body_timeout: float = 30.0  # whole body, from the end of the head; also caps each write
    keepalive_timeout: float = 75.0  # idle time between requests (nginx's default)
    max_connections: int = 1024  # open connections; more are answered 503 and closed


class HttpError(Exception):
    """The client's request cannot be served: the core answers *status* and closes.

    Raised (or queued as a parser event) for malformed requests (400), oversized heads
    (431), unsupported framing (501) or versions (505), bodies over the limit (413).
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(status: int, message: str, *, headers: list[tuple[str, str]] | None = None
                   ) -> Response:
    """A small JSON error response ``{"error": message}``."""
    return Response(
        status,
        [("content-type", "application/json"), *(headers or [])],
        _encode_json({"error": message}),
    )
