"""A scripted upstream on a real socket: each request is answered by the next step of a
script (raw bytes, a close, a stall, a trickle), so a client's handling of what real servers
do (keep-alive, closes between requests, chunked bodies, garbage) is checked byte for byte.

Usage (inside an async test)::

    async with raw_upstream([ok(202, b"{}"), CLOSE]) as up:
        ... up.url, up.connections, up.requests ...
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import anyio.abc
from anyio.streams.tls import TLSListener

__all__ = ["CLOSE", "STALL", "RawUpstream", "Step", "answer", "raw_upstream",
           "refusing_upstream", "then_close", "trickle"]

Step = bytes | Callable[[anyio.abc.ByteStream], Awaitable[bool]]
"""Raw bytes to send (the connection stays open), or a coroutine given the stream that
answers as it likes and returns whether the connection stays open."""


async def _close(stream: anyio.abc.ByteStream) -> bool:
    return False


async def _stall(stream: anyio.abc.ByteStream) -> bool:
    await anyio.sleep_forever()
    return False  # pragma: no cover


CLOSE: Step = _close  # close without a byte of an answer
STALL: Step = _stall  # never answer


def answer(status: int, body: bytes = b"", *headers: str, reason: str = "X") -> bytes:
    """A Content-Length framed answer."""
    head = [f"HTTP/1.1 {status} {reason}", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def then_close(data: bytes) -> Step:
    """Send *data*, then close the connection (as a server's keep-alive timeout does)."""

    async def step(stream: anyio.abc.ByteStream) -> bool:
        await stream.send(data)
        return False

    return step


def trickle(data: bytes, every: float) -> Step:
    """Send *data* one byte every *every* seconds."""

    async def step(stream: anyio.abc.ByteStream) -> bool:
        for i in range(len(data)):
            await stream.send(data[i:i + 1])
            await anyio.sleep(every)
        return True

    return step


@dataclass
class RawUpstream:
    port: int
    tls: bool
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"


async def _read_request(stream: anyio.abc.ByteStream, buffer: bytearray) -> bytes | None:
    """One request (head and Content-Length body), or None at the end of the stream."""
    while b"\r\n\r\n" not in buffer:
        try:
            buffer += await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            return None
    end = buffer.index(b"\r\n\r\n") + 4
    length = 0
    for line in bytes(buffer[:end]).split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(buffer) < end + length:
        try:
            buffer += await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            return None
    request = bytes(buffer[:end + length])
    del buffer[:end + length]
    return request


async def _listen(ssl_context: ssl.SSLContext | None
                  ) -> tuple[anyio.abc.Listener[anyio.abc.ByteStream], RawUpstream]:
    """A listener on a free port of 127.0.0.1 (TLS with *ssl_context*), and its record."""
    listener: anyio.abc.Listener[anyio.abc.ByteStream] = await anyio.create_tcp_listener(
        local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)  # type: ignore[attr-defined]
    if ssl_context is not None:
        listener = TLSListener(listener, ssl_context, standard_compatible=False)
    return listener, RawUpstream(port, ssl_context is not None)


@asynccontextmanager
async def _serving(listener: anyio.abc.Listener[anyio.abc.ByteStream],
                   serve: Callable[[anyio.abc.ByteStream], Awaitable[None]]
                   ) -> AsyncIterator[None]:
    """Accept on *listener* with *serve* for the block, then stop."""
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        try:
            yield
        finally:
            tg.cancel_scope.cancel()


@asynccontextmanager
async def raw_upstream(script: list[Step], *, default: Step | None = None,
                       ssl_context: ssl.SSLContext | None = None
                       ) -> AsyncIterator[RawUpstream]:
    """Serve *script* on 127.0.0.1 (TLS with *ssl_context*); requests past its end get
    *default* (else the connection is closed)."""
    steps = list(script)
    listener, up = await _listen(ssl_context)

    async def serve(stream: anyio.abc.ByteStream) -> None:
        up.connections += 1
        buffer = bytearray()
        async with stream:
            while (request := await _read_request(stream, buffer)) is not None:
                up.requests.append(request)
                step = steps.pop(0) if steps else default
                if step is None:
                    return
                try:
                    if isinstance(step, bytes):
                        await stream.send(step)
                    elif not await step(stream):
                        return
                except (anyio.BrokenResourceError, OSError):
                    return

    async with _serving(listener, serve):
        yield up


@asynccontextmanager
async def refusing_upstream(data: bytes, *, ssl_context: ssl.SSLContext | None = None
                            ) -> AsyncIterator[RawUpstream]:
    """Answer *data* as soon as a request's head has arrived, without reading its body, and
    close at once (a server refusing a body too large: the unread bytes make the kernel
    reset the connection, so a client still sending gets a write error). ``requests`` holds
    the heads."""
    listener, up = await _listen(ssl_context)

    async def serve(stream: anyio.abc.ByteStream) -> None:
        up.connections += 1
        head = b""
        async with stream:
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                while b"\r\n\r\n" not in head:
                    head += await stream.receive()
                up.requests.append(head[:head.index(b"\r\n\r\n") + 4])
                await stream.send(data)

    async with _serving(listener, serve):
        yield up
