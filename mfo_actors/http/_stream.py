"""One accepted connection's byte stream, with the flow control and close handling the server
needs on every backend.

Two things the anyio stream does not do for us, and why they matter:

* **Reading only when asked.** On asyncio (and uvloop) anyio's ``SocketStream`` sits on a
  transport that reads from the socket whenever it is not paused, into an unbounded queue. It
  pauses the transport only after a ``receive`` that had to wait; a ``receive`` that finds
  data already queued leaves it reading. A client that sends fast (a pipelining client that
  never reads our answers, a 200 MB body at a refused path during the lingering close) was
  read into memory at the speed of the network: ~1 GB in 13 s. :meth:`ConnectionStream.receive`
  pauses the transport after every read, so the kernel's socket buffers, and TCP flow
  control behind them, hold the client back while we are busy answering. trio's streams
  read only inside ``receive_some`` and need nothing.
* **Writing without a round trip through the loop.** anyio's ``send`` yields to the event
  loop twice per call (a checkpoint, then waiting for a write buffer that is already empty).
  On asyncio :meth:`ConnectionStream.send` hands the bytes to the transport itself and
  returns at once when the kernel took them all (the usual case for an answer); only when
  some are left does it wait, through anyio, for the buffer to drain. Trio's ``send_all``
  is left as it is.
* **Closing a connection the peer already reset.** uvloop raises ``RuntimeError`` ("the
  handler is closed") from ``write_eof`` on a transport a reset has closed; anyio lets it
  through. :meth:`ConnectionStream.send_eof` and :meth:`ConnectionStream.aclose` treat any
  failure there as the connection being gone, which it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc

__all__ = ["CONNECTION_GONE", "ConnectionStream"]

# What a read or write on a connection the peer closed or reset can raise (uvloop: RuntimeError
# "the handler is closed" where asyncio raises OSError).
CONNECTION_GONE = (
    anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError,
    RuntimeError,
)


def _transport_of(stream: Any) -> Any:
    """The asyncio transport under *stream* (through TLS wrappers), or None (trio)."""
    seen = 0
    while seen < 8:  # TLSStream.transport_stream chains are one or two deep
        inner = getattr(stream, "transport_stream", None)
        if inner is None:
            break
        stream, seen = inner, seen + 1
    transport = getattr(stream, "_transport", None)  # anyio's asyncio SocketStream
    if transport is None or not hasattr(transport, "pause_reading"):
        return None
    return transport


def _protocol_of(stream: Any) -> Any:
    """anyio's asyncio ``StreamProtocol`` under *stream* (read directly by
    :meth:`ConnectionStream.receive`), or None if it is not the one we know."""
    protocol = getattr(stream, "_protocol", None)
    if all(hasattr(protocol, name) for name in ("read_event", "read_queue", "is_at_eof")):
        return protocol
    return None


def _pauser(transport: Any) -> Callable[[], None]:
    if transport is None:
        return _nothing

    def pause() -> None:
        try:
            if transport.is_reading():
                transport.pause_reading()
        except (RuntimeError, AttributeError):  # closed under us: nothing left to read
            pass

    return pause


def _nothing() -> None:
    return None


class ConnectionStream:
    """*stream* read only on demand, and closed without surprises.

    Args:
      stream: The accepted connection (``SocketStream``, or a TLS stream over one).
    """

    __slots__ = ("_pause", "_protocol", "_writer", "stream")

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        transport = _transport_of(stream)
        self._pause = _pauser(transport)
        self._pause()  # asyncio starts a new transport reading before anyone asked
        # Writing to (and reading from) the transport directly is only right when nothing
        # (TLS) sits between.
        direct = not hasattr(stream, "transport_stream")
        self._writer: Any = transport if direct else None
        self._protocol: Any = _protocol_of(stream) if direct and transport is not None else None

    def extra(self, attribute: Any, *default: Any) -> Any:
        """The wrapped stream's typed attribute (``SocketAttribute.remote_address`` ...)."""
        return self.stream.extra(attribute, *default)

    async def receive(self, max_bytes: int) -> bytes:
        """Up to *max_bytes*; then the socket is not read again until the next call.

        Raises:
          anyio.EndOfStream: the client closed its side.
          anyio.BrokenResourceError: the connection is gone (reset).
        """
        protocol = self._protocol
        if protocol is not None and not protocol.read_event.is_set():
            # The usual case, without anyio's guard and checkpoint around it: nothing queued,
            # so resume reading, wait for one read, pause again (what anyio's receive does).
            transport = self._writer
            if not transport.is_closing() and not protocol.is_at_eof:
                try:
                    transport.resume_reading()
                    try:
                        await protocol.read_event.wait()
                    finally:
                        transport.pause_reading()
                except RuntimeError as exc:  # uvloop: the transport was closed by a reset
                    raise anyio.BrokenResourceError from exc
                queue = protocol.read_queue
                if queue:
                    data: bytes = queue.popleft()
                    if len(data) > max_bytes:
                        data, rest = data[:max_bytes], data[max_bytes:]
                        queue.appendleft(rest)
                    if not queue:
                        protocol.read_event.clear()
                    return data
                # closed, reset or end of stream: anyio's receive raises the right error
        try:
            return await self.stream.receive(max_bytes)
        except RuntimeError as exc:  # uvloop: the transport was closed by a reset
            raise anyio.BrokenResourceError from exc
        finally:
            self._pause()

    def send_now(self, data: bytes) -> bytes | None:
        """Write *data* without waiting where the transport allows it (asyncio, no TLS).

        Returns None when the kernel took all of it (the usual case for an answer), else
        what :meth:`drain` must still be given: ``b""`` when the rest waits in the
        transport's buffer, or *data* itself where nothing was written (trio, TLS).

        Raises:
          anyio.BrokenResourceError: the connection is gone.
        """
        transport = self._writer
        if transport is None:
            return data
        try:
            if transport.is_closing():
                raise anyio.BrokenResourceError
            transport.write(data)
            return b"" if transport.get_write_buffer_size() else None
        except RuntimeError as exc:
            raise anyio.BrokenResourceError from exc

    async def drain(self, rest: bytes) -> None:
        """Send *rest* (from :meth:`send_now`) and wait until the kernel has taken it all
        (anyio's asyncio transport has no write buffer of its own: its high-water mark is 0).

        Raises:
          anyio.BrokenResourceError: the connection is gone.
        """
        try:
            await self.stream.send(rest)
        except RuntimeError as exc:
            raise anyio.BrokenResourceError from exc

    async def send(self, data: bytes) -> None:
        """Write *data*; returns once the kernel has taken all of it, without a round trip
        through the loop when it took it at once.

        Raises:
          anyio.BrokenResourceError: the connection is gone.
        """
        rest = self.send_now(data)
        if rest is not None:
            await self.drain(rest)

    async def send_eof(self) -> None:
        """Half-close our side.

        Raises:
          anyio.BrokenResourceError: the connection is already gone.
        """
        try:
            await self.stream.send_eof()
        except (RuntimeError, OSError, anyio.ClosedResourceError,
                NotImplementedError) as exc:  # TLS before 1.3 has no half-close: just close
            raise anyio.BrokenResourceError from exc

    async def aclose(self) -> None:
        """Close; never raises for a connection that is already gone (shielded)."""
        with anyio.CancelScope(shield=True):
            try:
                await self.stream.aclose()
            except CONNECTION_GONE:
                pass
