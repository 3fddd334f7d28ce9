"""Typed, bounded channels between actors, over anyio memory object streams.

A channel is a pair (sender, receiver) carrying messages of one declared type. Every channel
is bounded: when the buffer is full ``send`` waits, so a slow consumer slows its producer
instead of growing memory. In debug mode (see :func:`set_debug`) a message of the wrong type
is refused at the sender, where the bug is, instead of surfacing in the consumer.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Generic, TypeVar

import anyio
from anyio.streams.memory import (
    MemoryObjectReceiveStream,
    MemoryObjectSendStream,
    MemoryObjectStreamStatistics,
)

from ._debug import debug_enabled

__all__ = ["ChannelReceiver", "ChannelSender", "open_channel"]

T = TypeVar("T")


def type_name(tp: Any) -> str:
    """A short readable name for a type or type expression (``Event``, ``int | None``)."""
    if isinstance(tp, type):
        return tp.__qualname__
    return repr(tp).replace("typing.", "")


def checkable_type(message_type: Any) -> Any | None:
    """What ``isinstance`` can check for *message_type*, or None when nothing sensible can.

    ``list[int]`` is checked as ``list``; ``A | B`` as is; ``Any`` and ``object`` not at all.
    """
    if message_type is Any or message_type is object:
        return None
    origin = typing.get_origin(message_type)
    candidate = message_type
    if origin is not None and origin is not typing.Union and origin is not types.UnionType:
        candidate = origin
    try:
        isinstance(None, candidate)
    except TypeError:
        return None
    return candidate


def refuse(expected: Any, check: Any, message: object) -> None:
    """Raise ``TypeError`` if *message* is not an instance of *check* (debug mode only)."""
    if not isinstance(message, check):
        # The value itself is left out on purpose: it may hold a secret.
        raise TypeError(
            f"channel of {type_name(expected)} refused a message of type "
            f"{type_name(type(message))}"
        )


class ChannelSender(Generic[T]):
    """The sending end of a channel made by :func:`open_channel`.

    Closing the last sender (``aclose``/``close``, or leaving ``async with``) ends the
    stream: receivers get what is buffered, then ``anyio.EndOfStream`` (``async for`` stops).
    """

    __slots__ = ("_check", "_stream", "_type")

    def __init__(self, stream: MemoryObjectSendStream[T], message_type: Any, check: Any) -> None:
        self._stream = stream
        self._type = message_type
        self._check = check

    @property
    def message_type(self) -> Any:
        """The type declared when the channel was opened."""
        return self._type

    async def send(self, message: T) -> None:
        """Send *message*, waiting while the buffer is full.

        Raises:
          anyio.BrokenResourceError: every receiver is closed.
          anyio.ClosedResourceError: this sender is closed.
          TypeError: debug mode is on and *message* is not of the declared type.
        """
        if self._check is not None:
            refuse(self._type, self._check, message)
        await self._stream.send(message)

    def send_nowait(self, message: T) -> None:
        """Send *message* if there is room now.

        Raises:
          anyio.WouldBlock: the buffer is full (and no receiver is waiting).
          anyio.BrokenResourceError: every receiver is closed.
          TypeError: debug mode is on and *message* is not of the declared type.
        """
        if self._check is not None:
            refuse(self._type, self._check, message)
        self._stream.send_nowait(message)

    def clone(self) -> ChannelSender[T]:
        """Another sender on the same channel; the stream ends when all clones are closed."""
        return ChannelSender(self._stream.clone(), self._type, self._check)

    def close(self) -> None:
        """Close this sender now (sync form of :meth:`aclose`, for ``finally`` blocks)."""
        self._stream.close()

    async def aclose(self) -> None:
        """Close this sender."""
        self._stream.close()
        await anyio.lowlevel.checkpoint()

    def statistics(self) -> MemoryObjectStreamStatistics:
        """A frozen snapshot: buffer use, open clones, tasks waiting to send or receive."""
        return self._stream.statistics()

    async def __aenter__(self) -> ChannelSender[T]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._stream.close()

    def __enter__(self) -> ChannelSender[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stream.close()

    def __repr__(self) -> str:
        return f"<ChannelSender[{type_name(self._type)}] {self._stream.statistics()!r}>"


class ChannelReceiver(Generic[T]):
    """The receiving end of a channel made by :func:`open_channel`.

    ``async for message in receiver`` runs until every sender is closed and the buffer is
    drained. Closing the last receiver makes senders fail with ``anyio.BrokenResourceError``.
    """

    __slots__ = ("_stream", "_type")

    def __init__(self, stream: MemoryObjectReceiveStream[T], message_type: Any) -> None:
        self._stream = stream
        self._type = message_type

    @property
    def message_type(self) -> Any:
        """The type declared when the channel was opened."""
        return self._type

    async def receive(self) -> T:
        """Wait for the next message.

        Raises:
          anyio.EndOfStream: every sender is closed and the buffer is empty.
          anyio.ClosedResourceError: this receiver is closed.
        """
        return await self._stream.receive()

    def receive_nowait(self) -> T:
        """Take the next message if one is ready.

        Raises:
          anyio.WouldBlock: nothing is buffered and no sender is waiting.
          anyio.EndOfStream: every sender is closed and the buffer is empty.
        """
        return self._stream.receive_nowait()

    def clone(self) -> ChannelReceiver[T]:
        """Another receiver on the same channel: clones share messages, each gets one."""
        return ChannelReceiver(self._stream.clone(), self._type)

    def close(self) -> None:
        """Close this receiver now (sync form of :meth:`aclose`)."""
        self._stream.close()

    async def aclose(self) -> None:
        """Close this receiver."""
        self._stream.close()
        await anyio.lowlevel.checkpoint()

    def statistics(self) -> MemoryObjectStreamStatistics:
        """A frozen snapshot: buffer use, open clones, tasks waiting to send or receive."""
        return self._stream.statistics()

    def __aiter__(self) -> ChannelReceiver[T]:
        return self

    async def __anext__(self) -> T:
        try:
            return await self._stream.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> ChannelReceiver[T]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._stream.close()

    def __enter__(self) -> ChannelReceiver[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stream.close()

    def __repr__(self) -> str:
        return f"<ChannelReceiver[{type_name(self._type)}] {self._stream.statistics()!r}>"


def open_channel(
    message_type: type[T], size: int
) -> tuple[ChannelSender[T], ChannelReceiver[T]]:
    """Open a bounded channel carrying messages of *message_type*.

    Args:
      message_type: The declared message class (usually a ``msgspec.Struct`` from
        ``mfo_actors.messages``). Checked per message only in debug mode.
      size: Messages buffered before ``send`` waits. 0 means every send waits until a
        receiver takes the message (rendezvous). If in doubt, use a small number.

    Returns:
      ``(sender, receiver)``; close both (``async with`` works on each).

    Raises:
      ValueError: *size* is negative or not an int (an unbounded channel is not offered).
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"channel size must be an int >= 0, got {size!r}")
    send, receive = anyio.create_memory_object_stream[T](size)
    check = checkable_type(message_type) if debug_enabled() else None
    return ChannelSender(send, message_type, check), ChannelReceiver(receive, message_type)
