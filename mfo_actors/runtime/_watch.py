"""A latest-value channel ("watch", as tokio and trio users know it): one owner publishes state,
any number of readers read the current value without awaiting, or wait until it changes.

Made for state owned by one actor and read by many (the breaker's state, the current token):
a reader never sees a backlog, only the newest value, and the owner never waits for a reader.
Work items that must each be handled go over :func:`open_channel` instead.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio

from ._channel import checkable_type, refuse
from ._debug import debug_enabled

if TYPE_CHECKING:
    from ._clock import Clock

__all__ = ["Watch", "wait_any"]

T = TypeVar("T")


class Watch(Generic[T]):
    """The current value of some state, with a version that grows on every publish.

    Args:
      message_type: The declared type (checked on publish in debug mode; shown in the graph).
      initial: The value readers see before the first publish.

    Example::

        states = Watch(BreakerState, initial=BreakerState(...))
        state = states.value                    # never awaits
        seen = states.version
        await states.wait_changed(seen)         # until a newer value is published
    """

    __slots__ = ("_changed", "_check", "_closed", "_type", "_value", "_version")

    def __init__(self, message_type: Any, initial: T) -> None:
        self._type: Any = message_type
        self._check = checkable_type(message_type) if debug_enabled() else None
        self._value: T = initial
        self._version = 0
        self._changed: anyio.Event | None = None  # made on first wait: needs a running loop
        self._closed = False

    @property
    def message_type(self) -> Any:
        return self._type

    @property
    def value(self) -> T:
        """The newest value (never awaits)."""
        return self._value

    @property
    def version(self) -> int:
        """How many times a value was published (or the waiters were woken) so far."""
        return self._version

    @property
    def closed(self) -> bool:
        return self._closed

    def publish(self, value: T) -> None:
        """Make *value* the current one and wake every waiter.

        Raises:
          anyio.ClosedResourceError: the watch is closed.
          TypeError: debug mode is on and *value* is not of the declared type.
        """
        if self._closed:
            raise anyio.ClosedResourceError
        if self._check is not None:
            refuse(self._type, self._check, value)
        self._value = value
        self.touch()

    def touch(self) -> None:
        """Wake the waiters without a new value: something they compute from it changed
        (the breaker's in-flight window)."""
        self._version += 1
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()

    async def wait_changed(self, since: int, timeout: float = math.inf) -> bool:  # noqa: ASYNC109
        """Wait until the version is past *since* (at once if it already is).

        Returns:
          True when it changed; False when *timeout* seconds passed first or the watch closed.
        """
        with anyio.move_on_after(timeout):
            while self._version <= since and not self._closed:
                if self._changed is None:
                    self._changed = anyio.Event()
                await self._changed.wait()
        return self._version > since

    def close(self) -> None:
        """No more values: waiters return (the last value stays readable)."""
        self._closed = True
        self.touch()

    def __repr__(self) -> str:
        return f"Watch({getattr(self._type, '__name__', self._type)}, version={self._version})"


async def wait_any(clock: Clock, timeout: float, *waits: Callable[[], Awaitable[object]]) -> None:  # noqa: ASYNC109
    """Return as soon as one of *waits* returns, or once *timeout* seconds passed on *clock*.

    The others are cancelled. For a reader that waits on a :class:`Watch` and a timer at once.
    """
    async with anyio.create_task_group() as tg:

        async def first(wait: Callable[[], Awaitable[object]]) -> None:
            await wait()
            tg.cancel_scope.cancel()

        for wait in waits:
            tg.start_soon(first, wait)
        if timeout != math.inf:
            await clock.sleep(max(0.0, timeout))
            tg.cancel_scope.cancel()
