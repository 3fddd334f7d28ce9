"""Request and response objects of the HTTP/1.1 server core.

The core knows nothing of webhooks or MFO: the listener, the admin port and the reference
MFO server are handlers ``async (Request) -> Response`` on top of it.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Awaitable, Callable
from dataclasses import dataclass, field

__all__ = ["Handler", "HeadCheck", "Request", "RequestHead", "Response"]


@dataclass(slots=True)
class RequestHead:
    """The request line and headers, before the body is read.

    Header names are lower-cased; a header sent twice keeps both values in ``raw_headers``
    and the last one in ``headers``.
    """

    method: str
    path: str
    query: str
    headers: dict[str, str]
    raw_headers: list[tuple[str, str]]
    client: tuple[str, int] | None = None

    def header(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name.lower(), default)


@dataclass(slots=True)
class Request:
    """A complete request: its head and the whole body (within the size limit)."""

    head: RequestHead
    body: bytes

    @property
    def method(self) -> str:
        return self.head.method

    @property
    def path(self) -> str:
        return self.head.path

    @property
    def query(self) -> str:
        return self.head.query

    @property
    def headers(self) -> dict[str, str]:
        return self.head.headers

    def header(self, name: str, default: str | None = None) -> str | None:
        return self.head.headers.get(name.lower(), default)


@dataclass(slots=True)
class Response:
    """A response; ``stream`` (if set) is sent chunked after the head, e.g. for SSE."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    stream: AsyncIterable[bytes] | None = None


Handler = Callable[[Request], Awaitable[Response]]
# Called with the head before the body is read: return a Response to answer at once without
# reading the body (404, 405, 401 ...), or an int: the body size limit for this request.
HeadCheck = Callable[[RequestHead], "Response | int"]
