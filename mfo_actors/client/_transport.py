"""One HTTP exchange with the upstream, bounded in time and in memory.

httpx's timeouts are per operation: each read of a body trickled one byte every 100 ms
restarts the read timeout, so a ``client.timeout: 5s`` exchange could hold a delivery slot for
minutes; and ``response.content`` reads a body whole, however large. :func:`exchange` is the
one place every call to the upstream goes through (the base client, both logins):

* ``timeout`` bounds the whole exchange, from the request's first byte to the body's last
  (a :class:`RetryableError` "timeout" past it);
* a 2xx body is read up to ``max_body`` bytes; an error body up to :data:`ERROR_BODY_CAP`
  (64 KiB is plenty for an error message; the rest is never read, the connection is
  dropped instead of drained). A 2xx body cut short is marked (:func:`was_truncated`) so a
  caller that needs it raises instead of decoding half a document.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio
import httpx

from mfo_actors.client.errors import RetryableError, classify_transport_error

if TYPE_CHECKING:
    import ssl

__all__ = [
    "DEFAULT_MAX_BODY",
    "ERROR_BODY_CAP",
    "body_chunks",
    "exchange",
    "read_capped",
    "total_timeout",
    "upstream_ssl_context",
    "was_truncated",
]

ERROR_BODY_CAP = 64 * 1024  # bytes of an error answer kept: enough for any error message
DEFAULT_MAX_BODY = 16 * 1024 * 1024  # bytes of a 2xx answer read for API calls
_TRUNCATED = "mfo_truncated"
# Framing headers of the original answer; the rebuilt response carries the decoded body.
_FRAMING = frozenset({"content-encoding", "content-length", "transfer-encoding"})


def upstream_ssl_context() -> ssl.SSLContext:
    """How the upstream's certificate is verified, for clients other than httpx (the
    forwarder's lean sender): exactly as httpx does for the rest of the client (its
    ``verify=True``): certifi's CA bundle, or ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` when set."""
    return httpx.create_ssl_context()


def total_timeout(http: httpx.AsyncClient) -> float | None:
    """The whole-exchange deadline for *http*: its configured timeout (``client.timeout``
    sets connect, read, write and pool alike), or None when it has none."""
    timeout = http.timeout
    parts = [t for t in (timeout.connect, timeout.read, timeout.write, timeout.pool)
             if t is not None]
    return max(parts) if parts else None


@asynccontextmanager
async def body_chunks(response: httpx.Response) -> AsyncGenerator[AsyncIterator[bytes], None]:
    """*response*'s (decoded) body chunks, for ``async with``: the iterator is closed when the
    block ends, also when it stops before the end (an async generator left suspended is a
    leak: trio warns when the garbage collector finds it)."""
    chunks = response.aiter_bytes()
    try:
        yield chunks
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]  # an async generator


async def read_capped(response: httpx.Response, cap: int) -> tuple[bytes, bool]:
    """Up to *cap* bytes of *response*'s (decoded) body, and whether more was left unread."""
    chunks: list[bytes] = []
    size = 0
    async with body_chunks(response) as body:
        async for chunk in body:
            room = cap - size
            if len(chunk) > room:
                chunks.append(chunk[:room])
                return b"".join(chunks), True
            chunks.append(chunk)
            size += len(chunk)
    return b"".join(chunks), False


async def exchange(
    http: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    content: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    params: Mapping[str, str] | None = None,
    max_body: int = DEFAULT_MAX_BODY,
) -> httpx.Response:
    """Send one request; return its answer with the body read (within the caps).

    The whole exchange must end within :func:`total_timeout` of *http* (``client.timeout``).

    Args:
      max_body: Bytes of a 2xx body to read; an error body is read up to
        ``min(max_body, ERROR_BODY_CAP)``.

    Raises:
      RetryableError: a network error, or no complete answer within *timeout*.
    """
    limit = total_timeout(http)
    request = http.build_request(method, url, content=content, headers=headers, params=params)
    try:
        with anyio.fail_after(limit):
            response = await http.send(request, stream=True)
            try:
                cap = max_body if response.is_success else min(max_body, ERROR_BODY_CAP)
                body, truncated = await read_capped(response, cap)
            finally:
                await response.aclose()
    except TimeoutError:
        within = f" within {limit:g}s" if limit is not None else ""
        raise RetryableError(f"timeout: no complete answer{within}") from None
    except httpx.TransportError as exc:
        raise classify_transport_error(exc) from exc
    kept = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in _FRAMING]
    return httpx.Response(response.status_code, headers=kept, content=body, request=request,
                          extensions={**response.extensions, _TRUNCATED: truncated})


def was_truncated(response: httpx.Response) -> bool:
    """True when :func:`exchange` left part of *response*'s body unread."""
    return bool(response.extensions.get(_TRUNCATED))
