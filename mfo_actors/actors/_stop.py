"""A helper for actors whose work loop must end when ``request_stop()`` sets their event."""

from __future__ import annotations

import anyio

__all__ = ["cancel_on"]


async def cancel_on(event: anyio.Event, scope: anyio.CancelScope) -> None:
    """Wait for *event*, then cancel *scope*: ``tg.start_soon(cancel_on, stop, tg.cancel_scope)``
    ends a loop blocked on a channel or a sleep as soon as a stop is requested."""
    await event.wait()
    scope.cancel()
