"""One publisher, many subscribers, for state that only matters in its latest form.

Made for messages like ``BreakerState`` and ``TokenIssued``: the publisher must never wait
for a slow subscriber, and a subscriber that fell behind only needs the newest values.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._channel import ChannelReceiver, checkable_type, refuse
from ._debug import debug_enabled

__all__ = ["Broadcast"]

T = TypeVar("T")

DEFAULT_SUBSCRIBER_SIZE = 16  # plenty for state changes; a subscriber that lags keeps the newest


class _Subscriber(Generic[T]):
    __slots__ = ("drain", "send")

    def __init__(self, send: MemoryObjectSendStream[T], drain: MemoryObjectReceiveStream[T]):
        self.send = send
        # Our own clone of the subscriber's receive end, used only to drop the oldest message.
        self.drain = drain


class Broadcast(Generic[T]):
    """Fan out every published value to every subscriber, never blocking the publisher.

    Each subscriber has its own bounded buffer. When it is full, the OLDEST buffered value
    is dropped to make room: a subscriber that falls behind sees the newest ``size`` values,
    never a stale backlog, and the publisher never waits. Use it for state, not for work
    items that must each be handled (use :func:`open_channel` for those).

    A late subscriber can start from :attr:`latest`. Closing the broadcast ends every
    subscription after its buffer is drained (``async for`` stops).

    Args:
      message_type: The declared type, checked in debug mode (optional;
        ``Broadcast[BreakerState]()`` works too, unchecked).

    Example::

        states = Broadcast(BreakerState)
        updates = states.subscribe()
        current = states.latest          # None until the first publish
        states.publish_nowait(BreakerState(...))
    """

    def __init__(self, message_type: type[T] | None = None) -> None:
        self._type: Any = message_type
        self._check = (
            checkable_type(message_type)
            if message_type is not None and debug_enabled()
            else None
        )
        self._subscribers: list[_Subscriber[T]] = []
        self._latest: T | None = None
        self._closed = False

    @property
    def latest(self) -> T | None:
        """The last value published, or None before the first one."""
        return self._latest

    @property
    def subscribers(self) -> int:
        """How many subscriptions are open."""
        self._forget_closed()
        return len(self._subscribers)

    def subscribe(self, size: int = DEFAULT_SUBSCRIBER_SIZE) -> ChannelReceiver[T]:
        """Open a subscription receiving every value published from now on.

        Args:
          size: Values kept when the subscriber lags (the oldest is dropped beyond that).

        Returns:
          A receiver; close it when done. After :meth:`aclose` the receiver is already ended.

        Raises:
          ValueError: *size* is less than 1.
        """
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"subscriber size must be an int >= 1, got {size!r}")
        send, receive = anyio.create_memory_object_stream[T](size)
        if self._closed:
            send.close()
            return ChannelReceiver(receive, self._type)
        self._subscribers.append(_Subscriber(send, receive.clone()))
        return ChannelReceiver(receive, self._type)

    def publish_nowait(self, message: T) -> None:
        """Publish *message* to every subscriber without waiting (drop-oldest when full).

        Raises:
          anyio.ClosedResourceError: the broadcast is closed.
          TypeError: debug mode is on and *message* is not of the declared type.
        """
        if self._closed:
            raise anyio.ClosedResourceError
        if self._check is not None:
            refuse(self._type, self._check, message)
        self._latest = message
        self._forget_closed()
        for sub in self._subscribers:
            try:
                sub.send.send_nowait(message)
            except anyio.WouldBlock:
                try:
                    sub.drain.receive_nowait()
                except anyio.WouldBlock:
                    pass
                try:
                    sub.send.send_nowait(message)
                except anyio.WouldBlock:
                    pass  # size >= 1 and we just made room; only reachable by misuse

    def _forget_closed(self) -> None:
        """Drop subscriptions whose receivers were all closed (only our drain is left)."""
        kept: list[_Subscriber[T]] = []
        for sub in self._subscribers:
            if sub.send.statistics().open_receive_streams <= 1:
                sub.send.close()
                sub.drain.close()
            else:
                kept.append(sub)
        self._subscribers = kept

    def close(self) -> None:
        """Close now: subscribers drain what they have, then their iteration ends."""
        self._closed = True
        for sub in self._subscribers:
            sub.send.close()
            sub.drain.close()
        self._subscribers = []

    async def aclose(self) -> None:
        """Close the broadcast (see :meth:`close`)."""
        self.close()
        await anyio.lowlevel.checkpoint()
